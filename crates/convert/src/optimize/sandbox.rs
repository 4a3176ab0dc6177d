//! Running the workload: an OCI runtime bundle generated from the image config
//! and the user's overrides, started with `runc run`, its output passed through
//! to the user (and kept for error messages), stopped when asked and deleted.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci_spec::runtime::{
    LinuxNamespaceBuilder, LinuxNamespaceType, Mount, MountBuilder, ProcessBuilder, RootBuilder,
    Spec, UserBuilder,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, Result};

/// The container's configuration beyond what the image says.
#[derive(Clone, Debug, Default)]
pub struct Workload {
    /// Replaces the image's Entrypoint.
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's Cmd.
    pub args: Option<Vec<String>>,
    /// `KEY=VALUE`, added to or overriding the image's Env.
    pub env: Vec<String>,
    /// `user[:group]`, by name or number.
    pub user: Option<String>,
    pub cwd: Option<String>,
    pub mounts: Vec<MountSpec>,
    /// Attach a terminal (needs `stdin`).
    pub terminal: bool,
    /// Pass our stdin to the workload.
    pub stdin: bool,
    /// Share the host's network namespace instead of one with only `lo`.
    pub net_host: bool,
    /// `host:IP` lines for /etc/hosts.
    pub add_hosts: Vec<String>,
    pub dns_nameservers: Vec<String>,
    pub dns_search_domains: Vec<String>,
    pub dns_options: Vec<String>,
}

/// A mount in ctr's `type=...,source=...,destination=...,options=a:b` form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub kind: String,
    pub source: String,
    pub destination: String,
    pub options: Vec<String>,
}

impl MountSpec {
    pub fn parse(s: &str) -> Result<MountSpec> {
        let mut m = MountSpec {
            kind: "none".into(),
            source: String::new(),
            destination: String::new(),
            options: Vec::new(),
        };
        for field in s.split(',') {
            let (k, v) = field.split_once('=').ok_or_else(|| {
                Error::Options(format!("mount {s:?}: {field:?} is not key=value"))
            })?;
            match k {
                "type" => m.kind = v.into(),
                "source" | "src" => m.source = v.into(),
                "destination" | "dst" | "target" => m.destination = v.into(),
                "options" => {
                    m.options = v
                        .split(':')
                        .filter(|o| !o.is_empty())
                        .map(String::from)
                        .collect()
                }
                _ => return Err(Error::Options(format!("mount {s:?}: unknown key {k:?}"))),
            }
        }
        if !m.destination.starts_with('/') {
            return Err(Error::Options(format!(
                "mount {s:?}: destination must be an absolute path"
            )));
        }
        Ok(m)
    }
}

/// What the image config says about running it.
#[derive(Clone, Debug, Default)]
pub struct ImageRunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub user: String,
    pub working_dir: String,
}

