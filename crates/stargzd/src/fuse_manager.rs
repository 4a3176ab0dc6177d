//! The FUSE manager's daemon side: the `[fuse_manager]` config section, the line-delimited
//! JSON protocol spoken over its root-only unix socket, starting the detached
//! `stargz-fuse-manager` process, and the [`ManagerClient`] that mounts layers through it.
//!
//! The manager holds the FUSE sessions, fetchers and chunk cache, so layer mounts (and the
//! containers reading them) outlive a restart or crash of `containerd-stargz-grpc`.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use snapshotter::RemoteFs;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::config::DaemonConfig;
use crate::remote::{DaemonRemote, FuseRemote};

/// The manager's executable, looked up next to the daemon's own, then on `PATH`.
pub const BINARY_NAME: &str = "stargz-fuse-manager";
/// The socket's file name, in the directory of the daemon's `--address`.
pub const SOCKET_NAME: &str = "fuse-manager.sock";
/// Under the daemon's root: the manager's log and pid file.
pub const LOG_NAME: &str = "fuse-manager.log";
#[allow(dead_code)] // written by stargz-fuse-manager
pub const PID_NAME: &str = "fuse-manager.pid";

/// How long a freshly started manager gets to answer.
const START_WAIT: Duration = Duration::from_secs(15);
/// Mounts wait for the TOC (and prefetch); everything else answers at once.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(300);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// `[fuse_manager]`: the reference's keys. Enabled by default here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuseManagerConfig {
    pub enable: bool,
    /// Socket; default `fuse-manager.sock` next to the daemon's socket.
    pub address: Option<PathBuf>,
    /// Executable; default `stargz-fuse-manager` next to the daemon, else on `PATH`.
    pub path: Option<PathBuf>,
}

impl Default for FuseManagerConfig {
    fn default() -> Self {
        FuseManagerConfig {
            enable: true,
            address: None,
            path: None,
        }
    }
}

#[derive(Deserialize)]
struct RawSection {
    enable: Option<bool>,
    address: Option<PathBuf>,
    path: Option<PathBuf>,
    #[serde(flatten)]
    other: toml::Table,
}

#[derive(Deserialize)]
struct RawTop {
    fuse_manager: Option<RawSection>,
}

impl FuseManagerConfig {
    /// The `[fuse_manager]` section of the config text; errors carry positions.
    pub fn parse(text: &str) -> Result<FuseManagerConfig> {
        let top: RawTop = toml::from_str(text)?;
        let Some(raw) = top.fuse_manager else {
            return Ok(FuseManagerConfig::default());
        };
        for k in raw.other.keys() {
            tracing::warn!(key = %format!("fuse_manager.{k}"), "unknown config key ignored");
        }
        let empty = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
        Ok(FuseManagerConfig {
            enable: raw.enable.unwrap_or(true),
            address: empty(raw.address),
            path: empty(raw.path),
        })
    }
}

/// One request per connection, one JSON line each way.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness; answers with the manager's pid.
    Status,
    Mount {
        mountpoint: PathBuf,
        labels: HashMap<String, String>,
    },
    Check {
        mountpoint: PathBuf,
    },
    Unmount {
        mountpoint: PathBuf,
    },
    /// Mount points currently served.
    List,
    /// Per-mount counters as text lines.
    Metrics,
    /// Unmount everything and exit.
    Shutdown,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `status`: digest of the config file the manager was started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
}

/// Digest of the config file's text (a missing file counts as empty), so the daemon
/// can tell when a running manager serves with another configuration.
pub fn config_digest(path: &Path) -> String {
    use sha2::Digest;
    let text = std::fs::read(path).unwrap_or_default();
    format!("{:x}", sha2::Sha256::digest(&text))
}

#[allow(dead_code)] // the server side, in stargz-fuse-manager
impl Response {
    pub fn ok() -> Response {
        Response {
            ok: true,
            ..Default::default()
        }
    }
    pub fn from_result(r: std::result::Result<(), String>) -> Response {
        match r {
            Ok(()) => Response::ok(),
            Err(e) => Response {
                error: Some(e),
                ..Default::default()
            },
        }
    }
}

