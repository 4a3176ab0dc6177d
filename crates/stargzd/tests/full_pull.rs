//! Full pulls of layers that are not eStargz, with a real registry, containerd and our
//! daemon: the daemon downloads (parallel ranged GETs) and unpacks plain gzip layers
//! itself, and the result is the tree containerd's own overlayfs pull makes; hostile
//! archives and a registry that alters bytes fall back to the ordinary pull with
//! nothing written outside and nothing left behind; `full_pull = false` leaves
//! layers to containerd as before.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use common::{detach_mounts, require, sha, stop, wait_for};

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the image is pulled by containerd itself (overlayfs).
const PLAIN_NS: &str = "plain";
/// Where it is pulled through our daemon.
const OURS_NS: &str = "ours";

fn prerequisites() -> bool {
    require(
        &[
            "/usr/bin/containerd",
            "/usr/bin/ctr",
            "/usr/bin/docker-registry",
            "/dev/fuse",
        ],
        "containerd docker-registry fuse3",
    )
}

/// containerd with our daemon as its `stargz` snapshotter, in a scratch directory.
struct Env {
    dir: PathBuf,
    _tmp: tempfile::TempDir,
    daemon: Option<Child>,
    containerd: Option<Child>,
    snap_root: PathBuf,
    snap_sock: PathBuf,
    sock: PathBuf,
    metrics: String,
    views: Vec<PathBuf>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for v in &self.views {
            let _ = Command::new("umount").arg(v).status();
        }
        if let Some(mut c) = self.containerd.take() {
            stop(&mut c, libc::SIGTERM, Duration::from_secs(10));
        }
        if let Some(mut c) = self.daemon.take() {
            stop(&mut c, libc::SIGINT, Duration::from_secs(10));
        }
        if let Ok(text) = std::fs::read_to_string(self.snap_root.join("fuse-manager.pid")) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&*self.snap_root.to_string_lossy()) {
                    // SAFETY: kill(2) on the FUSE manager this test's daemon started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        detach_mounts(&self.dir);
    }
}

