//! The processes a benchmark needs: registries (a loopback one to load images, the
//! distant one in the link's server namespace), containerd with our daemon and the
//! reference daemon as proxy snapshotters in the client namespace, and their teardown.

use std::fs;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A child process stopped with `signal` on drop (then killed if it lingers).
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub signal: Signal,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path, signal: Signal) -> Result<Proc> {
        let out = fs::File::create(log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.into(),
            child,
            signal,
            log: log.into(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size so far, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        peak_rss_of(self.pid())
    }

    pub fn log_tail(&self) -> String {
        let s = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stop(&mut self) {
        if !self.alive() {
            return;
        }
        // Our own child, not yet reaped (alive above), so the pid is still its.
        let _ = kill(Pid::from_raw(self.pid() as i32), self.signal);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A command run with its network namespace switched to `netns` (mount namespace
/// untouched, so FUSE mounts stay visible to containerd and runc).
pub fn in_netns(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/var/run/netns/{ns}"))
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Runs a command to completion; errors carry its output.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let dbg = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {dbg}"))?;
    if !out.status.success() {
        bail!(
            "{dbg} failed ({}): {} {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not come up within {timeout:?}")
}

/// TCP connect test from inside `netns` (a helper thread joins it).
pub fn can_connect(netns: Option<&str>, addr: &str) -> bool {
    let ns = netns.map(str::to_string);
    let addr = addr.to_string();
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            if linkshape::enter_netns(&ns).is_err() {
                return false;
            }
        }
        addr.parse()
            .ok()
            .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_millis(500)).ok())
            .is_some()
    })
    .join()
    .unwrap_or(false)
}

/// `docker-registry serve` on `addr` with storage in `storage`, optionally in a netns.
pub fn start_registry(dir: &Path, storage: &Path, addr: &str, netns: Option<&str>) -> Result<Proc> {
    fs::create_dir_all(dir)?;
    let cfg = dir.join("registry.yml");
    fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  \
             filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n  \
             secret: hellobench\n",
            storage.display()
        ),
    )?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "docker-registry"]);
            c
        }
        None => Command::new("docker-registry"),
    };
    cmd.arg("serve").arg(&cfg);
    let mut p = Proc::spawn(
        "docker-registry",
        cmd,
        &dir.join("registry.log"),
        Signal::SIGTERM,
    )?;
    let r = wait_until("docker-registry", Duration::from_secs(20), || {
        can_connect(netns, addr)
    });
    if let Err(e) = r {
        bail!("{e}: {}", p.log_tail());
    }
    if !p.alive() {
        bail!("docker-registry exited: {}", p.log_tail());
    }
    Ok(p)
}

/// Binaries the environment runs.
#[derive(Clone, Debug)]
pub struct Bins {
    pub ours_daemon: PathBuf,
    pub ours_cli: PathBuf,
    pub ref_daemon: Option<PathBuf>,
    /// TOML appended to our daemon's generated configuration (e.g. to try settings).
    pub ours_extra_config: String,
}