impl ImageRunConfig {
    pub fn from_config(config: &serde_json::Value) -> ImageRunConfig {
        let c = config.get("config");
        let strings = |k: &str| -> Vec<String> {
            c.and_then(|c| c.get(k))
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let string = |k: &str| -> String {
            c.and_then(|c| c.get(k))
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        ImageRunConfig {
            entrypoint: strings("Entrypoint"),
            cmd: strings("Cmd"),
            env: strings("Env"),
            user: string("User"),
            working_dir: string("WorkingDir"),
        }
    }
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Builds the runtime spec. `rootfs` is the mounted root, used to resolve user
/// and group names (before anything is recorded).
pub fn build_spec(
    image: &ImageRunConfig,
    w: &Workload,
    rootfs: &Path,
    etc_dir: &Path,
) -> Result<Spec> {
    let spec_err = |e: oci_spec::OciSpecError| Error::Sandbox(format!("runtime spec: {e}"));
    let mut argv = w
        .entrypoint
        .clone()
        .unwrap_or_else(|| image.entrypoint.clone());
    argv.extend(w.args.clone().unwrap_or_else(|| image.cmd.clone()));
    if argv.is_empty() {
        return Err(Error::Options(
            "the image has no Entrypoint or Cmd: give --entrypoint or --args".into(),
        ));
    }
    let env = merge_env(&image.env, &w.env);
    let user_spec = w.user.clone().unwrap_or_else(|| image.user.clone());
    let (uid, gid) = resolve_user(&user_spec, rootfs)?;
    let cwd = w
        .cwd
        .clone()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| image.working_dir.clone());
    let cwd = if cwd.is_empty() { "/".to_string() } else { cwd };
    if !cwd.starts_with('/') {
        return Err(Error::Options(format!(
            "working directory {cwd:?} is not absolute"
        )));
    }

    let mut spec = Spec::default();
    let mut process = ProcessBuilder::default()
        .terminal(w.terminal)
        .args(argv)
        .env(env)
        .cwd(cwd)
        .user(
            UserBuilder::default()
                .uid(uid)
                .gid(gid)
                .build()
                .map_err(spec_err)?,
        )
        .no_new_privileges(true)
        .build()
        .map_err(spec_err)?;
    if let Some(d) = spec.process().as_ref() {
        process.set_rlimits(d.rlimits().clone());
    }
    process.set_capabilities(Some(workload_capabilities()?));
    spec.set_process(Some(process));
    spec.set_hostname(Some("optimize".into()));
    spec.set_root(Some(
        RootBuilder::default()
            .path(rootfs)
            .readonly(false)
            .build()
            .map_err(spec_err)?,
    ));

    let mut mounts: Vec<Mount> = spec.mounts().clone().unwrap_or_default();
    for (file, dest) in [("hosts", "/etc/hosts"), ("resolv.conf", "/etc/resolv.conf")] {
        mounts.push(
            MountBuilder::default()
                .destination(dest)
                .typ("bind")
                .source(etc_dir.join(file))
                .options(vec!["rbind".into(), "ro".into()])
                .build()
                .map_err(spec_err)?,
        );
    }
    for m in &w.mounts {
        let mut options = m.options.clone();
        if m.kind == "bind" && !options.iter().any(|o| o == "bind" || o == "rbind") {
            options.push("rbind".into());
        }
        mounts.push(
            MountBuilder::default()
                .destination(&m.destination)
                .typ(&m.kind)
                .source(&m.source)
                .options(options)
                .build()
                .map_err(spec_err)?,
        );
    }
    spec.set_mounts(Some(mounts));

    if let Some(linux) = spec.linux_mut() {
        if w.net_host {
            if let Some(ns) = linux.namespaces_mut() {
                ns.retain(|n| n.typ() != LinuxNamespaceType::Network);
            }
        }
        // The runtime's defaults deny sysfs writes etc.; nothing else to add.
        linux.set_cgroups_path(None);
    }
    Ok(spec)
}

/// Makes the workload join the network namespace at `path` instead of a new one.
pub fn join_netns(spec: &mut Spec, path: &Path) -> Result<()> {
    let linux = spec
        .linux_mut()
        .as_mut()
        .ok_or_else(|| Error::Sandbox("runtime spec without a linux section".into()))?;
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    namespaces.retain(|n| n.typ() != LinuxNamespaceType::Network);
    namespaces.push(
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Network)
            .path(path)
            .build()
            .map_err(|e| Error::Sandbox(format!("runtime spec: {e}")))?,
    );
    linux.set_namespaces(Some(namespaces));
    Ok(())
}

/// Image Env with the user's entries overriding by key; PATH is ensured.
fn merge_env(image: &[String], user: &[String]) -> Vec<String> {
    let key = |s: &str| {
        s.split_once('=')
            .map_or(s.to_string(), |(k, _)| k.to_string())
    };
    let mut out: Vec<String> = Vec::new();
    for e in image.iter().chain(user) {
        let k = key(e);
        if let Some(slot) = out.iter_mut().find(|o| key(o) == k) {
            *slot = e.clone();
        } else {
            out.push(e.clone());
        }
    }
    if !out.iter().any(|e| key(e) == "PATH") {
        out.insert(0, DEFAULT_PATH.to_string());
    }
    out
}

/// Resolves `user[:group]` (names or numbers) against the rootfs' /etc/passwd
/// and /etc/group.
fn resolve_user(spec: &str, rootfs: &Path) -> Result<(u32, u32)> {
    if spec.is_empty() {
        return Ok((0, 0));
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let groups = std::fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
    let find = |table: &str, name: &str| -> Option<Vec<String>> {
        table
            .lines()
            .map(|l| l.split(':').map(String::from).collect::<Vec<_>>())
            .find(|f| f.len() > 2 && (f[0] == name || f[2] == name))
    };
    let (uid, primary_gid) = match user.parse::<u32>() {
        Ok(uid) => (
            uid,
            find(&passwd, user)
                .and_then(|f| f.get(3)?.parse().ok())
                .unwrap_or(0),
        ),
        Err(_) => {
            let f = find(&passwd, user).ok_or_else(|| {
                Error::Options(format!("user {user:?} is not in the image's /etc/passwd"))
            })?;
            let uid = f[2].parse().map_err(|_| {
                Error::Options(format!("user {user:?} has a bad uid in /etc/passwd"))
            })?;
            (uid, f.get(3).and_then(|g| g.parse().ok()).unwrap_or(0))
        }
    };
    let gid = match group {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => find(&groups, g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| {
                    Error::Options(format!("group {g:?} is not in the image's /etc/group"))
                })?,
        },
    };
    Ok((uid, gid))
}

/// The generated /etc/hosts and /etc/resolv.conf, written into `dir`.
pub fn write_etc(w: &Workload, dir: &Path) -> Result<()> {
    let mut hosts = String::from(
        "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nfe00::0\t\tip6-localnet\nff00::0\t\tip6-mcastprefix\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n",
    );
    for h in &w.add_hosts {
        let (name, ip) = h
            .split_once(':')
            .ok_or_else(|| Error::Options(format!("--add-hosts entry {h:?} is not host:IP")))?;
        hosts.push_str(&format!("{ip}\t{name}\n"));
    }
    let mut resolv = String::new();
    for n in &w.dns_nameservers {
        resolv.push_str(&format!("nameserver {n}\n"));
    }
    if !w.dns_search_domains.is_empty() {
        resolv.push_str(&format!("search {}\n", w.dns_search_domains.join(" ")));
    }
    if !w.dns_options.is_empty() {
        resolv.push_str(&format!("options {}\n", w.dns_options.join(" ")));
    }
    for (name, text) in [("hosts", hosts), ("resolv.conf", resolv)] {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
    }
    Ok(())
}

/// When to stop watching a running workload (its exit always stops it).
#[derive(Clone, Debug)]
pub enum StopWhen {
    /// After this long.
    Period(Duration),
    /// At SIGINT.
    Signal,
    /// When the workload prints a line containing this text (stdout or stderr).
    Line(String),
}

/// How a run ended.
#[derive(Debug)]
pub enum Ended {
    /// The workload exited by itself.
    Exited(ExitStatus),
    /// We stopped it.
    Stopped,
}

/// A container started with `runc run`; deleted when dropped.
pub struct Container {
    runc: PathBuf,
    state_dir: PathBuf,
    id: String,
    child: Option<tokio::process::Child>,
    output: Arc<Mutex<Tail>>,
    line_seen: Option<tokio::sync::watch::Receiver<bool>>,
    pumps: Vec<tokio::task::JoinHandle<()>>,
}

/// The last bytes the workload printed, for error messages.
#[derive(Default)]
pub struct Tail(Vec<u8>);

const TAIL_BYTES: usize = 16 << 10;

impl Tail {
    fn push(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
        if self.0.len() > TAIL_BYTES {
            let cut = self.0.len() - TAIL_BYTES;
            self.0.drain(..cut);
        }
    }
}

/// Finds `runc` on PATH.
pub fn find_runc() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join("runc"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Runtime("runc is not installed or not on PATH (Debian package `runc`)".into())
        })
}

