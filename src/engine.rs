//! The Docker Engine, through its API (bollard), behind the few calls bkbundle makes.
//!
//! Connection follows Docker's own rules (`DOCKER_HOST`, else the local socket) and negotiates the
//! API version down to what the engine speaks, so an older engine (20.10 is common in the field)
//! works. Errors name the engine address and say how to get it running.

use crate::error::{Error, Result};
use bollard::Docker;
use futures_util::{Stream, StreamExt, TryStreamExt};
use std::io;

/// What pack needs to know about an image the engine has.
#[derive(Debug, Clone)]
pub struct LocalImage {
    pub id: String,
    pub size: u64,
}

pub struct Engine {
    docker: Docker,
    address: String,
}

fn address() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_string())
}

fn unreachable(address: &str, e: impl std::fmt::Display) -> Error {
    Error::external(format!("cannot reach the Docker engine at {address}: {e}"))
        .hint("start it (`systemctl start docker`) or point DOCKER_HOST at it; check you may use its socket (root or the docker group)")
}

impl Engine {
    /// Connect and negotiate the API version; fails with the engine's address when it is down.
    pub async fn connect() -> Result<Engine> {
        let address = address();
        let docker = Docker::connect_with_defaults().map_err(|e| unreachable(&address, e))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| unreachable(&address, e))?;
        docker.ping().await.map_err(|e| unreachable(&address, e))?;
        Ok(Engine { docker, address })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The engine's version and API version, for reports.
    pub async fn version(&self) -> Result<(String, String)> {
        let v = self
            .docker
            .version()
            .await
            .map_err(|e| unreachable(&self.address, e))?;
        Ok((
            v.version.unwrap_or_default(),
            v.api_version.unwrap_or_default(),
        ))
    }

    /// The image the engine has under `reference`, or None.
    pub async fn image(&self, reference: &str) -> Result<Option<LocalImage>> {
        match self.docker.inspect_image(reference).await {
            Ok(i) => Ok(Some(LocalImage {
                id: i.id.unwrap_or_default(),
                size: i.size.unwrap_or(0).max(0) as u64,
            })),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(unreachable(&self.address, e)),
        }
    }

    /// Pull `reference` through the engine (which uses its own registry configuration).
    pub async fn pull(&self, reference: &str) -> Result<()> {
        let opts = bollard::query_parameters::CreateImageOptions {
            from_image: Some(reference.to_string()),
            ..Default::default()
        };
        let mut stream = self.docker.create_image(Some(opts), None, None);
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| pull_error(reference, e))?;
            if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                return Err(pull_error(reference, detail));
            }
        }
        Ok(())
    }

    /// `docker save` of several images in one stream (the engine stores shared layers once).
    pub fn export(
        &self,
        references: &[String],
    ) -> impl Stream<Item = io::Result<bytes::Bytes>> + Send + 'static {
        let refs: Vec<&str> = references.iter().map(String::as_str).collect();
        let address = self.address.clone();
        self.docker
            .export_images(&refs)
            .map_err(move |e| io::Error::other(format!("Docker engine at {address}: {e}")))
    }
}

fn pull_error(reference: &str, e: impl std::fmt::Display) -> Error {
    Error::external(format!("image {reference} is not in the local Docker engine and pulling it failed: {e}"))
        .hint("on the connected machine: check the registry is reachable and the reference is right (`docker pull REF`), or give the image as an `archive = \"file.tar\"` (docker save) in the recipe")
}
