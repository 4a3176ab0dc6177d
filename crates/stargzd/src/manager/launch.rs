//! Where the FUSE manager lives and how the daemon starts it: its executable, socket,
//! log and pid file, and the detached process itself.

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::config::FuseManagerConfig;

/// The manager's executable, looked up next to the daemon's own, then on `PATH`.
pub const BINARY_NAME: &str = "stargz-fuse-manager";
/// The socket's file name, in the directory of the daemon's `--address`.
pub const SOCKET_NAME: &str = "fuse-manager.sock";
/// Under the daemon's root: the manager's log.
pub const LOG_NAME: &str = "fuse-manager.log";
/// Under the daemon's root: the manager's pid, written by the manager.
pub const PID_NAME: &str = "fuse-manager.pid";

/// How to start a manager: what the daemon itself was started with.
#[derive(Clone, Debug)]
pub struct Launch {
    pub binary: PathBuf,
    pub socket: PathBuf,
    pub root: PathBuf,
    pub config: PathBuf,
    pub log_level: String,
    /// Set after [`Launch::new`]; text unless the daemon logs JSON.
    pub log_format: crate::logging::LogFormat,
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
            log_format: crate::logging::LogFormat::Text,
        }
    }

    /// Starts the manager in its own session, so it outlives the daemon (SIGKILL, or
    /// systemd's `KillMode=process`), logging to `ROOT/fuse-manager.log`. The
    /// registry credentials reach it through the config file and the inherited
    /// environment (`DOCKER_CONFIG`, `HOME`), never its command line.
    pub fn spawn(&self) -> Result<std::process::Child> {
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
            .arg("--log-format")
            .arg(self.log_format.as_str())
            .current_dir("/")
            // The manager is not the unit's main process; it must not talk to systemd.
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log file")?)
            .stderr(log);
        // SAFETY: setsid(2) is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(drop)
                    .map_err(std::io::Error::from)
            });
        }
        cmd.spawn()
            .with_context(|| format!("starting {}", self.binary.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
