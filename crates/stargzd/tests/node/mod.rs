//! A node for the long-running tests: containerd 1.6 with our daemon (and its FUSE
//! manager) as the `stargz` proxy snapshotter, in a scratch directory, plus the images
//! they pull, built as eStargz and pushed to a docker-registry. Processes can be killed
//! and restarted at will; everything is stopped and detached on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{detach_mounts, fuse_mounts, require, sha, stop, wait_for};

pub const NS: &str = "node";

pub fn prerequisites() -> bool {
    require(
        &[
            "/usr/bin/containerd",
            "/usr/bin/ctr",
            "/usr/bin/ctr-remote",
            "/usr/sbin/runc",
            "/usr/bin/containerd-shim-runc-v2",
            "/bin/busybox",
            "/usr/bin/docker-registry",
            "/dev/fuse",
        ],
        "containerd runc docker-registry busybox-static stargz-snapshotter fuse3",
    )
}

pub struct Node {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
    pub daemon: Option<Child>,
    containerd: Option<Child>,
    pub snap_sock: PathBuf,
    pub snap_root: PathBuf,
    sock: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.containerd.is_some() {
            for id in self.ctr(&["task", "ls", "-q"]).unwrap_or_default().lines() {
                self.kill_task(id.trim());
            }
        }
        if let Some(mut c) = self.containerd.take() {
            stop(&mut c, libc::SIGTERM, Duration::from_secs(10));
        }
        if let Some(mut c) = self.daemon.take() {
            stop(&mut c, libc::SIGINT, Duration::from_secs(10));
        }
        if let Some(pid) = self.manager_pid() {
            // SAFETY: kill(2) on the manager this test's daemon started (checked by cmdline).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        detach_mounts(&self.dir);
    }
}