/// Starts our daemon with `dir/stargz.toml`, logging (appended) to `dir/stargz.log`.
fn spawn_daemon(dir: &Path, snap_sock: &Path, snap_root: &Path) -> Child {
    let _ = std::fs::remove_file(snap_sock);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("stargz.log"))
        .unwrap();
    let daemon = Command::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc"))
        .arg("--address")
        .arg(snap_sock)
        .arg("--root")
        .arg(snap_root)
        .arg("--config")
        .arg(dir.join("stargz.toml"))
        .args(["--log-level", "debug"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for(snap_sock, "containerd-stargz-grpc");
    daemon
}

impl Env {
    /// Stops the daemon (SIGTERM) and starts it again on the same root.
    fn restart_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            stop(&mut c, libc::SIGTERM, Duration::from_secs(10));
        }
        self.daemon = Some(spawn_daemon(&self.dir, &self.snap_sock, &self.snap_root));
    }

    fn start(config: &str) -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("stargzd-fullpull-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        let metrics = format!("127.0.0.1:{}", testenv::free_port());
        std::fs::write(
            dir.join("stargz.toml"),
            format!("metrics_address = \"{metrics}\"\n{config}"),
        )
        .unwrap();
        let snap_sock = dir.join("run/stargz.sock");
        let snap_root = dir.join("stargz-root");
        let daemon = spawn_daemon(&dir, &snap_sock, &snap_root);
        let d = dir.display();
        std::fs::write(
            dir.join("containerd.toml"),
            format!(
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
                s = snap_sock.display()
            ),
        )
        .unwrap();
        let containerd = Command::new("/usr/bin/containerd")
            .arg("--config")
            .arg(dir.join("containerd.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("containerd.log")).unwrap())
            .spawn()
            .unwrap();
        let env = Env {
            sock: dir.join("containerd.sock"),
            snap_sock,
            snap_root,
            dir,
            _tmp: tmp,
            daemon: Some(daemon),
            containerd: Some(containerd),
            metrics,
            views: Vec::new(),
        };
        wait_for(&env.sock, "containerd");
        let deadline = Instant::now() + Duration::from_secs(30);
        while env.ctr(PLAIN_NS, &["version"]).is_err() {
            assert!(Instant::now() < deadline, "containerd not answering");
            std::thread::sleep(Duration::from_millis(100));
        }
        env
    }

    fn tool(&self, bin: &Path, ns: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new(bin)
            .arg("-a")
            .arg(&self.sock)
            .args(["-n", ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{} {args:?}: {text}", bin.display()))
        }
    }

    fn ctr(&self, ns: &str, args: &[&str]) -> Result<String, String> {
        self.tool(Path::new("/usr/bin/ctr"), ns, args)
    }

    /// `ctr-remote image rpull --plain-http IMG` in `ns`, through the stargz snapshotter.
    fn rpull(&self, ns: &str, img: &str) -> String {
        let bin =
            Path::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc")).with_file_name("ctr-remote");
        assert!(
            bin.exists(),
            "{} missing: build the workspace first (cargo build --workspace)",
            bin.display()
        );
        self.tool(&bin, ns, &["image", "rpull", "--plain-http", img])
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    fn logs(&self) -> String {
        let tail = |p: PathBuf| {
            let t = std::fs::read_to_string(p).unwrap_or_default();
            let l: Vec<&str> = t.lines().collect();
            l[l.len().saturating_sub(60)..].join("\n")
        };
        format!(
            "--- stargz.log\n{}\n--- containerd.log\n{}",
            tail(self.dir.join("stargz.log")),
            tail(self.dir.join("containerd.log"))
        )
    }

    fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stargz.log")).unwrap_or_default()
    }

    async fn fallbacks(&self, reason: &str) -> u64 {
        let text = reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let want = format!("stargz_layer_fallbacks_total{{reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&want))
            .map(|v| v.trim().parse::<f64>().unwrap() as u64)
            .unwrap_or(0)
    }

    /// Mounts a read-only view of snapshot `top` of `snapshotter` in `ns`; returns where.
    fn view(&mut self, ns: &str, snapshotter: &str, top: &str) -> PathBuf {
        let key = format!("view-{ns}-{}", self.views.len());
        let out = self
            .ctr(
                ns,
                &[
                    "snapshots",
                    "--snapshotter",
                    snapshotter,
                    "view",
                    "--mounts",
                    &key,
                    top,
                ],
            )
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
        let mounts: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let m = &mounts[0];
        let field = |k: &str| {
            m.get(k)
                .or_else(|| m.get(k.to_lowercase()))
                .cloned()
                .unwrap_or_default()
        };
        let kind = field("Type").as_str().unwrap().to_string();
        let source = field("Source").as_str().unwrap().to_string();
        let options: Vec<String> = field("Options")
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap().to_string())
            .collect();
        let target = self.dir.join(&key);
        std::fs::create_dir_all(&target).unwrap();
        let mut cmd = Command::new("mount");
        if kind != "bind" {
            cmd.args(["-t", &kind]);
        }
        let st = cmd
            .arg(&source)
            .arg(&target)
            .args(["-o", &options.join(",")])
            .status()
            .unwrap();
        assert!(st.success(), "mounting {kind} {source} {options:?}");
        self.views.push(target.clone());
        target
    }
}

fn gz(tar: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(tar).unwrap();
    gz.finish().unwrap()
}

/// A tar stream built entry by entry, with fixed times and owners unless given.
struct Tar(tar::Builder<Vec<u8>>);

const MTIME: u64 = 1_600_000_000;

impl Tar {
    fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, owner: (u64, u64)) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_mtime(MTIME);
        h.set_size(0);
        h
    }

    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, (0, 0));
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    fn file(&mut self, path: &str, data: &[u8], mode: u32, owner: (u64, u64)) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, owner);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    fn link(&mut self, kind: tar::EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(kind, 0o777, (0, 0));
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    /// A hard link carrying its target's mode and owner, as tar writers record it
    /// (the applier sets them on the shared inode again).
    fn hardlink(&mut self, path: &str, target: &str, mode: u32, owner: (u64, u64)) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Link, mode, owner);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    fn special(&mut self, kind: tar::EntryType, path: &str, dev: (u32, u32)) -> &mut Self {
        let mut h = Self::header(kind, 0o644, (0, 0));
        h.set_device_major(dev.0).unwrap();
        h.set_device_minor(dev.1).unwrap();
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    /// A PAX header for the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            let body = k.len() + v.len() + 3;
            let mut len = body + 1;
            while len != body + len.to_string().len() {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_path("PaxHeaders/x").unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        self.0.append(&h, &data[..]).unwrap();
        self
    }

    /// An entry whose name is written as is (the builder refuses `..`).
    fn raw(&mut self, kind: tar::EntryType, name: &str, data: &[u8]) -> &mut Self {
        let mut h = Self::header(kind, 0o644, (0, 0));
        h.set_size(data.len() as u64);
        let n = name.as_bytes();
        h.as_old_mut().name[..n.len()].copy_from_slice(n);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

/// Pushes an image of the plain gzip layers `tars` as `repo:v1` to `reg`; returns its
/// reference through `host` (the registry itself or a front) and the layer digests.
async fn push(
    reg: &testenv::Registry,
    host: &str,
    repo: &str,
    tars: &[Vec<u8>],
) -> (String, Vec<String>) {
    let base = reg.base_url();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut digests = Vec::new();
    for t in tars {
        let blob = gz(t);
        let d = testenv::push_blob(&base, repo, &blob).await;
        descs.push(
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d, "size": blob.len()}),
        );
        digests.push(d);
        diff_ids.push(sha(t));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
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
    (format!("{host}/{repo}:v1"), digests)
}

/// Three layers with every kind of entry containerd's applier handles, whiteouts and
/// an opaque directory, long names, and a 20 MiB file (several ranged GETs).
fn rich_layers() -> Vec<Vec<u8>> {
    let long_dir = format!("deep/{}", "d".repeat(120));
    let long_file = format!("{long_dir}/{}", "f".repeat(140));
    let big = testenv::random_bytes(20 << 20, 7);
    let mut one = Tar::new();
    one.dir("./", 0o755)
        .dir("etc/", 0o755)
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644, (0, 0))
        .file("etc/gone.conf", b"to be deleted\n", 0o600, (0, 0))
        .dir("bin/", 0o755)
        .file("bin/su", b"#!/bin/sh\necho su\n", 0o4755, (0, 0))
        .file("bin/tool", b"tool\n", 0o2750, (1000, 1001))
        .hardlink("bin/tool-again", "bin/tool", 0o2750, (1000, 1001))
        .link(tar::EntryType::Symlink, "bin/sh", "/bin/busybox")
        .link(tar::EntryType::Symlink, "bin/rel", "../etc/passwd")
        .dir("dev/", 0o755)
        .special(tar::EntryType::Fifo, "dev/fifo", (0, 0))
        .special(tar::EntryType::Char, "dev/null2", (1, 3))
        .pax(&[
            ("SCHILY.xattr.user.origin", b"layer-one"),
            (
                "SCHILY.xattr.security.capability",
                &[
                    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ],
            ),
        ])
        .file("bin/ping", b"ping\n", 0o755, (0, 0))
        .dir("opq/", 0o755)
        .file("opq/old1", b"old\n", 0o644, (0, 0))
        .dir("opq/sub/", 0o700)
        .file("opq/sub/old2", b"old\n", 0o644, (0, 0))
        .dir("deep/", 0o755)
        .dir(&format!("{long_dir}/"), 0o755)
        .file(&long_file, b"long name\n", 0o644, (0, 0))
        .dir("var/", 0o1777);
    let mut two = Tar::new();
    two.dir("etc/", 0o755)
        .file("etc/.wh.gone.conf", b"", 0o644, (0, 0))
        .file("etc/passwd", b"root:x:0:0::/root:/bin/ash\n", 0o644, (0, 0))
        .dir("opq/", 0o755)
        .file("opq/.wh..wh..opq", b"", 0o644, (0, 0))
        .file("opq/new", b"new\n", 0o640, (0, 0))
        .dir("var/", 0o1777)
        .dir("var/lib/", 0o755)
        .link(tar::EntryType::Symlink, "var/run", "/run");
    let mut three = Tar::new();
    three
        .dir("big/", 0o755)
        .file("big/blob", &big, 0o644, (0, 0))
        .file("big/small", b"small\n", 0o644, (0, 0));
    vec![one.finish(), two.finish(), three.finish()]
}