/// Why a call failed: nobody serves the socket, or the manager answered with an error.
#[derive(Debug)]
enum CallError {
    Unreachable(std::io::Error),
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(e) => write!(f, "FUSE manager unreachable: {e}"),
            CallError::Failed(e) => f.write_str(e),
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
        .map_err(|_| CallError::Failed(format!("FUSE manager: no answer within {timeout:?}")))?
        .map_err(|e| CallError::Failed(format!("FUSE manager: {e}")))?;
    if resp.ok {
        Ok(resp)
    } else {
        Err(CallError::Failed(
            resp.error.unwrap_or_else(|| "FUSE manager: failed".into()),
        ))
    }
}

/// How to start a manager: what the daemon itself was started with.
#[derive(Clone, Debug)]
pub struct Launch {
    pub binary: PathBuf,
    pub socket: PathBuf,
    pub root: PathBuf,
    pub config: PathBuf,
    pub log_level: String,
}

impl Launch {
    /// The manager for a daemon serving `address` with state under `root`.
    pub fn new(
        cfg: &FuseManagerConfig,
        address: &Path,
        root: &Path,
        config: &Path,
        log_level: &str,
    ) -> Launch {
        let socket = cfg
            .address
            .clone()
            .unwrap_or_else(|| address.parent().unwrap_or(Path::new("/")).join(SOCKET_NAME));
        let binary = cfg.path.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|d| d.join(BINARY_NAME)))
                .filter(|p| p.exists())
                .unwrap_or_else(|| PathBuf::from(BINARY_NAME))
        });
        // The manager runs with `/` as its working directory.
        let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        Launch {
            binary,
            socket: absolute(&socket),
            root: absolute(root),
            config: absolute(config),
            log_level: log_level.to_string(),
        }
    }

    /// Starts the manager in its own session, so it outlives the daemon (SIGKILL, or
    /// systemd's `KillMode=process`), logging to `ROOT/fuse-manager.log`. The
    /// registry credentials reach it through the config file and the inherited
    /// environment (`DOCKER_CONFIG`, `HOME`), never its command line.
    fn spawn(&self) -> Result<std::process::Child> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))?;
        let log_path = self.root.join(LOG_NAME);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--address")
            .arg(&self.socket)
            .arg("--root")
            .arg(&self.root)
            .arg("--config")
            .arg(&self.config)
            .arg("--log-level")
            .arg(&self.log_level)
            .current_dir("/")
            // The manager is not the unit's main process; it must not talk to systemd.
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log file")?)
            .stderr(log);
        // SAFETY: setsid(2) is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn()
            .with_context(|| format!("starting {}", self.binary.display()))
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
    async fn warn_if_config_changed(&self, config: &Path) {
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
    async fn call_starting(&self, req: Request, timeout: Duration) -> Result<Response, String> {
        match call(&self.launch.socket, &req, timeout).await {
            Err(CallError::Unreachable(e)) => {
                tracing::warn!(error = %e, "no FUSE manager answers; starting one");
                self.ensure_running().await.map_err(|e| format!("{e:#}"))?;
                call(&self.launch.socket, &req, timeout)
                    .await
                    .map_err(|e| e.to_string())
            }
            other => other.map_err(|e| e.to_string()),
        }
    }

    /// The manager's metrics in Prometheus text form. Never starts a manager.
    pub async fn metrics_text(&self) -> Result<String> {
        let resp = call(&self.launch.socket, &Request::Metrics, CALL_TIMEOUT)
            .await
            .map_err(|e| anyhow::anyhow!("FUSE manager: {e}"))?;
        if !resp.ok {
            anyhow::bail!("FUSE manager metrics: {}", resp.error.unwrap_or_default());
        }
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
            anyhow::bail!("FUSE manager shutdown: {}", resp.error.unwrap_or_default());
        }
        tracing::info!("FUSE manager stopped");
        Ok(())
    }
}

