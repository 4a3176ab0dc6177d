//! The daemon's side of the FUSE manager: [`ManagerClient`], the [`RemoteFs`] that
//! mounts layers through the manager process and starts one whenever none answers.
//!
//! The manager holds the FUSE sessions, fetchers and chunk cache, so layer mounts (and
//! the containers reading them) outlive a restart or crash of `containerd-stargz-grpc`.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use remote_layer::{MountError, RemoteLayer};
use snapshotter::RemoteFs;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::config::config_digest;
use crate::manager::launch::{Launch, LOG_NAME};
use crate::manager::protocol::{Request, Response};

/// How long a freshly started manager gets to answer.
const START_WAIT: Duration = Duration::from_secs(15);
/// Mounts wait for the TOC (and prefetch); everything else answers at once.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(300);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call failed: nobody serves the socket, or the call itself failed.
#[derive(Debug)]
enum CallError {
    Unreachable(std::io::Error),
    Failed(MountError),
}

impl CallError {
    fn into_mount_error(self) -> MountError {
        match self {
            CallError::Unreachable(e) => {
                MountError::Unavailable(format!("FUSE manager unreachable: {e}"))
            }
            CallError::Failed(e) => e,
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(e) => write!(f, "FUSE manager unreachable: {e}"),
            CallError::Failed(e) => write!(f, "{e}"),
        }
    }
}

async fn exchange(stream: &mut UnixStream, req: &Request) -> std::io::Result<Response> {
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    if reader.read_line(&mut answer).await? == 0 {
        return Err(std::io::Error::new(
            ErrorKind::UnexpectedEof,
            "the FUSE manager closed the connection",
        ));
    }
    Ok(serde_json::from_str(&answer)?)
}

/// Sends `req` on a new connection. Connection errors are `Unreachable`.
async fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, CallError> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(CallError::Unreachable)?;
    let resp = tokio::time::timeout(timeout, exchange(&mut stream, req))
        .await
        .map_err(|_| {
            CallError::Failed(MountError::Timeout(format!(
                "FUSE manager: no answer within {timeout:?}"
            )))
        })?
        .map_err(|e| CallError::Failed(MountError::Unavailable(format!("FUSE manager: {e}"))))?;
    if resp.ok {
        Ok(resp)
    } else {
        Err(CallError::Failed(resp.failure()))
    }
}

/// The daemon's [`RemoteFs`] when `[fuse_manager] enable = true`: every mount lives
/// in the manager process, which is started whenever none answers on its socket.
pub struct ManagerClient {
    launch: Launch,
    /// One start at a time: concurrent restores must not start several managers.
    starting: tokio::sync::Mutex<()>,
}

impl ManagerClient {
    pub fn new(launch: Launch) -> ManagerClient {
        ManagerClient {
            launch,
            starting: tokio::sync::Mutex::new(()),
        }
    }

