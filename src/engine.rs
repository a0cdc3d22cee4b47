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
        let docker = docker.negotiate_version().await.map_err(|e| unreachable(&address, e))?;
        docker.ping().await.map_err(|e| unreachable(&address, e))?;
        Ok(Engine { docker, address })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The engine's version and API version, for reports.
    pub async fn version(&self) -> Result<(String, String)> {
        let v = self.docker.version().await.map_err(|e| unreachable(&self.address, e))?;
        Ok((v.version.unwrap_or_default(), v.api_version.unwrap_or_default()))
    }

    /// The image the engine has under `reference`, or None.
    pub async fn image(&self, reference: &str) -> Result<Option<LocalImage>> {
        match self.docker.inspect_image(reference).await {
            Ok(i) => Ok(Some(LocalImage {
                id: i.id.unwrap_or_default(),
                size: i.size.unwrap_or(0).max(0) as u64,
            })),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
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
    pub fn export(&self, references: &[String]) -> impl Stream<Item = io::Result<bytes::Bytes>> + Send + 'static {
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

/// A container of the stack as the health wait sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerState {
    pub id: String,
    pub name: String,
    pub service: String,
    /// created, running, restarting, exited, dead, paused.
    pub status: String,
    /// starting, healthy, unhealthy; None without a health check.
    pub health: Option<String>,
    pub exit_code: i64,
    pub restart_count: i64,
    pub restart_policy: String,
    pub started_at: String,
    pub oom_killed: bool,
    /// Published host ports (host ip, port, protocol).
    pub ports: Vec<(String, u16, String)>,
}

impl Engine {
    /// Data root and storage driver (`docker info`).
    pub async fn data_root(&self) -> Result<String> {
        let i = self.docker.info().await.map_err(|e| unreachable(&self.address, e))?;
        Ok(i.docker_root_dir.unwrap_or_default())
    }

    /// Tag an image (by id) as `reference`.
    pub async fn tag(&self, id: &str, reference: &str) -> Result<()> {
        let (repo, tag) = split_reference(reference);
        let opts = bollard::query_parameters::TagImageOptions {
            repo: Some(repo),
            tag: Some(tag),
        };
        self.docker
            .tag_image(id, Some(opts))
            .await
            .map_err(|e| Error::external(format!("cannot tag image {id} as {reference}: {e}")))
    }

    /// `POST /images/load` with a streamed body; returns the engine's messages.
    pub async fn load<S>(&self, body: S) -> Result<Vec<String>>
    where
        S: Stream<Item = io::Result<bytes::Bytes>> + Send + 'static,
    {
        let opts = bollard::query_parameters::ImportImageOptions {
            quiet: true,
            ..Default::default()
        };
        let mut out = Vec::new();
        let mut stream = self.docker.import_image_stream(opts, body, None);
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(m) = info.error_detail.and_then(|d| d.message) {
                        return Err(Error::external(format!("the Docker engine refused the images: {m}")));
                    }
                    if let Some(s) = info.stream {
                        out.push(s.trim().to_string());
                    }
                }
                Err(e) => {
                    return Err(Error::external(format!(
                        "loading images into the Docker engine at {} failed: {e}",
                        self.address
                    )))
                }
            }
        }
        Ok(out)
    }

    /// Every container of a compose project (running or not).
    pub async fn project_containers(&self, project: &str) -> Result<Vec<ContainerState>> {
        let mut filters = std::collections::HashMap::new();
        filters.insert(
            "label".to_string(),
            vec![format!("com.docker.compose.project={project}")],
        );
        let opts = bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| unreachable(&self.address, e))?;
        let mut out = Vec::new();
        for c in list {
            let Some(id) = c.id else { continue };
            match self.container(&id).await {
                Ok(Some(s)) => out.push(s),
                Ok(None) => {} // removed meanwhile
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.service.cmp(&b.service).then(a.name.cmp(&b.name)));
        Ok(out)
    }

    pub async fn container(&self, id: &str) -> Result<Option<ContainerState>> {
        let c = match self.docker.inspect_container(id, None).await {
            Ok(c) => c,
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => return Ok(None),
            Err(e) => return Err(unreachable(&self.address, e)),
        };
        let state = c.state.unwrap_or_default();
        let labels = c.config.as_ref().and_then(|c| c.labels.clone()).unwrap_or_default();
        let mut ports = Vec::new();
        if let Some(map) = c.host_config.as_ref().and_then(|h| h.port_bindings.clone()) {
            for (key, binds) in map {
                let proto = key.split('/').nth(1).unwrap_or("tcp").to_string();
                for b in binds.unwrap_or_default() {
                    if let Some(p) = b.host_port.and_then(|p| p.parse().ok()) {
                        ports.push((b.host_ip.unwrap_or_default(), p, proto.clone()));
                    }
                }
            }
        }
        Ok(Some(ContainerState {
            id: c.id.unwrap_or_default(),
            name: c.name.unwrap_or_default().trim_start_matches('/').to_string(),
            service: labels.get("com.docker.compose.service").cloned().unwrap_or_default(),
            status: state.status.map(|s| s.to_string()).unwrap_or_default(),
            health: state
                .health
                .and_then(|h| h.status)
                .map(|s| s.to_string())
                .filter(|s| !s.is_empty() && s != "none"),
            exit_code: state.exit_code.unwrap_or(0),
            restart_count: c.restart_count.unwrap_or(0),
            restart_policy: c
                .host_config
                .and_then(|h| h.restart_policy)
                .and_then(|p| p.name)
                .map(|n| n.to_string())
                .unwrap_or_default(),
            started_at: state.started_at.unwrap_or_default(),
            oom_killed: state.oom_killed.unwrap_or(false),
            ports,
        }))
    }

    /// The image a container was created from, as its configuration names it (`None`: no such
    /// container).
    pub async fn container_image(&self, id: &str) -> Result<Option<String>> {
        match self.docker.inspect_container(id, None).await {
            Ok(c) => Ok(Some(c.config.and_then(|c| c.image).unwrap_or_default())),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(unreachable(&self.address, e)),
        }
    }

    /// A container's environment as `NAME -> value` (`None`: no such container). Kept out of
    /// [`ContainerState`], whose `Debug` may be logged: the environment holds secrets.
    pub async fn container_env(&self, id: &str) -> Result<Option<std::collections::BTreeMap<String, String>>> {
        let c = match self.docker.inspect_container(id, None).await {
            Ok(c) => c,
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => return Ok(None),
            Err(e) => return Err(unreachable(&self.address, e)),
        };
        let env = c.config.and_then(|c| c.env).unwrap_or_default();
        Ok(Some(
            env.iter()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
    }

    /// Restart a container (`docker restart`), giving it `grace` to stop.
    pub async fn restart(&self, id: &str, grace: std::time::Duration) -> Result<()> {
        let opts = bollard::query_parameters::RestartContainerOptions {
            t: Some(grace.as_secs().min(i32::MAX as u64) as i32),
            ..Default::default()
        };
        self.docker
            .restart_container(id, Some(opts))
            .await
            .map_err(|e| Error::external(format!("cannot restart container {id}: {e}")))
    }

    /// The last `lines` lines of a container's output (stdout and stderr).
    pub async fn logs(&self, id: &str, lines: usize) -> Result<Vec<String>> {
        let opts = bollard::query_parameters::LogsOptions {
            stdout: true,
            stderr: true,
            tail: lines.to_string(),
            ..Default::default()
        };
        let mut s = self.docker.logs(id, Some(opts));
        let mut text = String::new();
        while let Some(item) = s.next().await {
            match item {
                Ok(chunk) => text.push_str(&String::from_utf8_lossy(&chunk.into_bytes())),
                Err(e) => return Err(unreachable(&self.address, e)),
            }
        }
        let all: Vec<String> = text.lines().map(str::to_string).collect();
        Ok(all[all.len().saturating_sub(lines)..].to_vec())
    }
}

/// `repo[:tag]` (a registry port's colon is not a tag separator).
pub fn split_reference(reference: &str) -> (String, String) {
    let reference = reference.split('@').next().unwrap_or(reference);
    let slash = reference.rfind('/').map(|i| i + 1).unwrap_or(0);
    match reference[slash..].rfind(':') {
        Some(i) => (
            reference[..slash + i].to_string(),
            reference[slash + i + 1..].to_string(),
        ),
        None => (reference.to_string(), "latest".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_at_the_tag_not_the_registry_port() {
        assert_eq!(split_reference("redis:5"), ("redis".into(), "5".into()));
        assert_eq!(
            split_reference("127.0.0.1:5000/a/b:1"),
            ("127.0.0.1:5000/a/b".into(), "1".into())
        );
        assert_eq!(
            split_reference("127.0.0.1:5000/a/b"),
            ("127.0.0.1:5000/a/b".into(), "latest".into())
        );
    }
}
