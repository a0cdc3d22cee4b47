//! The Docker Engine, through its API (bollard), behind the few calls bkbundle makes.
//!
//! Connection follows Docker's own rules (`DOCKER_HOST`, else the local socket) and negotiates the
//! API version down to what the engine speaks, so an older engine (20.10 is common in the field)
//! works. Errors name the engine address and say how to get it running.

use crate::error::{Error, Kind, Result};
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

    /// Pull `reference` through the engine (which uses its own registry configuration and
    /// credentials): pack's pull of a recipe's image that is not here.
    pub async fn pull(&self, reference: &str) -> Result<()> {
        self.pull_with(reference, None, &|_| {})
            .await
            .map_err(|e| pull_error(reference, e))
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

/// How the engine treats registries (`docker info`): what `install --images-from` needs to know
/// before it asks the engine to pull over plain HTTP.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// `insecure-registries` given as CIDRs (127.0.0.0/8 by default).
    pub insecure_cidrs: Vec<String>,
    /// Registries by name (`host:port`) and whether the engine insists on verified TLS there.
    pub secure: std::collections::BTreeMap<String, bool>,
}

impl Engine {
    /// Pull `reference` from a registry with `credentials` (sent to the engine, never logged).
    /// `progress` is called with every increase of the bytes downloaded. `Err` is the engine's
    /// own message, for the caller to put in context.
    pub async fn pull_with(
        &self,
        reference: &str,
        credentials: Option<&crate::registry::Credentials>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> std::result::Result<(), String> {
        let opts = bollard::query_parameters::CreateImageOptions {
            from_image: Some(reference.to_string()),
            ..Default::default()
        };
        let auth = credentials.map(|c| bollard::auth::DockerCredentials {
            username: Some(c.username.clone()),
            password: Some(c.password.as_str().to_string()),
            serveraddress: Some(reference.split('/').next().unwrap_or_default().to_string()),
            ..Default::default()
        });
        let mut stream = self.docker.create_image(Some(opts), None, auth);
        // Bytes downloaded so far, per layer (the engine reports running totals).
        let mut seen: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| e.to_string())?;
            if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                return Err(detail);
            }
            let downloading = info.status.as_deref() == Some("Downloading");
            if let (true, Some(id), Some(current)) =
                (downloading, info.id, info.progress_detail.and_then(|d| d.current))
            {
                let current = current.max(0) as u64;
                let before = seen.insert(id, current).unwrap_or(0);
                if current > before {
                    progress(current - before);
                }
            }
        }
        Ok(())
    }

    /// Remove the name `reference` (not the image while other names or containers use it; no
    /// parent images pruned). A name that is not there is not an error.
    pub async fn untag(&self, reference: &str) -> Result<()> {
        let opts = bollard::query_parameters::RemoveImageOptions {
            force: false,
            noprune: true,
            ..Default::default()
        };
        match self.docker.remove_image(reference, Some(opts), None).await {
            Ok(_) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(e) => Err(Error::external(format!(
                "cannot remove the image name {reference}: {e}"
            ))),
        }
    }

    /// What the engine's layer store holds, for a load that leaves out what it has: the chain id
    /// of every layer of every image (`GET /images/json?all=1`, then each image's `RootFS`), and
    /// whether images are kept in containerd's store, whose load wants every layer.
    pub async fn layers(&self) -> Result<crate::delta::EngineLayers> {
        let i = self.docker.info().await.map_err(|e| unreachable(&self.address, e))?;
        let containerd_store = i
            .driver_status
            .unwrap_or_default()
            .iter()
            .any(|kv| kv.len() == 2 && kv[0] == "driver-type" && kv[1].contains("containerd"));
        let opts = bollard::query_parameters::ListImagesOptions {
            all: true,
            ..Default::default()
        };
        let list = self
            .docker
            .list_images(Some(opts))
            .await
            .map_err(|e| Error::external(format!("cannot list the Docker engine's images: {e}")))?;
        let mut chains = std::collections::BTreeSet::new();
        for img in list {
            // An image removed between the list and its inspection has no layers to offer.
            let Ok(found) = self.docker.inspect_image(&img.id).await else {
                continue;
            };
            let diffs = found.root_fs.and_then(|r| r.layers).unwrap_or_default();
            chains.extend(crate::delta::chain_ids(&diffs));
        }
        Ok(crate::delta::EngineLayers {
            chains,
            containerd_store,
        })
    }

    /// The engine's registry configuration (`docker info`).
    pub async fn registry_config(&self) -> Result<RegistryConfig> {
        let i = self.docker.info().await.map_err(|e| unreachable(&self.address, e))?;
        let rc = i.registry_config.unwrap_or_default();
        Ok(RegistryConfig {
            insecure_cidrs: rc.insecure_registry_cidrs.unwrap_or_default(),
            secure: rc
                .index_configs
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.secure.unwrap_or(true)))
                .collect(),
        })
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
    /// The reference the container was created from (the compose file's `image:`).
    pub image: String,
    /// The id of the image it runs.
    pub image_id: String,
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
            image: c.config.as_ref().and_then(|c| c.image.clone()).unwrap_or_default(),
            image_id: c.image.clone().unwrap_or_default(),
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