impl RemoteFs for ManagerClient {
    async fn mount(
        &self,
        mountpoint: &Path,
        labels: &HashMap<String, String>,
    ) -> Result<(), String> {
        let req = Request::Mount {
            mountpoint: mountpoint.to_path_buf(),
            labels: labels.clone(),
        };
        self.call_starting(req, MOUNT_TIMEOUT).await.map(|_| ())
    }

    async fn check(&self, mountpoint: &Path, _: &HashMap<String, String>) -> Result<(), String> {
        let req = Request::Check {
            mountpoint: mountpoint.to_path_buf(),
        };
        self.call_starting(req, CALL_TIMEOUT).await.map(|_| ())
    }

    async fn unmount(&self, mountpoint: &Path) -> Result<(), String> {
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
            Err(e) => Err(e.to_string()),
        }
    }

    async fn mounted(&self) -> Result<Vec<PathBuf>, String> {
        self.call_starting(Request::List, CALL_TIMEOUT)
            .await
            .map(|r| r.mounts)
    }
}

fn detach(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// What the daemon mounts layers with, per config: nothing, a FUSE manager (the
/// default), or FUSE sessions inside the daemon (`[fuse_manager] enable = false`, or
/// when the manager cannot be started). The manager client is returned too, so
/// SIGINT can stop it.
pub async fn daemon_remote(
    cfg: DaemonConfig,
    address: &Path,
    root: &Path,
    config: &Path,
    log_level: &str,
    metrics: &crate::metrics::DaemonMetrics,
) -> (DaemonRemote, Option<Arc<ManagerClient>>) {
    if cfg.disable_remote_snapshots {
        tracing::info!("remote snapshots disabled by config");
        return (DaemonRemote::Disabled(snapshotter::NoRemote), None);
    }
    if cfg.fuse_manager.enable {
        let launch = Launch::new(&cfg.fuse_manager, address, root, config, log_level);
        let client = Arc::new(ManagerClient::new(launch));
        match client.ensure_running().await {
            Ok(pid) => {
                tracing::info!(pid, "layers are mounted by the FUSE manager");
                client.warn_if_config_changed(config).await;
                return (DaemonRemote::Manager(client.clone()), Some(client));
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"),
                "FUSE manager unavailable; mounting in this process (mounts end with it)"),
        }
    }
    match FuseRemote::new(cfg.fs, cfg.registry, &root.join("stargz"), metrics) {
        Ok(f) => (DaemonRemote::Fuse(Box::new(f)), None),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "remote snapshots unavailable; every layer will be downloaded");
            (DaemonRemote::Disabled(snapshotter::NoRemote), None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_keys() {
        assert_eq!(
            FuseManagerConfig::parse("noprefetch = true\n").unwrap(),
            FuseManagerConfig::default()
        );
        let c = FuseManagerConfig::parse(
            "[fuse_manager]\nenable = false\naddress = \"/run/x.sock\"\npath = \"\"\n",
        )
        .unwrap();
        assert!(!c.enable);
        assert_eq!(c.address.as_deref(), Some(Path::new("/run/x.sock")));
        assert_eq!(c.path, None);
        let e = format!(
            "{:#}",
            FuseManagerConfig::parse("[fuse_manager]\nenable = 1\n").unwrap_err()
        );
        assert!(e.contains("enable") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn default_socket_is_next_to_the_daemons() {
        let l = Launch::new(
            &FuseManagerConfig::default(),
            Path::new("/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"),
            Path::new("/var/lib/containerd-stargz-grpc"),
            Path::new("/etc/containerd-stargz-grpc/config.toml"),
            "info",
        );
        assert_eq!(
            l.socket,
            Path::new("/run/containerd-stargz-grpc/fuse-manager.sock")
        );
    }

    #[test]
    fn protocol_lines() {
        let r: Request = serde_json::from_str(r#"{"op":"check","mountpoint":"/m"}"#).unwrap();
        assert!(matches!(r, Request::Check { mountpoint } if mountpoint == Path::new("/m")));
        let text = serde_json::to_string(&Response::from_result(Err("gone".into()))).unwrap();
        assert_eq!(text, r#"{"ok":false,"error":"gone"}"#);
    }
}