impl Container {
    /// Starts `runc run` on the bundle at `bundle`, keeping runc's state in `state_dir`.
    pub fn start(
        runc: &Path,
        state_dir: &Path,
        bundle: &Path,
        id: &str,
        w: &Workload,
        wait_line: Option<&str>,
    ) -> Result<Container> {
        let mut cmd = tokio::process::Command::new(runc);
        cmd.arg("--root")
            .arg(state_dir)
            .arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg(id)
            .stdin(if w.stdin {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true);
        let capture = !w.terminal;
        if capture {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::Runtime(format!("starting {}: {e}", runc.display())))?;
        let output = Arc::new(Mutex::new(Tail::default()));
        let (tx, rx) = tokio::sync::watch::channel(false);
        let tx = Arc::new(tx);
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(tokio::spawn(pump(
                out,
                tokio::io::stdout(),
                output.clone(),
                wait_line.map(String::from),
                tx.clone(),
            )));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(tokio::spawn(pump(
                err,
                tokio::io::stderr(),
                output.clone(),
                wait_line.map(String::from),
                tx.clone(),
            )));
        }
        Ok(Container {
            runc: runc.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            id: id.to_string(),
            child: Some(child),
            output,
            line_seen: wait_line.map(|_| rx),
            pumps,
        })
    }

    /// Waits until the workload exits or `stop` says so, then kills it.
    pub async fn run_until(&mut self, stop: &StopWhen) -> Result<Ended> {
        let Some(child) = self.child.as_mut() else {
            return Ok(Ended::Stopped);
        };
        let mut line_seen = self.line_seen.clone();
        let stopper = async {
            match stop {
                StopWhen::Period(d) => tokio::time::sleep(*d).await,
                StopWhen::Signal => {
                    let _ = tokio::signal::ctrl_c().await;
                }
                StopWhen::Line(_) => match line_seen.as_mut() {
                    Some(rx) => {
                        let _ = rx.wait_for(|seen| *seen).await;
                    }
                    None => std::future::pending().await,
                },
            }
        };
        let interrupted = async {
            if matches!(stop, StopWhen::Signal) {
                std::future::pending::<()>().await
            } else {
                let _ = tokio::signal::ctrl_c().await;
            }
        };
        let ended = tokio::select! {
            status = child.wait() => {
                let status = status.map_err(|e| Error::Runtime(format!("waiting for runc: {e}")))?;
                self.child = None;
                self.finish_output().await;
                return Ok(Ended::Exited(status));
            }
            _ = stopper => Ended::Stopped,
            _ = interrupted => {
                self.kill().await;
                return Err(Error::Interrupted);
            }
        };
        self.kill().await;
        Ok(ended)
    }