/// One entry of a tree as the comparison sees it.
#[derive(Debug, PartialEq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u64,
    rdev: u64,
    mtime: i64,
    content: String,
    target: String,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: valid C string and buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", p.display());
    let mut out = BTreeMap::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let k = CString::new(name).unwrap();
        let mut v = vec![0u8; 64 << 10];
        // SAFETY: valid C strings and buffer of the given length.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), k.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(m >= 0, "lgetxattr {}", p.display());
        v.truncate(m as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    out
}

/// Every entry under `root`: kind, mode, owner, size, link count, device, mtime,
/// content hash, link target, xattrs.
fn walk(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let mut content = String::new();
        let mut target = String::new();
        let kind = if ft.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            "dir"
        } else if ft.is_symlink() {
            target = std::fs::read_link(&p)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            "symlink"
        } else if ft.is_file() {
            let mut data = Vec::new();
            std::fs::File::open(&p)
                .unwrap()
                .read_to_end(&mut data)
                .unwrap();
            content = sha(&data);
            "file"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else {
            "other"
        };
        out.insert(
            rel,
            Node {
                kind,
                mode: md.mode(),
                uid: md.uid(),
                gid: md.gid(),
                size: if kind == "dir" { 0 } else { md.size() },
                nlink: if kind == "dir" { 0 } else { md.nlink() },
                rdev: md.rdev(),
                // The top layer's root is not in its archive: its time is that of
                // the unpack, in either pull.
                mtime: if p == root { 0 } else { md.mtime() },
                content,
                target,
                xattrs: xattrs(&p),
            },
        );
    }
    out
}

