//! What the store's Podman tests share: a scratch directory with a real registry, the
//! store process, a private Podman configuration (storage, registries, temp dirs), test
//! images built from tar layers, conversions, and the container tree listing that runs
//! compare.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

/// Under `CI=true` a missing prerequisite fails the test instead of skipping it.
pub fn ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

/// Whether every path exists; a missing one fails under `CI=true`, else skips loudly.
pub fn require(paths: &[&str], packages: &str) -> bool {
    for p in paths {
        if !Path::new(p).exists() {
            let msg = format!("prerequisite {p} missing (apt-get install -y {packages})");
            assert!(!ci(), "{msg}");
            eprintln!("\n!!!!!!!! SKIPPING TEST: {msg} !!!!!!!!\n");
            return false;
        }
    }
    true
}

pub fn podman_prerequisites() -> bool {
    require(
        &[
            "/usr/bin/podman",
            "/usr/sbin/runc",
            "/usr/bin/docker-registry",
            "/bin/busybox",
            "/dev/fuse",
        ],
        "podman runc docker-registry busybox-static fuse3",
    )
}

pub fn sha(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

pub fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Mount points at or under `dir` with their filesystem types.
pub fn mounts_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let point = l.split(' ').nth(4)?.replace("\\040", " ");
            let fstype = l.split(" - ").nth(1)?.split(' ').next()?.to_string();
            Some((PathBuf::from(point), fstype))
        })
        .filter(|(m, _)| m.starts_with(&prefix))
        .collect()
}

/// Detaches every mount under `dir`, innermost first.
pub fn detach_mounts(dir: &Path) {
    let mut ms = mounts_under(dir);
    ms.sort_by_key(|(m, _)| std::cmp::Reverse(m.components().count()));
    for (m, _) in ms {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Sends `sig` and waits up to `wait` for the process to exit, then kills it.
pub fn stop(c: &mut Child, sig: i32, wait: Duration) {
    // SAFETY: kill(2) on a child we spawned and have not reaped yet.
    unsafe { libc::kill(c.id() as i32, sig) };
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// Polls `f` every 100 ms for up to `secs` seconds.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One file of a test layer.
pub enum Entry<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32, u64),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
}

/// An uncompressed tar of `entries`.
pub fn tar_of(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        match e {
            Entry::Dir(name, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, format!("{name}/"), &[][..]).unwrap();
            }
            Entry::File(name, data, mode, owner) => {
                h.set_mode(*mode);
                h.set_uid(*owner);
                h.set_gid(*owner);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, *data).unwrap();
            }
            Entry::Symlink(name, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, name, target).unwrap();
            }
            Entry::Hardlink(name, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, name, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

pub fn gzip(tar: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(tar).unwrap();
    gz.finish().unwrap()
}

/// Layer 1: busybox, a tree with a symlink, a hard link, a setuid file, a file owned
/// by 1000, a directory layer 2 makes opaque, a file layer 2 deletes, and megabytes
/// of random data no workload reads. Layer 2: a file, a whiteout, an opaque directory
/// and more unread data.
pub fn test_layers() -> Vec<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let big = testenv::random_bytes(6 << 20, 7);
    let big2 = testenv::random_bytes(3 << 20, 8);
    let l1 = tar_of(&[
        Entry::Dir("bin", 0o755),
        Entry::File("bin/busybox", &busybox, 0o755, 0),
        Entry::Dir("etc", 0o755),
        Entry::File("etc/motd", b"lazy pulling with podman\n", 0o644, 0),
        Entry::File("etc/secret", b"only root\n", 0o600, 0),
        Entry::File("etc/owned", b"by a user\n", 0o640, 1000),
        Entry::File("etc/empty", b"", 0o644, 0),
        Entry::Dir("usr", 0o755),
        Entry::Symlink("usr/bin", "../bin"),
        Entry::Hardlink("etc/motd.link", "etc/motd"),
        Entry::File("bin/suid", b"#!/bin/busybox sh\n", 0o4755, 0),
        Entry::Dir("opaque", 0o755),
        Entry::File("opaque/old", b"hidden by layer 2\n", 0o644, 0),
        Entry::File("deleted", b"deleted by layer 2\n", 0o644, 0),
        Entry::Dir("junk", 0o755),
        Entry::File("junk/big", &big, 0o644, 0),
    ]);
    let l2 = tar_of(&[
        Entry::Dir("etc", 0o755),
        Entry::File("etc/hello.txt", b"hello from layer two\n", 0o644, 0),
        Entry::File(".wh.deleted", b"", 0o644, 0),
        Entry::Dir("opaque", 0o755),
        Entry::File("opaque/.wh..wh..opq", b"", 0o644, 0),
        Entry::File("opaque/new", b"layer 2's own\n", 0o644, 0),
        Entry::Dir("junk", 0o755),
        Entry::File("junk/big2", &big2, 0o644, 0),
    ]);
    vec![l1, l2]
}