    async fn finish_output(&mut self) {
        for p in self.pumps.drain(..) {
            let _ = p.await;
        }
    }

    /// The tail of what the workload printed.
    pub fn output(&self) -> String {
        let t = self.output.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&t.0).into_owned()
    }

    async fn kill(&mut self) {
        let _ = tokio::process::Command::new(&self.runc)
            .arg("--root")
            .arg(&self.state_dir)
            .args(["kill", "--all", &self.id, "KILL"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if let Some(mut child) = self.child.take() {
            let waited = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
            if waited.is_err() {
                let _ = child.kill().await;
            }
        }
        self.finish_output().await;
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // Synchronous on purpose: drop may run while unwinding an error or Ctrl-C.
        let _ = std::process::Command::new(&self.runc)
            .arg("--root")
            .arg(&self.state_dir)
            .args(["delete", "--force", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        for p in &self.pumps {
            p.abort();
        }
    }
}

async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    tail: Arc<Mutex<Tail>>,
    wait_line: Option<String>,
    seen: Arc<tokio::sync::watch::Sender<bool>>,
) {
    let mut buf = vec![0u8; 8192];
    let mut line = Vec::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let _ = to.write_all(chunk).await;
        let _ = to.flush().await;
        tail.lock().unwrap_or_else(|p| p.into_inner()).push(chunk);
        if let Some(want) = &wait_line {
            for &b in chunk {
                if b == b'\n' {
                    let text = String::from_utf8_lossy(&line);
                    // A substring, as the reference matches: servers prefix their log
                    // lines with pids and timestamps.
                    if text.contains(want.as_str()) {
                        let _ = seen.send(true);
                    }
                    line.clear();
                } else if line.len() < 64 << 10 {
                    line.push(b);
                }
            }
        }
    }
}

/// The capabilities containerd gives a container by default (what the workload has under
/// `ctr run` and under the reference's optimizer). The OCI default spec keeps only three,
/// and start-up scripts that `chown` or switch users then fail (postgres's does both).
fn workload_capabilities() -> Result<oci_spec::runtime::LinuxCapabilities> {
    use oci_spec::runtime::Capability as C;
    let set: std::collections::HashSet<C> = [
        C::Chown,
        C::DacOverride,
        C::Fsetid,
        C::Fowner,
        C::Mknod,
        C::NetRaw,
        C::Setgid,
        C::Setuid,
        C::Setfcap,
        C::Setpcap,
        C::NetBindService,
        C::SysChroot,
        C::Kill,
        C::AuditWrite,
    ]
    .into_iter()
    .collect();
    oci_spec::runtime::LinuxCapabilitiesBuilder::default()
        .bounding(set.clone())
        .effective(set.clone())
        .permitted(set)
        .build()
        .map_err(|e| Error::Sandbox(format!("runtime spec: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ctr_mounts() {
        let m = MountSpec::parse("type=bind,source=/tmp/x,destination=/x,options=bind:ro").unwrap();
        assert_eq!(m.kind, "bind");
        assert_eq!(m.source, "/tmp/x");
        assert_eq!(m.destination, "/x");
        assert_eq!(m.options, vec!["bind", "ro"]);
        assert!(MountSpec::parse("type=bind,source=/a,destination=rel").is_err());
        assert!(MountSpec::parse("type=bind,bogus").is_err());
    }

    #[test]
    fn user_env_overrides_image_env() {
        let e = merge_env(
            &["A=1".into(), "PATH=/x".into()],
            &["A=2".into(), "B=3".into()],
        );
        assert_eq!(e, vec!["A=2", "PATH=/x", "B=3"]);
        assert!(merge_env(&[], &[])[0].starts_with("PATH="));
    }

    #[test]
    fn resolves_names_from_the_image() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(d.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user("app", d.path()).unwrap(), (1000, 1001));
        assert_eq!(resolve_user("app:staff", d.path()).unwrap(), (1000, 50));
        assert_eq!(resolve_user("7:8", d.path()).unwrap(), (7, 8));
        assert!(resolve_user("nobody", d.path()).is_err());
    }
}