/// Peak resident set size of process `pid` so far, in KiB (VmHWM).
pub fn peak_rss_of(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// containerd plus the proxy snapshotters, all in `dir`, torn down on drop.
pub struct Stack {
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub netns: Option<String>,
    pub ours: Proc,
    pub reference: Option<Proc>,
    containerd: Option<Proc>,
}

pub const NAMESPACE: &str = "hellobench";

impl Stack {
    /// Peak RSS of our daemon plus its FUSE manager, which holds the layer mounts,
    /// fetches and cache when enabled (the default).
    pub fn ours_peak_rss_kib(&self) -> Option<u64> {
        let daemon = self.ours.peak_rss_kib()?;
        let manager = fs::read_to_string(self.dir.join("ours-root").join("fuse-manager.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .and_then(peak_rss_of)
            .unwrap_or(0);
        Some(daemon + manager)
    }

    /// Fresh roots under `dir` (wiped first): every sample starts from nothing.
    pub fn start(
        dir: &Path,
        bins: &Bins,
        netns: Option<&str>,
        registry_host: &str,
    ) -> Result<Stack> {
        Self::start_seeded(dir, bins, netns, registry_host, None)
    }

    /// [`Stack::start`], with our daemon's `learned/` directory (start-up records of
    /// earlier runs on this "node") copied from `learned` before it starts: nothing else
    /// of the earlier run (no chunk cache, no snapshots) comes along.
    pub fn start_seeded(
        dir: &Path,
        bins: &Bins,
        netns: Option<&str>,
        registry_host: &str,
        learned: Option<&Path>,
    ) -> Result<Stack> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir)?;
        if let Some(from) = learned {
            let to = dir.join("ours-root").join(LEARNED_DIR);
            fs::create_dir_all(&to)?;
            for e in fs::read_dir(from)? {
                let e = e?;
                fs::copy(e.path(), to.join(e.file_name()))?;
            }
        }
        let resolver = format!(
            "[[resolver.host.\"{registry_host}\".mirrors]]\nhost = \"{registry_host}\"\ninsecure = true\n"
        );
        fs::write(
            dir.join("ours.toml"),
            format!("{}\n{resolver}", bins.ours_extra_config),
        )?;
        let mut cmd = in_netns(netns, &bins.ours_daemon.display().to_string());
        // HELLOBENCH_OURS_LOG_LEVEL: our daemon's (and so its FUSE manager's) level.
        if let Ok(level) = std::env::var("HELLOBENCH_OURS_LOG_LEVEL") {
            cmd.args(["--log-level", &level]);
        }
        cmd.arg("--address")
            .arg(dir.join("ours.sock"))
            .arg("--root")
            .arg(dir.join("ours-root"))
            .arg("--config")
            .arg(dir.join("ours.toml"))
            // HELLOBENCH_OURS_LOG: our daemon's log filter, to see where a sample's time
            // goes (with HELLOBENCH_LOG_DIR keeping each sample's log).
            .env(
                "RUST_LOG",
                std::env::var("HELLOBENCH_OURS_LOG").unwrap_or_else(|_| "warn".into()),
            );
        let ours = Proc::spawn(
            "containerd-stargz-grpc (ours)",
            cmd,
            &dir.join("ours.log"),
            Signal::SIGINT,
        )?;
        let reference = match &bins.ref_daemon {
            Some(bin) => {
                fs::write(
                    dir.join("ref.toml"),
                    format!("metadata_store = \"memory\"\n{resolver}"),
                )?;
                let mut cmd = in_netns(netns, &bin.display().to_string());
                cmd.arg("--address")
                    .arg(dir.join("ref.sock"))
                    .arg("--root")
                    .arg(dir.join("ref-root"))
                    .arg("--config")
                    .arg(dir.join("ref.toml"))
                    .args(["--log-level", "warn"]);
                // SIGTERM: its SIGINT path leaves a root that cannot be restored.
                Some(Proc::spawn(
                    "containerd-stargz-grpc (reference)",
                    cmd,
                    &dir.join("ref.log"),
                    Signal::SIGTERM,
                )?)
            }
            None => None,
        };
        let s = dir.join("ours.sock");
        if let Err(e) = wait_until("our daemon", Duration::from_secs(30), || s.exists()) {
            bail!("{e}: {}", ours.log_tail());
        }
        if let Some(r) = &reference {
            let s = dir.join("ref.sock");
            if let Err(e) = wait_until("the reference daemon", Duration::from_secs(30), || {
                s.exists()
            }) {
                bail!("{e}: {}", r.log_tail());
            }
        }
        let sock = dir.join("containerd.sock");
        let mut cfg = format!(
            "version = 2\nroot = \"{d}/containerd-root\"\nstate = \"{d}/containerd-state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{s}\"\n\
             [ttrpc]\n  address = \"{s}.ttrpc\"\n[plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n\
             [proxy_plugins.stargz]\n  type = \"snapshot\"\n  address = \"{d}/ours.sock\"\n",
            d = dir.display(),
            s = sock.display()
        );
        if reference.is_some() {
            cfg.push_str(&format!(
                "[proxy_plugins.stargz-ref]\n  type = \"snapshot\"\n  address = \"{}/ref.sock\"\n",
                dir.display()
            ));
        }
        fs::write(dir.join("containerd.toml"), cfg)?;
        let mut cmd = in_netns(netns, "containerd");
        cmd.arg("--config").arg(dir.join("containerd.toml"));
        let containerd = Proc::spawn(
            "containerd",
            cmd,
            &dir.join("containerd.log"),
            Signal::SIGTERM,
        )?;
        let mut stack = Stack {
            dir: dir.into(),
            sock,
            netns: netns.map(str::to_string),
            ours,
            reference,
            containerd: Some(containerd),
        };
        let r = wait_until("containerd", Duration::from_secs(30), || {
            stack
                .ctr()
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        });
        if let Err(e) = r {
            let tail = stack
                .containerd
                .as_ref()
                .map(|c| c.log_tail())
                .unwrap_or_default();
            bail!("{e}: {tail}");
        }
        if !stack.ours.alive() {
            bail!("our daemon exited: {}", stack.ours.log_tail());
        }
        Ok(stack)
    }

    /// `ctr` against this containerd, in the client namespace (it fetches content itself).
    pub fn ctr(&self) -> Command {
        self.tool("ctr")
    }

    pub fn tool(&self, program: &str) -> Command {
        let mut c = in_netns(self.netns.as_deref(), program);
        c.arg("-a").arg(&self.sock).arg("-n").arg(NAMESPACE);
        c
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for p in [
            Some(&self.ours),
            self.reference.as_ref(),
            self.containerd.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            s.push_str(&format!("--- {} log tail:\n{}\n", p.name, p.log_tail()));
        }
        s
    }
}

/// Where our daemon keeps what containers of an image read at start, under its root.
pub const LEARNED_DIR: &str = "learned";

impl Drop for Stack {
    fn drop(&mut self) {
        // containerd first, so its shims stop while the snapshotters still answer.
        if let Some(mut c) = self.containerd.take() {
            c.stop();
        }
        self.ours.stop();
        if let Some(r) = &mut self.reference {
            r.stop();
        }
        unmount_under(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Lazily unmounts every mount point below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let mut info = String::new();
    if let Ok(mut f) = fs::File::open("/proc/self/mountinfo") {
        let _ = f.read_to_string(&mut info);
    }
    let prefix = dir.display().to_string();
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort();
    for p in points.into_iter().rev() {
        let _ = Command::new("umount").arg("-l").arg(p).status();
    }
}

/// Bytes sent by the server side of the link so far.
pub fn server_tx_bytes(server_ns: &str) -> Result<u64> {
    let out =
        run_ok(Command::new("ip").args(["-n", server_ns, "-s", "-j", "link", "show", "lsh0"]))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["tx"]["bytes"]
        .as_u64()
        .context("no tx byte counter on the link")
}