/// Pushes gzip layers of `tars`, a config and a Docker manifest as `repo:tag`;
/// returns the reference.
pub async fn push_gzip_image(
    reg: &testenv::Registry,
    repo: &str,
    tag: &str,
    tars: &[Vec<u8>],
) -> String {
    let base = reg.base_url();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for t in tars {
        let blob = gzip(t);
        let d = testenv::push_blob(&base, repo, &blob).await;
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "digest": d, "size": blob.len(),
        }));
        diff_ids.push(sha(t));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/busybox", "sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let cd = testenv::push_blob(&base, repo, &config).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": cd, "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let st = reqwest::Client::new()
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header(
            "content-type",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .body(manifest)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st.as_u16(), 201, "push manifest");
    format!("{}/{repo}:{tag}", reg.host())
}

/// Converts `src` to `dst` in the registry with this workspace's converter.
pub async fn convert_ours(src: &str, dst: &str, target: convert::Target) {
    convert_with(src, dst, target, std::sync::Arc::new(registry::Anonymous)).await
}

/// [`convert_ours`] with credentials from `keychain`.
pub async fn convert_with(
    src: &str,
    dst: &str,
    target: convert::Target,
    keychain: std::sync::Arc<dyn registry::Keychain>,
) {
    let client = registry::Client::new(registry::RegistryConfig::default(), keychain).unwrap();
    let s = convert::Store::registry(client.clone(), registry::Reference::parse(src).unwrap());
    let d = convert::Store::registry(client, registry::Reference::parse(dst).unwrap());
    let opts = convert::ConvertOptions {
        layer: convert::LayerOptions {
            target,
            gzip_level: 1,
            threads: 2,
            ..Default::default()
        },
        oci: true,
        ..Default::default()
    };
    convert::convert(&s, &d, &opts).await.unwrap();
}

/// The layer descriptors of `reference`'s manifest.
pub async fn manifest_layers(
    reg: &testenv::Registry,
    repo: &str,
    tag: &str,
) -> Vec<serde_json::Value> {
    let m: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v2/{repo}/manifests/{tag}", reg.base_url()))
        .header(
            "accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    m["layers"].as_array().cloned().unwrap_or_default()
}

/// `rootfs.diff_ids` of the image config `repo:tag` names.
pub async fn diff_ids(reg: &testenv::Registry, repo: &str, tag: &str) -> Vec<String> {
    let m: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v2/{repo}/manifests/{tag}", reg.base_url()))
        .header(
            "accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let digest = m["config"]["digest"].as_str().unwrap();
    let c: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v2/{repo}/blobs/{digest}", reg.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    c["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect()
}

/// A scratch directory with the store's process and Podman's private configuration.
pub struct Env {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
    pub store: Option<Child>,
    pub mountpoint: PathBuf,
    pub root: PathBuf,
    pub store_config: String,
    /// Environment for the store process (credentials).
    pub store_env: Vec<(String, String)>,
    pub registries: Vec<String>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for p in [self.lazy(), self.ordinary()] {
            let _ = p.run(&["rm", "-af", "-t", "0"]);
            let _ = p.run(&["rmi", "-af"]);
        }
        if let Some(mut c) = self.store.take() {
            stop(&mut c, libc::SIGINT, Duration::from_secs(15));
        }
        detach_mounts(&self.dir);
    }
}

impl Env {
    /// A scratch directory for images of `registries` (`host:port`, plain HTTP).
    pub fn new(registries: &[String], store_config: &str) -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("stargz-store-podman-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        let env = Env {
            mountpoint: dir.join("store"),
            root: dir.join("root"),
            dir,
            _tmp: tmp,
            store: None,
            store_config: store_config.to_string(),
            store_env: Vec::new(),
            registries: registries.to_vec(),
        };
        std::fs::create_dir_all(&env.mountpoint).unwrap();
        let mut reg = String::from("unqualified-search-registries = []\n");
        for r in registries {
            reg.push_str(&format!(
                "[[registry]]\nlocation = \"{r}\"\ninsecure = true\n"
            ));
        }
        std::fs::write(env.dir.join("registries.conf"), reg).unwrap();
        for (name, store) in [("lazy", true), ("ordinary", false)] {
            let mut conf = format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{d}/{name}/graph\"\nrunroot = \"{d}/{name}/run\"\n",
                d = env.dir.display()
            );
            if store {
                conf.push_str(&format!(
                    "[storage.options]\nadditionallayerstores = [\"{}:ref\"]\n",
                    env.mountpoint.display()
                ));
            }
            std::fs::create_dir_all(env.dir.join(name).join("tmp")).unwrap();
            std::fs::write(
                env.dir.join(format!("{name}.auth.json")),
                "{\"auths\": {}}\n",
            )
            .unwrap();
            std::fs::write(env.dir.join(format!("{name}.storage.conf")), conf).unwrap();
        }
        std::fs::write(env.dir.join("store.toml"), store_config).unwrap();
        env
    }

    /// Starts (or starts again) the store and waits for its mount.
    pub fn start_store(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("store.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stargz-store"));
        // No credentials from the host: each test says where its own come from.
        cmd.env("REGISTRY_AUTH_FILE", self.dir.join("no-auth.json"))
            .env("HOME", &self.dir)
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("DOCKER_CONFIG");
        for (k, v) in &self.store_env {
            cmd.env(k, v);
        }
        let child = cmd
            .arg("--root")
            .arg(&self.root)
            .arg("--config")
            .arg(self.dir.join("store.toml"))
            .args(["--log-level", "debug"])
            .arg(&self.mountpoint)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.store = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mp = self.mountpoint.clone();
        while !mounts_under(&mp)
            .iter()
            .any(|(m, t)| *m == mp && t.starts_with("fuse"))
        {
            let exited = self.store.as_mut().map(|c| c.try_wait());
            assert!(
                Instant::now() < deadline && matches!(exited, Some(Ok(None))),
                "the store did not mount ({exited:?}):\n{}",
                self.store_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the store with `sig`.
    pub fn stop_store(&mut self, sig: i32) {
        if let Some(mut c) = self.store.take() {
            stop(&mut c, sig, Duration::from_secs(20));
        }
    }

    pub fn store_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("store.log")).unwrap_or_default()
    }

    /// Podman with the store configured.
    pub fn lazy(&self) -> Podman {
        Podman::new(&self.dir, "lazy")
    }

    /// Podman without it.
    pub fn ordinary(&self) -> Podman {
        Podman::new(&self.dir, "ordinary")
    }

    /// Layer mounts of the store under its pool directory.
    pub fn pool_mounts(&self) -> Vec<PathBuf> {
        mounts_under(&self.root.join("pool"))
            .into_iter()
            .filter(|(_, t)| t.starts_with("fuse"))
            .map(|(m, _)| m)
            .collect()
    }

    /// The fetch state of layer `digest` of `image`, read through the store's tree:
    /// (fetched bytes, blob size).
    pub fn fetch_state(&self, image: &str, digest: &str) -> (u64, u64) {
        let p = self
            .mountpoint
            .join(b64(image))
            .join(digest)
            .join("diff/.stargz-snapshotter")
            .join(format!("{digest}.json"));
        let text = std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", p.display(), self.store_log()));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        (
            v["fetchedSize"].as_u64().unwrap(),
            v["size"].as_u64().unwrap(),
        )
    }
}

