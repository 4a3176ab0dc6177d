//! The CRI path: containerd's CRI plugin configured with `snapshotter = "stargz"` and
//! `disable_snapshot_annotations = false` pulls an eStargz image (CRI ImageService
//! PullImage over containerd's socket); the `cri.*` labels reach our daemon, which mounts
//! the layers lazily.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use common::{fuse_mounts, require, sha, stop, wait_for};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, PullImageRequest};

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

/// Stops containerd, then the daemon (SIGINT: unmount), then detaches leftovers.
struct Teardown {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        for (i, c) in self.children.iter_mut().enumerate().rev() {
            let sig = if i == 0 { libc::SIGINT } else { libc::SIGTERM };
            stop(c, sig, Duration::from_secs(10));
        }
        for m in fuse_mounts(&self.dir).into_iter().rev() {
            if let Ok(c) = std::ffi::CString::new(m) {
                // SAFETY: a valid C string; detaching a mount under our own directory.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

/// An eStargz layer of busybox plus `junk` bytes nobody reads; (blob, diff id, annotations).
fn estargz_layer() -> (Vec<u8>, String, serde_json::Value) {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let junk = testenv::random_bytes(4 << 20, 11);
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [("bin/busybox", &busybox), ("junk.bin", &junk)] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut blob = Vec::new();
    let out = estargz::build(
        &tar[..],
        &mut blob,
        &estargz::BuildOptions {
            codec: estargz::Codec::Gzip { level: 1 },
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let ann: serde_json::Map<String, serde_json::Value> = out
        .annotations
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    (blob, out.diff_id, serde_json::Value::Object(ann))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pull_is_lazy() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let (blob, diff_id, annotations) = estargz_layer();
    let base = reg.base_url();
    let ld = testenv::push_blob(&base, "cri/img", &blob).await;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/busybox", "sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))
    .unwrap();
    let cd = testenv::push_blob(&base, "cri/img", &config).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld,
                    "size": blob.len(), "annotations": annotations}],
    }))
    .unwrap();
    let st = reqwest::Client::new()
        .put(format!("{base}/v2/cri/img/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st.as_u16(), 201);
    let img = format!("{}/cri/img:v1", reg.host());

    let tmp = tempfile::Builder::new()
        .prefix("stargzd-cri-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    let mut guard = Teardown {
        dir: dir.clone(),
        children: Vec::new(),
    };
    let snap_sock = dir.join("run/stargz.sock");
    let snap_root = dir.join("stargz-root");
    std::fs::write(
        dir.join("stargz.toml"),
        "noprefetch = true\nno_background_fetch = true\n",
    )
    .unwrap();
    let daemon = Command::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc"))
        .arg("--address")
        .arg(&snap_sock)
        .arg("--root")
        .arg(&snap_root)
        .arg("--config")
        .arg(dir.join("stargz.toml"))
        .args(["--log-level", "debug"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stargz.log")).unwrap())
        .spawn()
        .unwrap();
    guard.children.push(daemon);
    wait_for(&snap_sock, "containerd-stargz-grpc");

    let d = dir.display();
    let host = reg.host();
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
        s = snap_sock.display()
    );
    std::fs::write(dir.join("containerd.toml"), cfg).unwrap();
    let sock = dir.join("containerd.sock");
    let containerd = Command::new("/usr/bin/containerd")
        .arg("--config")
        .arg(dir.join("containerd.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("containerd.log")).unwrap())
        .spawn()
        .unwrap();
    guard.children.push(containerd);
    wait_for(&sock, "containerd");

    let logs = || {
        format!(
            "--- stargz.log\n{}\n--- containerd.log\n{}",
            std::fs::read_to_string(dir.join("stargz.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
        )
    };
    let path = sock.clone();
    let channel = tonic::transport::Endpoint::try_from("http://[::1]:1")
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
        .unwrap();
    let mut images = ImageServiceClient::new(channel);
    let mut pulled = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while pulled.is_none() {
        // The CRI service answers once its plugin finished initializing.
        match images
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: img.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
        {
            Ok(r) => pulled = Some(r.into_inner().image_ref),
            Err(e) if Instant::now() < deadline => {
                eprintln!("PullImage not yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("PullImage: {e}\n{}", logs()),
        }
    }
    eprintln!("pulled {pulled:?}");

    // The layer is a FUSE mount of our daemon, and only a little of it was fetched.
    let mounts = fuse_mounts(&snap_root);
    assert_eq!(mounts.len(), 1, "FUSE mounts: {mounts:?}\n{}", logs());
    let state = std::fs::read_to_string(
        Path::new(&mounts[0]).join(format!(".stargz-snapshotter/{}.json", sha(&blob))),
    )
    .unwrap_or_else(|e| panic!("state file: {e}\n{}", logs()));
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let (size, fetched) = (
        state["size"].as_u64().unwrap(),
        state["fetchedSize"].as_u64().unwrap(),
    );
    assert!(fetched < size / 2, "not lazy: {state}");
    // CRI sets no stargz.* labels: the FUSE mount above means the cri.* ones were understood.
    let log = std::fs::read_to_string(dir.join("stargz.log")).unwrap();
    assert!(log.contains("remote snapshot committed"), "{}", logs());
    // containerd handed the layer's `toc-tail` annotation to the Prepare as a label:
    // the first read of the layer is a suffix read of exactly TOC and footer.
    let tail = annotations[remote_layer::annotation::TOC_TAIL]
        .as_str()
        .and_then(|t| t.parse::<u64>().ok())
        .expect("toc-tail annotation");
    // Layers are read by the FUSE manager, which logs beside its root.
    let manager_log =
        std::fs::read_to_string(snap_root.join("fuse-manager.log")).unwrap_or_default();
    assert!(
        manager_log.contains(&format!("range=Some(\"bytes=-{tail}\")")),
        "no suffix read of the annotated tail ({tail} bytes)\n{}",
        logs()
    );

    // containerd's own records of the remote snapshot are complete: it lists it in the
    // CRI namespace, and a container of the pulled image runs on it.
    let ctr = |args: &[&str]| {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(&sock)
            .args(["-n", "k8s.io"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "ctr {args:?}: {text}\n{}", logs());
        text
    };
    let ls = ctr(&["snapshot", "--snapshotter", "stargz", "ls"]);
    assert!(
        ls.contains("Committed"),
        "no committed snapshot listed: {ls}"
    );
    let out = ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "stargz",
        &img,
        "cri-run",
        "/bin/busybox",
        "echo",
        "hello from CRI",
    ]);
    assert!(out.contains("hello from CRI"), "{out}");
}
