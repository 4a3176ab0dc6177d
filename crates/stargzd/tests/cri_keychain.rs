//! The CRI keychain end to end: kubelet's calls (a `k8s-cri` client) go to our socket,
//! which forwards them to containerd's CRI plugin and keeps each `PullImage`'s
//! credentials for the layers it mounts. The registry wants bearer tokens from an
//! issuer that checks a password, and the registry stops accepting each token after
//! a few seconds while the issuer claims five minutes (tokens that expire under a
//! client still trusting them). Private eStargz layers are mounted lazily with the
//! pull's credentials; containers of the image read them, before and after the
//! daemon restarts (with a fresh FUSE manager too: the credentials come back from the
//! file they are kept in) and after the tokens expired. Pulls without credentials fail
//! with the registry's answer, and a plain gzip image is pulled in full by the daemon
//! with the pull's credentials (no fallback to containerd's pull).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use common::{detach_mounts, fuse_mounts, require, sha, stop, wait_for};

use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{AuthConfig, ImageFsInfoRequest, ImageSpec, PullImageRequest};
use k8s_cri::v1alpha2 as alpha;
use registry::{Credential, Reference, StaticKeychain};
use tonic::transport::Channel;

const USER: &str = "kube-puller";
const PASSWORD: &str = "pull-secret-7c1e";
/// Seconds the registry accepts a token for.
const TOKEN_LIFE: u64 = 8;

fn prerequisites() -> bool {
    require(
        &[
            "/usr/bin/containerd",
            "/usr/bin/ctr",
            "/usr/bin/docker-registry",
            "/bin/busybox",
            "/dev/fuse",
        ],
        "containerd docker-registry busybox-static fuse3",
    )
}

/// containerd and the daemon in a scratch directory; stopped, and every mount under
/// the directory detached, on drop.
struct Env {
    dir: PathBuf,
    daemon: Option<Child>,
    containerd: Option<Child>,
    snap_sock: PathBuf,
    snap_root: PathBuf,
    sock: PathBuf,
    metrics: String,
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.containerd.is_some() {
            for id in self.ctr(&["task", "ls", "-q"]).1.lines() {
                self.kill_task(id.trim());
            }
        }
        if let Some(mut c) = self.containerd.take() {
            stop(&mut c, libc::SIGTERM, Duration::from_secs(10));
        }
        if let Some(mut c) = self.daemon.take() {
            // SIGINT: unmount everything and stop the FUSE manager.
            stop(&mut c, libc::SIGINT, Duration::from_secs(15));
        }
        detach_mounts(&self.dir);
    }
}