/// Podman with a private storage configuration.
pub struct Podman {
    dir: PathBuf,
    name: String,
    pub authfile: Option<PathBuf>,
}

/// Lists the container's tree (modes, owners, sizes, link targets, contents' digests)
/// outside what the engine itself mounts or writes.
pub const LIST_TREE: &str = r#"cd / && busybox find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run -o -path ./etc/hostname -o -path ./etc/hosts -o -path ./etc/resolv.conf -o -path ./.stargz-snapshotter \) -prune -o -print | busybox sort | while read -r p; do if [ -L "$p" ]; then echo "$p link $(busybox readlink "$p")"; elif [ -d "$p" ]; then busybox stat -c '%n dir %a %u %g' "$p"; else busybox stat -c '%n file %a %u %g %s %h' "$p"; busybox sha256sum "$p" | busybox cut -d' ' -f1; fi; done; echo END-OF-TREE"#;

impl Podman {
    fn new(dir: &Path, name: &str) -> Podman {
        Podman {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            authfile: None,
        }
    }

    pub fn graphroot(&self) -> PathBuf {
        self.dir.join(&self.name).join("graph")
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new("/usr/bin/podman");
        c.env(
            "CONTAINERS_STORAGE_CONF",
            self.dir.join(format!("{}.storage.conf", self.name)),
        )
        .env(
            "CONTAINERS_REGISTRIES_CONF",
            self.dir.join("registries.conf"),
        )
        .env("HOME", &self.dir)
        .env_remove("XDG_RUNTIME_DIR")
        .env(
            "REGISTRY_AUTH_FILE",
            self.authfile
                .clone()
                .unwrap_or_else(|| self.dir.join(format!("{}.auth.json", self.name))),
        )
        .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
        .arg("--tmpdir")
        .arg(self.dir.join(&self.name).join("tmp"))
        .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run podman")
    }

    /// Runs podman and returns stdout; panics with everything on failure.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let so = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "podman {args:?} ({}): {so}{}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        so
    }

    /// `podman run` of `script` in a new container without network.
    pub fn sh(&self, image: &str, script: &str) -> String {
        self.ok(&[
            "run",
            "--rm",
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
            image,
            "/bin/busybox",
            "sh",
            "-c",
            script,
        ])
    }

    /// The container's tree listing (see [`LIST_TREE`]).
    pub fn tree(&self, image: &str) -> String {
        let out = self.sh(image, LIST_TREE);
        assert!(out.ends_with("END-OF-TREE\n"), "listing cut short: {out}");
        out
    }

    /// Image layers stored in the graph root that point into an additional layer store.
    pub fn additional_layers(&self) -> usize {
        std::fs::read_dir(self.graphroot().join("overlay"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().join("additionallayer").exists())
                    .count()
            })
            .unwrap_or(0)
    }
}