impl Node {
    /// containerd and the daemon, with `config` as the daemon's config file.
    pub fn start(config: &str) -> Node {
        let tmp = tempfile::Builder::new()
            .prefix("stargzd-node-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::write(dir.join("stargz.toml"), config).unwrap();
        let mut node = Node {
            snap_sock: dir.join("run/stargz.sock"),
            snap_root: dir.join("stargz-root"),
            sock: dir.join("containerd.sock"),
            dir,
            _tmp: tmp,
            daemon: None,
            containerd: None,
        };
        node.start_daemon();
        node.start_containerd();
        node
    }

    pub fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stargz.log"))
            .unwrap();
        let _ = std::fs::remove_file(&self.snap_sock);
        let daemon = Command::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc"))
            .arg("--address")
            .arg(&self.snap_sock)
            .arg("--root")
            .arg(&self.snap_root)
            .arg("--config")
            .arg(self.dir.join("stargz.toml"))
            .args(["--log-level", "debug"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(daemon);
        self.wait_serving();
        if self.containerd.is_some() {
            self.wait_reconnected();
        }
    }

    /// Waits for the daemon's socket, failing early (with its log) if it exited.
    fn wait_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.snap_sock.exists() {
            if let Some(Ok(Some(status))) = self.daemon.as_mut().map(|d| d.try_wait()) {
                panic!("daemon exited on start: {status}\n{}", self.logs());
            }
            assert!(Instant::now() < deadline, "daemon did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// containerd's gRPC client backs off after the daemon went away; wait until it
    /// talks to the new process again.
    pub fn wait_reconnected(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(e) = self.ctr(&["snapshot", "--snapshotter", "stargz", "ls"]) {
            assert!(
                Instant::now() < deadline,
                "containerd did not reconnect: {e}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the daemon with `sig` and reaps it.
    pub fn stop_daemon(&mut self, sig: i32) {
        if let Some(mut c) = self.daemon.take() {
            stop(&mut c, sig, Duration::from_secs(10));
        }
    }

    /// The pid of the live FUSE manager serving this daemon root, if any.
    pub fn manager_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.snap_root.join("fuse-manager.pid")).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        alive(pid, &self.snap_root).then_some(pid)
    }

    /// SIGKILLs the FUSE manager, if one runs, and waits until it is gone.
    pub fn kill_manager(&self) -> bool {
        let Some(pid) = self.manager_pid() else {
            return false;
        };
        // SAFETY: kill(2) on the manager this test's daemon started (checked by cmdline).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid, &self.snap_root) {
            assert!(Instant::now() < deadline, "manager {pid} survived SIGKILL");
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    pub fn kill_task(&self, id: &str) {
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ctr(&["task", "rm", id]).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.ctr(&["task", "rm", "-f", id]);
        let _ = self.ctr(&["container", "rm", id]);
    }

    fn start_containerd(&mut self) {
        let d = self.dir.display();
        let cfg = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[proxy_plugins.stargz]
  type = "snapshot"
  address = "{s}"
"#,
            s = self.snap_sock.display()
        );
        std::fs::write(self.dir.join("containerd.toml"), cfg).unwrap();
        let containerd = Command::new("/usr/bin/containerd")
            .arg("--config")
            .arg(self.dir.join("containerd.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("containerd.log")).unwrap())
            .spawn()
            .unwrap();
        self.containerd = Some(containerd);
        wait_for(&self.sock, "containerd");
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ctr(&["version"]).is_err() {
            assert!(Instant::now() < deadline, "containerd not answering");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `bin -a SOCK -n NS args...`, not yet run.
    pub fn command(&self, bin: &str, args: &[&str]) -> Command {
        let mut c = Command::new(bin);
        c.arg("-a")
            .arg(&self.sock)
            .args(["-n", NS])
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// [`Node::command`] as one shell command line.
    pub fn shell_line(&self, bin: &str, args: &[&str]) -> String {
        let quote = |a: &str| format!("'{}'", a.replace('\'', r"'\''"));
        let sock = self.sock.to_string_lossy();
        let mut line = format!("{bin} -a {} -n {NS}", quote(&sock));
        for a in args {
            line.push(' ');
            line.push_str(&quote(a));
        }
        line
    }

    pub fn tool(&self, bin: &str, args: &[&str]) -> Result<String, String> {
        let out = self.command(bin, args).output().expect("run ctr");
        let so = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(so)
        } else {
            Err(format!(
                "{bin} {args:?}: {so}{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    pub fn ctr(&self, args: &[&str]) -> Result<String, String> {
        self.tool("/usr/bin/ctr", args)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        self.ctr(args).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn rpull_args(img: &str) -> Vec<&str> {
        vec![
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "stargz",
            img,
        ]
    }

    pub fn try_rpull(&self, img: &str) -> Result<String, String> {
        self.tool("/usr/bin/ctr-remote", &Self::rpull_args(img))
    }

    /// `ctr run --rm` of `script` in a new container of `img`; its output.
    pub fn run_args<'a>(img: &'a str, id: &'a str, script: &'a str) -> Vec<&'a str> {
        vec![
            "run",
            "--rm",
            "--snapshotter",
            "stargz",
            img,
            id,
            "/bin/busybox",
            "sh",
            "-c",
            script,
        ]
    }

    /// Runs `script` in a new container and returns its output. `ctr run` can return
    /// before the last of a container's output reached it: a run whose output lacks
    /// the end marker is run again.
    pub fn run(&self, img: &str, id: &str, script: &str) -> Result<String, String> {
        const END: &str = "__script_end__";
        let script = format!("{script}; echo {END}");
        let mut out = String::new();
        for attempt in 0..3 {
            let name = format!("{id}-{attempt}");
            out = self.ctr(&Self::run_args(img, &name, &script))?;
            if let Some(body) = out.strip_suffix(&format!("{END}\n")) {
                return Ok(body.to_string());
            }
        }
        Err(format!("output cut short: {out:?}"))
    }

    /// Snapshot names of the `stargz` snapshotter.
    pub fn snapshots(&self) -> Vec<String> {
        self.ok(&["snapshot", "--snapshotter", "stargz", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }

    /// Removes every image and waits until garbage collection removed every snapshot.
    pub fn remove_all_images(&self) {
        for img in self.ok(&["images", "ls", "-q"]).lines() {
            let _ = self.ctr(&["images", "rm", "--sync", img.trim()]);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = self.snapshots();
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "snapshots left: {left:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn fuse_mounts(&self) -> Vec<String> {
        fuse_mounts(&self.snap_root)
    }

    /// The chunk cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.snap_root.join("stargz")
    }

    pub fn logs(&self) -> String {
        format!(
            "--- stargz.log (tail)\n{}\n--- fuse-manager.log (tail)\n{}\n--- containerd.log (tail)\n{}",
            tail(&self.dir.join("stargz.log"), 80),
            tail(&self.snap_root.join("fuse-manager.log"), 60),
            tail(&self.dir.join("containerd.log"), 40)
        )
    }

    /// The distinct warnings, errors and panics both daemons logged, with their counts
    /// (timestamps and fields after the message cut off).
    pub fn complaints(&self) -> Vec<(usize, String)> {
        let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
        for log in [
            self.dir.join("stargz.log"),
            self.snap_root.join("fuse-manager.log"),
        ] {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            for l in text.lines() {
                let Some(at) = [" WARN ", " ERROR ", "panicked"]
                    .iter()
                    .find_map(|k| l.find(k))
                else {
                    continue;
                };
                let msg: String = l[at..].chars().take(400).collect();
                *seen.entry(msg).or_default() += 1;
            }
        }
        let mut v: Vec<(usize, String)> = seen.into_iter().map(|(m, n)| (n, m)).collect();
        v.sort_by(|a, b| b.cmp(a));
        v
    }

    /// Runs `f`, printing the logs when it panics.
    pub fn checked<T>(&mut self, f: impl FnOnce(&mut Node) -> T) -> T {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self))) {
            Ok(v) => v,
            Err(p) => {
                eprintln!("{}", self.logs());
                std::panic::resume_unwind(p);
            }
        }
    }
}

/// Whether `pid` runs (not a zombie) a stargz-fuse-manager for `root`.
pub fn alive(pid: i32, root: &Path) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let running = stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    running && cmdline.contains("stargz-fuse-manager") && cmdline.contains(&*root.to_string_lossy())
}

pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Bytes of the files under `dir`, and the paths of the cache's unfinished files.
pub fn dir_usage(dir: &Path, temps: &mut Vec<PathBuf>) -> u64 {
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in rd.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            total += dir_usage(&e.path(), temps);
        } else {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                temps.push(e.path());
            }
            total += m.len();
        }
    }
    total
}

/// An uncompressed tar of `files`; a `None` body is a directory.
pub fn tar_of(files: &[(&str, Option<&[u8]>, u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(*mode);
        h.set_mtime(1_700_000_000);
        match data {
            Some(d) => {
                h.set_size(d.len() as u64);
                b.append_data(&mut h, name, *d).unwrap();
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, name, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// A layer blob ready to push, with its descriptor annotations.
pub struct Layer {
    pub blob: Vec<u8>,
    pub diff_id: String,
    pub annotations: serde_json::Map<String, serde_json::Value>,
}

/// An eStargz layer of `tar` with chunks of `chunk_size` bytes.
pub fn estargz_layer(tar: &[u8], chunk_size: u64) -> Layer {
    let mut blob = Vec::new();
    let out = estargz::build(
        tar,
        &mut blob,
        &estargz::BuildOptions {
            codec: estargz::Codec::Gzip { level: 1 },
            threads: 2,
            chunk_size,
            ..Default::default()
        },
    )
    .unwrap();
    let annotations = out
        .annotations
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    Layer {
        blob,
        diff_id: out.diff_id,
        annotations,
    }
}

/// Pushes the layers, a config naming their diff ids, and an OCI manifest as `repo:v1`.
pub async fn push(reg: &testenv::Registry, repo: &str, layers: &[&Layer]) -> String {
    let base = reg.base_url();
    let mut descs = Vec::new();
    for l in layers {
        let d = testenv::push_blob(&base, repo, &l.blob).await;
        let mut desc = serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d,
            "size": l.blob.len(),
        });
        if !l.annotations.is_empty() {
            desc["annotations"] = serde_json::Value::Object(l.annotations.clone());
        }
        descs.push(desc);
    }
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/busybox", "sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let cd = testenv::push_blob(&base, repo, &config).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let st = reqwest::Client::new()
        .put(format!("{base}/v2/{repo}/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st.as_u16(), 201, "push manifest");
    format!("{}/{repo}:v1", reg.host())
}

/// A small image: busybox (a layer every image shares) and a layer of its own with
/// files of several chunks and small ones. Its reference and the `sha256sum` lines a
/// container prints for `/data/*`.
pub struct TestImage {
    pub reference: String,
    pub sums: String,
}

/// The script that prints what [`TestImage::sums`] holds.
pub const SUMS: &str = "cd /data && /bin/busybox sha256sum *";

/// Pushes `n` such images as `node/<repo>0`, `node/<repo>1`, ...; `seed` picks their data.
pub async fn push_images(
    reg: &testenv::Registry,
    repo: &str,
    n: usize,
    seed: u64,
) -> Vec<TestImage> {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let base = estargz_layer(
        &tar_of(&[("bin", None, 0o755), ("bin/busybox", Some(&busybox), 0o755)]),
        64 << 10,
    );
    let mut out = Vec::new();
    for i in 0..n as u64 {
        let files: Vec<(String, Vec<u8>)> = (0..4u64)
            .map(|f| {
                let len = if f == 0 {
                    600_000
                } else {
                    20_000 + f as usize * 7000
                };
                (
                    format!("data/f{f}"),
                    testenv::random_bytes(len, seed + i * 10 + f),
                )
            })
            .collect();
        let mut entries: Vec<(&str, Option<&[u8]>, u32)> = vec![("data", None, 0o755)];
        for (name, d) in &files {
            entries.push((name, Some(d), 0o644));
        }
        let own = estargz_layer(&tar_of(&entries), 64 << 10);
        let reference = push(reg, &format!("node/{repo}{i}"), &[&base, &own]).await;
        let sums: String = files
            .iter()
            .map(|(name, d)| {
                let hex = sha(d).trim_start_matches("sha256:").to_string();
                format!("{hex}  {}\n", name.trim_start_matches("data/"))
            })
            .collect();
        out.push(TestImage { reference, sums });
    }
    out
}