/// How a command run in a container ([`Engine::exec_read`], [`Engine::exec_write`]) ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutcome {
    /// None when the engine reported none (the process still ran after the output ended).
    pub exit_code: Option<i64>,
    /// The end of stdout (at most [`EXEC_TAIL_BYTES`]); empty for [`Engine::exec_read`], whose
    /// stdout went to its writer.
    pub stdout_tail: String,
    /// The end of stderr (at most [`EXEC_TAIL_BYTES`]), where tools say what failed.
    pub stderr_tail: String,
}

impl ExecOutcome {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// How much of a stream [`ExecOutcome`] keeps: the end, where the error is.
pub const EXEC_TAIL_BYTES: usize = 64 * 1024;

/// Size of the reads from [`Engine::exec_write`]'s input.
const EXEC_INPUT_CHUNK: usize = 1024 * 1024;

/// How long the exit code may lag behind the end of the output.
const EXEC_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The last `cap` bytes of a stream, in bounded memory.
#[derive(Debug)]
pub(crate) struct Tail {
    buf: Vec<u8>,
    cap: usize,
    cut: bool,
}

impl Tail {
    pub(crate) fn new(cap: usize) -> Tail {
        Tail {
            buf: Vec::new(),
            cap,
            cut: false,
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        if bytes.len() >= self.cap {
            self.cut |= !self.buf.is_empty() || bytes.len() > self.cap;
            self.buf.clear();
            self.buf.extend_from_slice(&bytes[bytes.len() - self.cap..]);
            return;
        }
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > self.cap {
            let excess = self.buf.len() - self.cap;
            self.buf.drain(..excess);
            self.cut = true;
        }
    }

    /// The text kept; when the start was cut, from the first whole line on (a cut may split a
    /// character), after a line saying so.
    pub(crate) fn into_string(self) -> String {
        if !self.cut {
            return String::from_utf8_lossy(&self.buf).into_owned();
        }
        let start = self.buf.iter().position(|b| *b == b'\n').map(|i| i + 1).unwrap_or(0);
        format!("[earlier output cut]\n{}", String::from_utf8_lossy(&self.buf[start..]))
    }
}

/// A command as errors show it: arguments that are scripts (several lines, or long) elided, so
/// the message stays readable and shows what ran (`/bin/sh -c … pg_dump -Fc`). Never holds
/// environment values: callers pass secrets only through `env`.
pub fn display_command(cmd: &[String]) -> String {
    cmd.iter()
        .map(|a| {
            if a.contains('\n') || a.chars().count() > 60 {
                "…".to_string()
            } else if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"\\$`".contains(c)) {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A container as messages name it: a full id shortened as docker ps shows it, a name as is.
fn display_container(container: &str) -> &str {
    if container.len() == 64 && container.bytes().all(|b| b.is_ascii_hexdigit()) {
        &container[..12]
    } else {
        container
    }
}

/// Runs `f`, which blocks (a caller's reader or writer), without stalling the other tasks of a
/// multi-threaded runtime; on a current-thread runtime (tests) it simply runs.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Streamed commands in a container (`docker exec` without a TTY, so stdout and stderr arrive
/// multiplexed and stay apart). The output is never collected whole: stdout goes to the caller's
/// writer as it arrives, and only the tails of the rest are kept.
impl Engine {
    /// Runs `cmd` in `container` (id or name) with `env` added to the container's environment,
    /// stdin closed; stdout is written to `out` chunk by chunk as it arrives, stderr kept as a
    /// tail. Returns how the process ended: a non-zero exit is the caller's to judge.
    pub async fn exec_read(
        &self,
        container: &str,
        cmd: &[String],
        env: &[String],
        out: &mut (dyn io::Write + Send),
    ) -> Result<ExecOutcome> {
        let (exec_id, output, _input) = self.exec_start(container, cmd, env, false).await?;
        let write_error = |e: io::Error| {
            Error::new(
                Kind::Io,
                format!(
                    "cannot write the output of `{}` from container {}: {e}",
                    display_command(cmd),
                    display_container(container)
                ),
            )
        };
        let mut stderr = Tail::new(EXEC_TAIL_BYTES);
        self.drain(container, cmd, output, &mut stderr, |chunk| {
            blocking(|| out.write_all(chunk)).map_err(write_error)
        })
        .await?;
        blocking(|| out.flush()).map_err(write_error)?;
        Ok(ExecOutcome {
            exit_code: self.exec_exit_code(container, cmd, &exec_id).await?,
            stdout_tail: String::new(),
            stderr_tail: stderr.into_string(),
        })
    }

    /// Runs `cmd` in `container` (id or name) with `env` added to the container's environment,
    /// its stdin fed from `input` to the end, then closed, so that a process reading to the end
    /// of its input finishes; stdout and stderr kept as tails.
    ///
    /// The end of the input is a half-close of the attach connection (the engine then closes the
    /// process's stdin; see `exec_write_closes_stdin` in the tests). A process that exits before
    /// reading everything (a failed `pg_restore --exit-on-error`) is judged by its exit code: the
    /// rest of the input is not read. A read error of `input` is an error, but the process has
    /// then seen the end of its input all the same (the Engine API cannot kill an exec'd
    /// process): feed it only formats whose truncation it detects.
    pub async fn exec_write(
        &self,
        container: &str,
        cmd: &[String],
        env: &[String],
        input: &mut (dyn io::Read + Send),
    ) -> Result<ExecOutcome> {
        use tokio::io::AsyncWriteExt;
        let (exec_id, output, stdin) = self.exec_start(container, cmd, env, true).await?;
        let mut stdin = stdin.ok_or_else(|| {
            Error::internal(format!(
                "the Docker engine attached no stdin to `{}` in container {}",
                display_command(cmd),
                display_container(container)
            ))
        })?;
        // The input is fed while the output is drained: a process that writes while it reads
        // (pg_restore's notices) would otherwise block on a full pipe, and we on it.
        let feed = async {
            let mut buf = vec![0u8; EXEC_INPUT_CHUNK];
            let result: std::result::Result<(), FeedError> = loop {
                let n = match blocking(|| input.read(&mut buf)) {
                    Ok(0) => break Ok(()),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => break Err(FeedError::Input(e)),
                };
                if let Err(e) = stdin.write_all(&buf[..n]).await {
                    break Err(FeedError::Stdin(e));
                }
            };
            // EOF for the process, also after a failed read: it must end either way (see above).
            let _ = stdin.shutdown().await;
            result
        };
        let mut stdout = Tail::new(EXEC_TAIL_BYTES);
        let mut stderr = Tail::new(EXEC_TAIL_BYTES);
        let fed = {
            let drain = self.drain(container, cmd, output, &mut stderr, |chunk| {
                stdout.push(chunk);
                Ok(())
            });
            let mut feed = std::pin::pin!(feed);
            let mut drain = std::pin::pin!(drain);
            let mut fed = None;
            // The output ends when the process has exited; a write still pending then is
            // abandoned.
            loop {
                tokio::select! {
                    f = &mut feed, if fed.is_none() => fed = Some(f),
                    d = &mut drain => break d.map(|()| fed),
                }
            }
        }?;
        let exit_code = self.exec_exit_code(container, cmd, &exec_id).await?;
        match fed {
            Some(Err(FeedError::Input(e))) => {
                return Err(Error::new(
                    Kind::Io,
                    format!(
                        "reading the input of `{}` in container {} failed: {e}; the command saw its \
                         input end there (exit code {})",
                        display_command(cmd),
                        display_container(container),
                        exit_code.map(|c| c.to_string()).unwrap_or_else(|| "unknown".into())
                    ),
                ))
            }
            Some(Err(FeedError::Stdin(e))) => {
                tracing::debug!(
                    "`{}` in container {} stopped taking its input: {e}",
                    display_command(cmd),
                    display_container(container)
                )
            }
            Some(Ok(())) | None => {}
        }
        Ok(ExecOutcome {
            exit_code,
            stdout_tail: stdout.into_string(),
            stderr_tail: stderr.into_string(),
        })
    }

    /// Creates and starts an exec of `cmd`, attached (stdin only if `stdin`).
    async fn exec_start(
        &self,
        container: &str,
        cmd: &[String],
        env: &[String],
        stdin: bool,
    ) -> Result<(String, ExecOutput, Option<ExecInput>)> {
        let fail = |what: &str, e: bollard::errors::Error| {
            let gone = matches!(
                e,
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 404 | 409,
                    ..
                }
            );
            let e = Error::external(format!(
                "cannot {what} `{}` in container {} (Docker engine at {}): {e}",
                display_command(cmd),
                display_container(container),
                self.address
            ));
            if gone {
                e.hint(format!(
                    "the container must exist and run: check with `docker ps -a | grep {}`",
                    display_container(container)
                ))
            } else {
                e
            }
        };
        let config = bollard::exec::CreateExecOptions {
            attach_stdin: Some(stdin),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            env: Some(env.to_vec()),
            cmd: Some(cmd.to_vec()),
            ..Default::default()
        };
        let created = self
            .docker
            .create_exec(container, config)
            .await
            .map_err(|e| fail("create an exec of", e))?;
        let started = self
            .docker
            .start_exec(
                &created.id,
                Some(bollard::exec::StartExecOptions {
                    detach: false,
                    tty: false,
                    output_capacity: None,
                }),
            )
            .await
            .map_err(|e| fail("start", e))?;
        match started {
            bollard::exec::StartExecResults::Attached { output, input } => {
                Ok((created.id, output, stdin.then_some(input)))
            }
            bollard::exec::StartExecResults::Detached => Err(Error::internal(format!(
                "the Docker engine started `{}` in container {} detached, not attached",
                display_command(cmd),
                display_container(container)
            ))),
        }
    }

    /// Reads the multiplexed output to its end: stdout chunks to `on_stdout`, stderr to `stderr`.
    async fn drain(
        &self,
        container: &str,
        cmd: &[String],
        mut output: ExecOutput,
        stderr: &mut Tail,
        mut on_stdout: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        while let Some(item) = output.next().await {
            let item = item.map_err(|e| {
                Error::external(format!(
                    "the output of `{}` in container {} broke off (Docker engine at {}): {e}",
                    display_command(cmd),
                    display_container(container),
                    self.address
                ))
            })?;
            match item {
                bollard::container::LogOutput::StdOut { message } => on_stdout(&message)?,
                bollard::container::LogOutput::StdErr { message } => stderr.push(&message),
                bollard::container::LogOutput::StdIn { .. } => {}
                // Without a TTY every frame has a header; bollard hands out a frame cut short by
                // the end of the connection as Console: the output is incomplete.
                bollard::container::LogOutput::Console { message } => {
                    return Err(Error::external(format!(
                        "the output of `{}` in container {} ended inside a frame ({} bytes of a \
                         frame): the Docker engine's connection closed early",
                        display_command(cmd),
                        display_container(container),
                        message.len()
                    )))
                }
            }
        }
        Ok(())
    }

    /// The exit code of a finished exec; the engine may record it a moment after the output ends.
    async fn exec_exit_code(&self, container: &str, cmd: &[String], exec_id: &str) -> Result<Option<i64>> {
        let deadline = tokio::time::Instant::now() + EXEC_EXIT_WAIT;
        loop {
            let inspect = self.docker.inspect_exec(exec_id).await.map_err(|e| {
                Error::external(format!(
                    "cannot read the exit code of `{}` in container {} (Docker engine at {}): {e}",
                    display_command(cmd),
                    display_container(container),
                    self.address
                ))
            })?;
            if inspect.running != Some(true) || tokio::time::Instant::now() >= deadline {
                return Ok(inspect.exit_code.filter(|_| inspect.running != Some(true)));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

type ExecOutput = std::pin::Pin<
    Box<dyn Stream<Item = std::result::Result<bollard::container::LogOutput, bollard::errors::Error>> + Send>,
>;
type ExecInput = std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>;

/// Why feeding an exec's stdin stopped.
enum FeedError {
    /// The caller's input failed.
    Input(io::Error),
    /// The process no longer takes input (it exited).
    Stdin(io::Error),
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
    fn a_tail_keeps_the_last_bytes_in_bounded_memory() {
        let mut t = Tail::new(16);
        t.push(b"short");
        assert_eq!(Tail::new(16).into_string(), "");
        let mut whole = Tail::new(16);
        whole.push(b"exactly sixteen!");
        assert_eq!(
            whole.into_string(),
            "exactly sixteen!",
            "a full tail that lost nothing is not cut"
        );
        for _ in 0..1000 {
            t.push(b"line of noise\n");
            assert!(t.buf.len() <= 16);
        }
        t.push(b"ERROR: boom\n");
        // Cut: from the first whole line on, after a line saying so.
        assert_eq!(t.into_string(), "[earlier output cut]\nERROR: boom\n");

        let mut big = Tail::new(8);
        big.push(&[b'x'; 100]);
        big.push(b"\nend");
        assert_eq!(big.buf.len(), 8);
        assert_eq!(big.into_string(), "[earlier output cut]\nend");

        // A multi-byte character split by the cut does not survive as garbage: the text starts
        // at the next line.
        let mut utf = Tail::new(10);
        utf.push("ééééé\nok".as_bytes());
        assert_eq!(utf.into_string(), "[earlier output cut]\nok");
    }

    #[test]
    fn commands_show_scripts_elided_and_arguments_quoted() {
        let cmd: Vec<String> = [
            "/bin/sh",
            "-c",
            "set -e\nexec \"$@\"",
            "name",
            "pg_dump",
            "-Fc",
            "a b",
            "it's",
            "",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            display_command(&cmd),
            r#"/bin/sh -c … name pg_dump -Fc 'a b' 'it'\''s' ''"#
        );
        assert_eq!(display_command(&["x".repeat(61)]), "…");
        assert_eq!(display_container(&"a".repeat(64)), "aaaaaaaaaaaa");
        assert_eq!(display_container("bklite-postgres-1"), "bklite-postgres-1");
    }

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