fn diff(a: &BTreeMap<String, Node>, b: &BTreeMap<String, Node>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("only in containerd's: {k} {v:?}")),
            Some(w) if w != v => out.push(format!("{k}: containerd's {v:?} ours {w:?}")),
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        out.push(format!("only in ours: {k} {:?}", b[k]));
    }
    out
}

/// The top snapshot an rpull names.
fn top_snapshot(rpull_out: &str) -> String {
    rpull_out
        .split("top snapshot ")
        .nth(1)
        .unwrap_or_else(|| panic!("no top snapshot in {rpull_out}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Files under the daemon's staging directory (nothing once every pull is done).
fn staged(env: &Env) -> Vec<PathBuf> {
    let dir = env.snap_root.join("fullpull");
    std::fs::read_dir(&dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_layers_are_pulled_in_full_like_containerd_unpacks_them() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    // Requests held a little, so that ranges in flight together show in the log.
    let front = testenv::Front::start(testenv::FrontOpts {
        upstream: reg.base_url(),
        blob_delay_ms: 200,
        ..Default::default()
    })
    .await;
    let (img, digests) = push(&reg, &front.host(), "fp/rich", &rich_layers()).await;
    let mut env = Env::start("");

    env.ctr(
        PLAIN_NS,
        &[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "overlayfs",
            &img,
        ],
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", env.logs()));
    front.stats.log.lock().unwrap().clear();
    let out = env.rpull(OURS_NS, &img);
    assert!(
        out.contains(
            "0 layer(s) remote, 0 unpacked, 0 already present, 3 pulled in full by the snapshotter"
        ),
        "{out}"
    );
    let log = env.daemon_log();
    assert_eq!(
        log.matches("layer filled by a full pull").count(),
        3,
        "{}",
        env.logs()
    );
    // containerd needed none of the blobs: they are not in its content store.
    let content = env.ctr(OURS_NS, &["content", "ls", "-q"]).unwrap();
    for d in &digests {
        assert!(
            !content.contains(d.as_str()),
            "{d} in the content store:\n{content}"
        );
    }
    // The big layer came in several ranged GETs, some in flight at the same time.
    let big = &digests[2];
    let reqs: Vec<_> = front
        .stats
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.method == "GET" && l.path.ends_with(big.as_str()))
        .cloned()
        .collect();
    assert!(reqs.len() >= 3, "{reqs:?}");
    assert!(reqs.iter().all(|r| r.range.is_some()), "{reqs:?}");
    let overlapping = reqs.iter().enumerate().any(|(i, a)| {
        reqs.iter()
            .skip(i + 1)
            .any(|b| a.received < b.answered && b.received < a.answered)
    });
    assert!(
        overlapping,
        "no two ranged GETs in flight together: {reqs:?}"
    );
    // Plain local directories: no FUSE mount, nothing marked remote, nothing staged.
    assert!(common::fuse_mounts(&env.snap_root).is_empty());
    let top = top_snapshot(&out);
    let info = env
        .ctr(
            OURS_NS,
            &["snapshots", "--snapshotter", "stargz", "info", &top],
        )
        .unwrap();
    assert!(!info.contains("containerd.io/snapshot/remote\""), "{info}");
    assert!(staged(&env).is_empty(), "{:?}", staged(&env));

    let theirs = env.view(PLAIN_NS, "overlayfs", &top);
    let ours = env.view(OURS_NS, "stargz", &top);
    let (a, b) = (walk(&theirs), walk(&ours));
    let d = diff(&a, &b);
    assert!(d.is_empty(), "trees differ:\n{}", d.join("\n"));
    // The comparison saw what the image holds (whiteouts applied, opaque dir, links).
    assert!(b.contains_key("opq/new") && !b.contains_key("opq/old1") && !b.contains_key("opq/sub"));
    assert!(!b.contains_key("etc/gone.conf"));
    assert_eq!(b["bin/su"].mode & 0o7777, 0o4755);
    assert_eq!(
        (b["bin/tool"].uid, b["bin/tool"].gid, b["bin/tool"].nlink),
        (1000, 1001, 2)
    );
    assert_eq!(
        b["bin/ping"].xattrs.get("user.origin").map(Vec::as_slice),
        Some(&b"layer-one"[..])
    );
    assert!(b["bin/ping"].xattrs.contains_key("security.capability"));
    // Plain directories: a restart has nothing to mount again, and Mounts of the
    // image's layers need nothing from the daemon's past.
    env.restart_daemon();
    let log = env.daemon_log();
    assert!(
        log.contains("remote snapshots restored restored=0"),
        "{}",
        env.logs()
    );
    // containerd dials the proxy again with a backoff.
    let deadline = Instant::now() + Duration::from_secs(30);
    while env
        .ctr(OURS_NS, &["snapshots", "--snapshotter", "stargz", "ls"])
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "containerd does not reach the daemon again"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let again = env.view(OURS_NS, "stargz", &top);
    let d = diff(&a, &walk(&again));
    assert!(
        d.is_empty(),
        "trees differ after a restart:\n{}",
        d.join("\n")
    );
    assert_eq!(b["dev/fifo"].kind, "fifo");
    assert_eq!(b["big/blob"].size, 20 << 20);
    assert!(b.keys().any(|k| k.len() > 250), "long names");
    assert_eq!(b["bin/sh"].target, "/bin/busybox");
    assert_eq!(env.fallbacks("full_pull").await, 0);
}

/// Pushes one single-layer image per hostile archive, rpulls each through the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_layers_fall_back_with_nothing_written_outside() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let env = Env::start("");
    let marker = format!("evil-{}", std::process::id());
    let mut escape = Tar::new();
    escape.dir("a/", 0o755).raw(
        tar::EntryType::Regular,
        &format!("a/../../{marker}"),
        b"escaped\n",
    );
    let mut absolute = Tar::new();
    absolute.raw(
        tar::EntryType::Regular,
        &format!("/tmp/{marker}"),
        b"escaped\n",
    );
    let mut through = Tar::new();
    through.link(tar::EntryType::Symlink, "x", "/").file(
        &format!("x/tmp/{marker}"),
        b"escaped\n",
        0o644,
        (0, 0),
    );
    let mut hardlink = Tar::new();
    hardlink.link(tar::EntryType::Symlink, "x", "/").link(
        tar::EntryType::Link,
        "y",
        "x/etc/passwd",
    );
    let cases = [
        ("dotdot", escape.finish()),
        ("absolute", absolute.finish()),
        ("through-symlink", through.finish()),
        ("hardlink-through-symlink", hardlink.finish()),
    ];
    let passwd_links = std::fs::metadata("/etc/passwd").unwrap().nlink();
    let mut refused = 0;
    for (i, (name, layer)) in cases.iter().enumerate() {
        let (img, _) = push(
            &reg,
            &reg.host(),
            &format!("fp/{name}"),
            std::slice::from_ref(layer),
        )
        .await;
        let before = env.fallbacks("full_pull").await;
        // containerd's own pull decides what becomes of the layer: unpacked its way or refused.
        let bin =
            Path::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc")).with_file_name("ctr-remote");
        let res = env.tool(
            &bin,
            &format!("h{i}"),
            &["image", "rpull", "--plain-http", &img],
        );
        eprintln!("{name}: containerd's pull: {res:?}");
        assert_eq!(
            env.fallbacks("full_pull").await,
            before + 1,
            "{name}\n{}",
            env.logs()
        );
        let refusals = env.daemon_log().matches("refused:").count();
        assert!(refusals > refused, "{name}: {}", env.logs());
        refused = refusals;
        for outside in [
            env.snap_root.join(&marker),
            env.dir.join(&marker),
            Path::new("/tmp").join(&marker),
            env.snap_root.join("fullpull").join(&marker),
        ] {
            assert!(!outside.exists(), "{name} wrote {}", outside.display());
        }
        assert!(staged(&env).is_empty(), "{name}: {:?}", staged(&env));
        assert_eq!(
            std::fs::metadata("/etc/passwd").unwrap().nlink(),
            passwd_links
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_blob_fails_its_digest_and_falls_back() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let front = testenv::Front::start(testenv::FrontOpts {
        upstream: reg.base_url(),
        corrupt_ranged_blobs: true,
        ..Default::default()
    })
    .await;
    let mut t = Tar::new();
    t.dir("data/", 0o755).file(
        "data/blob",
        &testenv::random_bytes(3 << 20, 3),
        0o644,
        (0, 0),
    );
    let (img, _) = push(&reg, &front.host(), "fp/altered", &[t.finish()]).await;
    let env = Env::start("");
    let out = env.rpull(OURS_NS, &img);
    // Our pull refused the altered bytes; containerd's (whole-blob GETs) got the layer.
    assert!(out.contains("0 layer(s) remote, 1 unpacked"), "{out}");
    assert!(
        env.daemon_log().contains("digest mismatch"),
        "{}",
        env.logs()
    );
    assert_eq!(env.fallbacks("full_pull").await, 1);
    assert!(staged(&env).is_empty(), "{:?}", staged(&env));
    let top = top_snapshot(&out);
    let mut env = env;
    let view = env.view(OURS_NS, "stargz", &top);
    assert_eq!(
        std::fs::metadata(view.join("data/blob")).unwrap().len(),
        3 << 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_pull_off_leaves_plain_layers_to_containerd() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let mut t = Tar::new();
    t.dir("etc/", 0o755).file("etc/x", b"x\n", 0o644, (0, 0));
    let (img, _) = push(&reg, &reg.host(), "fp/off", &[t.finish()]).await;
    let env = Env::start("full_pull = false\n");
    let out = env.rpull(OURS_NS, &img);
    assert!(out.contains("0 layer(s) remote, 1 unpacked"), "{out}");
    assert!(!env.daemon_log().contains("full pull"), "{}", env.logs());
    assert_eq!(env.fallbacks("not_estargz").await, 1);
    assert!(!env.snap_root.join("fullpull").exists());
}