impl Env {
    fn start_daemon(&mut self) {
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
            .args(["--log-level", "debug,h2=info,tower=info,hyper_util=info"])
            // No docker config: the CRI pulls are the only source of credentials.
            .env("DOCKER_CONFIG", self.dir.join("no-docker-config"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(daemon);
        wait_for(&self.snap_sock, "containerd-stargz-grpc");
        // containerd reconnects to a restarted snapshotter after a backoff.
        if self.containerd.is_some() {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let (ok, text) = self.ctr(&["snapshot", "--snapshotter", "stargz", "ls"]);
                if ok {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "containerd did not reconnect: {text}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    fn stop_daemon(&mut self, sig: i32) {
        if let Some(mut c) = self.daemon.take() {
            stop(&mut c, sig, Duration::from_secs(15));
        }
    }

    /// `ctr -n k8s.io ARGS`: (success, stdout + stderr).
    fn ctr(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(&self.sock)
            .args(["-n", "k8s.io"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.ctr(args);
        assert!(ok, "ctr {args:?}: {text}\n{}", self.logs());
        text
    }

    fn kill_task(&self, id: &str) {
        if id.is_empty() {
            return;
        }
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !self.ctr(&["task", "rm", id]).0 {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.ctr(&["container", "rm", id]);
    }

    /// Output of `args` run in the task `id`. `ctr task exec` now and then returns
    /// before the output reached it: ask again under a new exec id.
    fn exec(&self, id: &str, exec_id: &str, args: &[&str]) -> String {
        let mut out = String::new();
        for attempt in 0..3 {
            let eid = format!("{exec_id}-{attempt}");
            let mut full = vec!["task", "exec", "--exec-id", eid.as_str(), id];
            full.extend_from_slice(args);
            out = self.ok(&full);
            if !out.trim().is_empty() {
                break;
            }
        }
        out
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stargz.log")).unwrap_or_default()
    }

    fn logs(&self) -> String {
        let manager = std::fs::read_dir(&self.snap_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        format!(
            "--- stargz.log\n{}\n--- manager logs\n{manager}\n--- containerd.log\n{}",
            self.log(),
            std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
        )
    }

    async fn channel(&self) -> Channel {
        channel(&self.snap_sock).await
    }

    async fn scrape(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// A gRPC channel to the unix socket `path`.
async fn channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::try_from("http://[::1]:1")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// (blob, diff id, layer descriptor annotations)
type Layer = (Vec<u8>, String, serde_json::Map<String, serde_json::Value>);

fn estargz_layer(tar: &[u8]) -> Layer {
    let mut blob = Vec::new();
    let out = estargz::build(
        tar,
        &mut blob,
        &estargz::BuildOptions {
            codec: estargz::Codec::Gzip { level: 1 },
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let ann = out
        .annotations
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    (blob, out.diff_id, ann)
}

fn gzip_layer(tar: &[u8]) -> Layer {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(tar).unwrap();
    (gz.finish().unwrap(), sha(tar), serde_json::Map::new())
}

/// Pushes a one-layer image as `host/repo:v1` with the private credentials.
async fn push(host: &str, repo: &str, layer: &Layer) -> String {
    let c = registry::Client::new(
        registry::RegistryConfig::default(),
        Arc::new(StaticKeychain::new(
            None,
            Credential::Basic {
                username: USER.into(),
                password: PASSWORD.into(),
            },
        )),
    )
    .unwrap();
    let image = format!("{host}/{repo}:v1");
    let r = Reference::parse(&image).unwrap();
    let (blob, diff_id, ann) = layer;
    let (ld, _) = c
        .push_blob(&r, blob.clone().into(), &Default::default())
        .await
        .unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/busybox", "sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))
    .unwrap();
    let (cd, _) = c
        .push_blob(&r, config.clone().into(), &Default::default())
        .await
        .unwrap();
    let mut desc = serde_json::json!({
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": ld.to_string(), "size": blob.len(),
    });
    if !ann.is_empty() {
        desc["annotations"] = serde_json::Value::Object(ann.clone());
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": registry::OCI_MANIFEST,
        "config": {"mediaType": registry::OCI_CONFIG, "digest": cd.to_string(), "size": config.len()},
        "layers": [desc],
    });
    c.push_manifest_json(&r, registry::OCI_MANIFEST, &manifest)
        .await
        .unwrap();
    image
}

fn pull(image: &str, auth: Option<(&str, &str)>) -> PullImageRequest {
    PullImageRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        auth: auth.map(|(u, p)| AuthConfig {
            username: u.into(),
            password: p.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn sample(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_images_through_the_cri_proxy() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("stargzd-crikc-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("issuer")).unwrap();
    let issuer = testenv::TokenIssuer::start(
        &dir.join("issuer"),
        testenv::IssuerOpts {
            user: Some((USER.into(), PASSWORD.into())),
            expires_in: 300,
            registry_life: TOKEN_LIFE,
            ..Default::default()
        },
    )
    .await;
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts {
        token: Some(issuer.registry_config()),
        ..Default::default()
    }) else {
        return;
    };
    let host = reg.host();

    // Files never read until a given step, each big enough to be fetched on its own.
    let never: Vec<Vec<u8>> = (0..3)
        .map(|i| testenv::random_bytes(1 << 20, 40 + i))
        .collect();
    let sums: Vec<String> = never
        .iter()
        .map(|d| sha(d).trim_start_matches("sha256:").to_string())
        .collect();
    let busybox = std::fs::read("/bin/busybox").unwrap();
    // Megabytes nobody reads between the files, so no read-ahead reaches the next one.
    let junk: Vec<Vec<u8>> = (0..3)
        .map(|i| testenv::random_bytes(4 << 20, 30 + i))
        .collect();
    let secret = b"private bytes\n".to_vec();
    let tar = tar_of(&[
        ("bin/busybox", &busybox),
        ("secret.txt", &secret),
        ("junk0.bin", &junk[0]),
        ("never0.bin", &never[0]),
        ("junk1.bin", &junk[1]),
        ("never1.bin", &never[1]),
        ("junk2.bin", &junk[2]),
        ("never2.bin", &never[2]),
    ]);
    let lazy = estargz_layer(&tar);
    let lazy_blob_digest = sha(&lazy.0);
    let private = push(&host, "team/private", &lazy).await;
    let plain = push(
        &host,
        "team/plain",
        &gzip_layer(&tar_of(&[
            ("bin/busybox", &busybox),
            ("plain.txt", b"plain\n"),
        ])),
    )
    .await;

    let metrics = format!("127.0.0.1:{}", testenv::free_port());
    let d = dir.display();
    std::fs::write(
        dir.join("stargz.toml"),
        format!(
            "noprefetch = true\nno_background_fetch = true\nmetrics_address = \"{metrics}\"\n\
             [cri_keychain]\nenable_keychain = true\nimage_service_path = \"{d}/containerd.sock\"\n"
        ),
    )
    .unwrap();
    let mut env = Env {
        snap_sock: dir.join("run/stargz.sock"),
        snap_root: dir.join("stargz-root"),
        sock: dir.join("containerd.sock"),
        dir: dir.clone(),
        daemon: None,
        containerd: None,
        metrics,
    };
    env.start_daemon();
    let cfg = format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  disable_cgroup = true
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "stargz"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{host}"]
    endpoint = ["http://{host}"]
[proxy_plugins.stargz]
  type = "snapshot"
  address = "{s}"
"#,
        s = env.snap_sock.display()
    );
    std::fs::write(dir.join("containerd.toml"), cfg).unwrap();
    let containerd = Command::new("/usr/bin/containerd")
        .arg("--config")
        .arg(dir.join("containerd.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("containerd.log")).unwrap())
        .spawn()
        .unwrap();
    env.containerd = Some(containerd);
    wait_for(&env.sock, "containerd");

    // Our socket forwards the image service once containerd's CRI plugin is up.
    let mut images = ImageServiceClient::new(env.channel().await);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match images.image_fs_info(ImageFsInfoRequest {}).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("ImageFsInfo not yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("ImageFsInfo through our socket: {e}\n{}", env.logs()),
        }
    }
    let cred_file = env.snap_root.join(registry::CRI_CREDENTIALS_FILE);

    // Without credentials, and with wrong ones, the registry's refusal comes back;
    // nothing is mounted, nothing falls back, and nothing is kept.
    for (what, auth) in [("none", None), ("wrong", Some((USER, "wrong-pw-9d")))] {
        let e = images
            .pull_image(pull(&private, auth))
            .await
            .expect_err(what);
        let msg = e.message().to_ascii_lowercase();
        assert!(
            msg.contains("401") || msg.contains("unauthorized"),
            "{what}: {e}\n{}",
            env.logs()
        );
    }
    assert!(fuse_mounts(&env.snap_root).is_empty());
    assert!(!env.log().contains("falling back to an ordinary pull"));
    let kept = std::fs::read_to_string(&cred_file).unwrap_or_default();
    assert!(!kept.contains("wrong-pw-9d"), "{kept}");

    // With the credentials kubelet would send: a lazy, remote snapshot.
    let tokens_before_pull = issuer.tokens_issued();
    let pulled = images
        .pull_image(pull(&private, Some((USER, PASSWORD))))
        .await
        .unwrap_or_else(|e| panic!("PullImage with credentials: {e}\n{}", env.logs()))
        .into_inner()
        .image_ref;
    assert!(pulled.starts_with("sha256:"), "{pulled}");
    let mounts = fuse_mounts(&env.snap_root);
    assert_eq!(mounts.len(), 1, "FUSE mounts: {mounts:?}\n{}", env.logs());
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(&mounts[0]).join(format!(".stargz-snapshotter/{lazy_blob_digest}.json")),
        )
        .unwrap(),
    )
    .unwrap();
    let size = state["size"].as_u64().unwrap();
    assert!(
        state["fetchedSize"].as_u64().unwrap() < size / 2,
        "not lazy: {state}"
    );
    assert!(
        env.log().contains("remote snapshot committed"),
        "{}",
        env.logs()
    );
    assert!(issuer.tokens_issued() > tokens_before_pull);
    // Kept for a restart: root's alone, the pulled repository, the right password.
    let meta = std::fs::metadata(&cred_file).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    let kept = std::fs::read_to_string(&cred_file).unwrap();
    assert!(
        kept.contains("team/private") && kept.contains(PASSWORD) && !kept.contains("wrong-pw-9d"),
        "{kept}"
    );
    assert!(
        !env.log().contains(PASSWORD),
        "a credential reached the log"
    );

    // v1alpha2 (kubelets before 1.26) is served and forwarded too.
    let status = alpha::image_service_client::ImageServiceClient::new(env.channel().await)
        .image_status(alpha::ImageStatusRequest {
            image: Some(alpha::ImageSpec {
                image: private.clone(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.image.as_ref().map(|i| i.id.as_str()),
        Some(pulled.as_str())
    );

    // A container of the image reads the private files from the lazy mount.
    env.ok(&[
        "run",
        "-d",
        "--snapshotter",
        "stargz",
        &private,
        "priv",
        "/bin/busybox",
        "sleep",
        "600",
    ]);
    let out = env.exec("priv", "secret", &["/bin/busybox", "cat", "/secret.txt"]);
    assert_eq!(out, "private bytes\n");
    let out = env.exec("priv", "n0", &["/bin/busybox", "sha256sum", "/never0.bin"]);
    assert_eq!(out.trim(), format!("{}  /never0.bin", sums[0]));

    // The daemon restarts (the FUSE manager keeps the mount); the registry stopped
    // accepting the tokens the manager holds meanwhile. A file never read before
    // is read through the running container: the expired token was replaced.
    env.stop_daemon(libc::SIGTERM);
    env.start_daemon();
    let tokens = issuer.tokens_issued();
    tokio::time::sleep(Duration::from_secs(TOKEN_LIFE + 2)).await;
    let fetched = |exec_id: &str| {
        let out = env.exec(
            "priv",
            exec_id,
            &[
                "/bin/busybox",
                "cat",
                &format!("/.stargz-snapshotter/{lazy_blob_digest}.json"),
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["fetchedSize"].as_u64().unwrap()
    };
    let before = fetched("st1a");
    let out = env.exec("priv", "n1", &["/bin/busybox", "sha256sum", "/never1.bin"]);
    assert_eq!(
        out.trim(),
        format!("{}  /never1.bin", sums[1]),
        "{}",
        env.logs()
    );
    let after = fetched("st1b");
    assert!(
        after >= before + (1 << 20) / 2,
        "never1.bin was not fetched by the read: {before} -> {after}"
    );
    assert!(
        issuer.tokens_issued() > tokens,
        "no new token after expiry\n{}",
        env.logs()
    );

    // Both processes start afresh (SIGINT unmounts and stops the manager): the
    // credentials come back from the file, and a new container reads the last file
    // nobody has read.
    env.kill_task("priv");
    env.stop_daemon(libc::SIGINT);
    assert!(fuse_mounts(&env.snap_root).is_empty());
    env.start_daemon();
    let out = env.ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "stargz",
        &private,
        "priv2",
        "/bin/busybox",
        "sha256sum",
        "/never2.bin",
    ]);
    assert!(
        out.contains(&format!("{}  /never2.bin", sums[2])),
        "{out}\n{}",
        env.logs()
    );
    assert_eq!(fuse_mounts(&env.snap_root).len(), 1);

    // A plain gzip image is pulled in full by the daemon, with the pull's credentials.
    let mut images = ImageServiceClient::new(env.channel().await);
    images
        .pull_image(pull(&plain, Some((USER, PASSWORD))))
        .await
        .unwrap_or_else(|e| panic!("PullImage plain: {e}\n{}", env.logs()));
    let text = env.scrape().await;
    assert_eq!(
        sample(
            &text,
            "stargz_layer_fallbacks_total",
            r#"reason="not_estargz""#
        ),
        None,
        "{text}"
    );
    assert_eq!(
        env.log().matches("layer filled by a full pull").count(),
        1,
        "{}",
        env.logs()
    );
    assert!(
        !env.log().contains("falling back to an ordinary pull"),
        "{}",
        env.logs()
    );
    // The layer metrics of the FUSE manager are served beside it.
    assert!(text.contains("stargz_fs_"), "{text}");
    let out = env.ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "stargz",
        &plain,
        "plain1",
        "/bin/busybox",
        "cat",
        "/plain.txt",
    ]);
    assert!(out.contains("plain"), "{out}");
    drop(env);
    drop(tmp);
}

/// With `listen_path`, the image service is served on a socket of its own (and
/// forwarded: with no containerd behind it, `UNAVAILABLE`), while the daemon's socket
/// serves containerd's Snapshots API alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_path_serves_the_image_service_apart() {
    let tmp = tempfile::Builder::new()
        .prefix("stargzd-crilisten-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let d = dir.display();
    std::fs::write(
        dir.join("stargz.toml"),
        format!(
            "[fuse_manager]\nenable = false\n[cri_keychain]\nenable_keychain = true\n\
             image_service_path = \"{d}/absent/containerd.sock\"\nlisten_path = \"{d}/cri/cri.sock\"\n"
        ),
    )
    .unwrap();
    let sock = dir.join("run/stargz.sock");
    let cri_sock = dir.join("cri/cri.sock");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc"))
        .arg("--address")
        .arg(&sock)
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--config")
        .arg(dir.join("stargz.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stargz.log")).unwrap())
        .spawn()
        .unwrap();
    wait_for(&sock, "containerd-stargz-grpc");
    wait_for(&cri_sock, "the image service socket");
    let log = || std::fs::read_to_string(dir.join("stargz.log")).unwrap_or_default();

    let e = ImageServiceClient::new(channel(&cri_sock).await)
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .expect_err("no containerd behind it");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}\n{}", log());
    let e = ImageServiceClient::new(channel(&sock).await)
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .expect_err("not served on the daemon's socket");
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");
    assert!(log().contains("CRI image service unreachable"), "{}", log());
    stop(&mut daemon, libc::SIGINT, Duration::from_secs(10));
    assert!(
        !cri_sock.exists(),
        "the image service socket is removed at exit"
    );
}