    /// The pid of the manager answering on the socket, starting one when none does.
    pub async fn ensure_running(&self) -> Result<u32> {
        let _guard = self.starting.lock().await;
        if let Ok(r) = call(&self.launch.socket, &Request::Status, CALL_TIMEOUT).await {
            return Ok(r.pid.unwrap_or_default());
        }
        let mut child = self.launch.spawn()?;
        tracing::info!(pid = child.id(), socket = %self.launch.socket.display(),
            binary = %self.launch.binary.display(), "started the FUSE manager");
        let deadline = Instant::now() + START_WAIT;
        let res = loop {
            match call(&self.launch.socket, &Request::Status, CALL_TIMEOUT).await {
                Ok(r) => break Ok(r.pid.unwrap_or_default()),
                Err(e) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        break Err(anyhow::anyhow!(
                            "the FUSE manager exited ({status}); see {}",
                            self.launch.root.join(LOG_NAME).display()
                        ));
                    }
                    if Instant::now() > deadline {
                        break Err(anyhow::anyhow!("the FUSE manager did not answer: {e}"));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Reap it whenever it exits, so it never lingers as a zombie of the daemon.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        res
    }

    /// A manager that outlived the daemon keeps the config it started with.
    pub async fn warn_if_config_changed(&self, config: &Path) {
        let Ok(status) = call(&self.launch.socket, &Request::Status, CALL_TIMEOUT).await else {
            return;
        };
        if status
            .config_digest
            .is_some_and(|d| d != config_digest(config))
        {
            tracing::warn!(config = %config.display(),
                "the running FUSE manager was started with another version of the config file; \
                 stop the daemon with SIGINT and start it again to apply it to layer mounts");
        }
    }

    /// A call that starts a manager first when none answers.
    async fn call_starting(&self, req: Request, timeout: Duration) -> Result<Response, MountError> {
        match call(&self.launch.socket, &req, timeout).await {
            Err(CallError::Unreachable(e)) => {
                tracing::warn!(error = %e, "no FUSE manager answers; starting one");
                self.ensure_running()
                    .await
                    .map_err(|e| MountError::Unavailable(format!("{e:#}")))?;
                call(&self.launch.socket, &req, timeout)
                    .await
                    .map_err(CallError::into_mount_error)
            }
            other => other.map_err(CallError::into_mount_error),
        }
    }

    /// The manager's metrics in Prometheus text form. Never starts a manager.
    pub async fn metrics_text(&self) -> Result<String> {
        let resp = call(&self.launch.socket, &Request::Metrics, CALL_TIMEOUT)
            .await
            .map_err(|e| anyhow::anyhow!("FUSE manager: {e}"))?;
        Ok(resp.text.unwrap_or_default())
    }

    /// Asks the manager to unmount everything and exit, and waits until it has.
    pub async fn shutdown(&self) -> Result<()> {
        let mut stream = match UnixStream::connect(&self.launch.socket).await {
            Ok(s) => s,
            Err(_) => return Ok(()),
        };
        let wait = async {
            let resp = exchange(&mut stream, &Request::Shutdown).await?;
            // The manager closes the connection when it exits.
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
            std::io::Result::Ok(resp)
        };
        let resp = tokio::time::timeout(MOUNT_TIMEOUT, wait)
            .await
            .context("FUSE manager shutdown timed out")?
            .context("FUSE manager shutdown")?;
        if !resp.ok {
            anyhow::bail!("FUSE manager shutdown: {}", resp.failure());
        }
        tracing::info!("FUSE manager stopped");
        Ok(())
    }
}

impl RemoteFs for ManagerClient {
    async fn mount(&self, mountpoint: &Path, layer: &RemoteLayer) -> Result<(), MountError> {
        let req = Request::Mount {
            mountpoint: mountpoint.to_path_buf(),
            layer: layer.clone(),
        };
        self.call_starting(req, MOUNT_TIMEOUT).await.map(|_| ())
    }

    async fn check(&self, mountpoint: &Path) -> Result<(), MountError> {
        let req = Request::Check {
            mountpoint: mountpoint.to_path_buf(),
        };
        self.call_starting(req, CALL_TIMEOUT).await.map(|_| ())
    }

    async fn unmount(&self, mountpoint: &Path) -> Result<(), MountError> {
        let req = Request::Unmount {
            mountpoint: mountpoint.to_path_buf(),
        };
        match call(&self.launch.socket, &req, MOUNT_TIMEOUT).await {
            Ok(_) => Ok(()),
            // With no manager nothing serves the mount; drop what is left of it.
            Err(CallError::Unreachable(_)) => {
                detach(mountpoint);
                Ok(())
            }
            Err(CallError::Failed(e)) => Err(e),
        }
    }

    async fn mounted(&self) -> Result<Vec<PathBuf>, MountError> {
        self.call_starting(Request::List, CALL_TIMEOUT)
            .await
            .map(|r| r.mounts)
    }
}

fn detach(path: &Path) {
    // Nothing mounted there is fine.
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
}
