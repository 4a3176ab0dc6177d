//! End to end with a real containerd 1.6, runc and docker-registry: pull, run, snapshot commands, teardown.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use common::{detach_mounts, mounts_under, require, sha, stop, wait_for};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the processes and detaches every mount under the test directory, even on panic.
struct Teardown {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        for c in self.children.iter_mut().rev() {
            // SIGTERM first so containerd can stop its shims cleanly.
            stop(c, libc::SIGTERM, Duration::from_secs(5));
        }
        // The daemon's FUSE manager outlives its SIGTERM by design.
        kill_fuse_manager(&self.dir.join("stargz-root"));
        detach_mounts(&self.dir);
    }
}

/// Kills the stargz-fuse-manager recorded in `root`'s pid file, if it still runs.
fn kill_fuse_manager(root: &Path) {
    let Ok(text) = std::fs::read_to_string(root.join("fuse-manager.pid")) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    if cmdline.contains("stargz-fuse-manager") && cmdline.contains(&*root.to_string_lossy()) {
        // SAFETY: kill(2) on the manager started for this test's daemon root.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// A gzip tar layer and its diff id.
fn layer(files: &[(&str, &[u8], u32)]) -> (Vec<u8>, String) {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (name, _, _) in files {
        if let Some((d, _)) = name.rsplit_once('/') {
            dirs.insert(d.to_string());
        }
    }
    for d in dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, format!("{d}/"), &[][..]).unwrap();
    }
    for (name, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(*mode);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, *data).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let diff_id = sha(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), diff_id)
}

struct Ctr {
    sock: PathBuf,
}

impl Ctr {
    fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("/usr/bin/ctr")
            .arg("-a")
            .arg(&self.sock)
            .args(["-n", "test"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr");
        let so = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(so)
        } else {
            Err(format!(
                "ctr {args:?}: {so}{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
    fn ok(&self, args: &[&str]) -> String {
        self.run(args).unwrap_or_else(|e| panic!("{e}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_run_and_clean_up_with_containerd() {
    if !require(
        &[
            "/usr/bin/containerd",
            "/usr/bin/ctr",
            "/usr/sbin/runc",
            "/usr/bin/containerd-shim-runc-v2",
            "/bin/busybox",
            "/usr/bin/docker-registry",
        ],
        "containerd runc docker-registry busybox-static",
    ) {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let tmp = tempfile::Builder::new()
        .prefix("stargzd-e2e-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    let mut guard = Teardown {
        dir: dir.clone(),
        children: Vec::new(),
    };

    // Our daemon.
    let snap_sock = dir.join("run/stargz.sock");
    let snap_root = dir.join("stargz-root");
    std::fs::write(dir.join("stargz.toml"), "noprefetch = true\n").unwrap();
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

    // containerd with the proxy plugin.
    let sock = dir.join("containerd.sock");
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
        d = dir.display(),
        s = snap_sock.display()
    );
    std::fs::write(dir.join("containerd.toml"), cfg).unwrap();
    let containerd = Command::new("/usr/bin/containerd")
        .arg("--config")
        .arg(dir.join("containerd.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("containerd.log")).unwrap())
        .spawn()
        .unwrap();
    guard.children.push(containerd);
    wait_for(&sock, "containerd");
    let ctr = Ctr { sock: sock.clone() };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctr.run(&["version"]).is_err() {
        assert!(Instant::now() < deadline, "containerd not answering");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A two-layer image: busybox, then a file on top.
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let (l1, d1) = layer(&[("bin/busybox", &busybox, 0o755)]);
    let (l2, d2) = layer(&[("etc/hello.txt", b"hello from layer two\n", 0o644)]);
    let base = reg.base_url();
    let b1 = testenv::push_blob(&base, "e2e/img", &l1).await;
    let b2 = testenv::push_blob(&base, "e2e/img", &l2).await;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/busybox", "echo", "hello"]},
        "rootfs": {"type": "layers", "diff_ids": [d1, d2]},
    }))
    .unwrap();
    let cd = testenv::push_blob(&base, "e2e/img", &config).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": b1, "size": l1.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": b2, "size": l2.len()},
        ],
    }))
    .unwrap();
    let st = reqwest::Client::new()
        .put(format!("{base}/v2/e2e/img/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st.as_u16(), 201);
    let img = format!("{}/e2e/img:v1", reg.host());

    let result = std::panic::catch_unwind(|| {
        ctr.ok(&[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "stargz",
            &img,
        ]);
        let out = ctr.ok(&[
            "run",
            "--snapshotter",
            "stargz",
            "--rm",
            &img,
            "c1",
            "/bin/busybox",
            "echo",
            "hello",
        ]);
        assert_eq!(out.trim(), "hello");
        let out = ctr.ok(&[
            "run",
            "--snapshotter",
            "stargz",
            "--rm",
            &img,
            "c2",
            "/bin/busybox",
            "cat",
            "/etc/hello.txt",
        ]);
        assert_eq!(out.trim(), "hello from layer two");

        // Two committed layers, chain ids as names.
        let ls = ctr.ok(&["snapshot", "--snapshotter", "stargz", "ls"]);
        let committed: Vec<&str> = ls
            .lines()
            .skip(1)
            .filter(|l| l.contains("Committed"))
            .collect();
        assert_eq!(committed.len(), 2, "{ls}");
        let top = ls
            .lines()
            .skip(1)
            .find(|l| {
                l.contains("Committed")
                    && !l.split_whitespace().nth(1).unwrap_or("").is_empty()
                    && l.split_whitespace().count() == 3
            })
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .unwrap_or_else(|| panic!("no layer with a parent in {ls}"));
        ctr.ok(&[
            "snapshot",
            "--snapshotter",
            "stargz",
            "prepare",
            "work1",
            &top,
        ]);
        let mounts = ctr.ok(&[
            "snapshot",
            "--snapshotter",
            "stargz",
            "mounts",
            "/mnt",
            "work1",
        ]);
        assert!(
            mounts.contains("overlay") && mounts.contains("lowerdir="),
            "{mounts}"
        );
        ctr.ok(&[
            "snapshot",
            "--snapshotter",
            "stargz",
            "commit",
            "mine",
            "work1",
        ]);
        let info = ctr.ok(&["snapshot", "--snapshotter", "stargz", "info", "mine"]);
        assert!(info.contains("Committed"), "{info}");
        let e = ctr
            .run(&["snapshot", "--snapshotter", "stargz", "rm", &top])
            .unwrap_err();
        assert!(
            e.contains("precondition") || e.contains("child") || e.contains("has"),
            "{e}"
        );
        ctr.ok(&["snapshot", "--snapshotter", "stargz", "rm", "mine"]);
        ctr.ok(&["images", "rm", "--sync", &img]);
        // Garbage collection removes the layers once no image refers to them.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ls = ctr.ok(&["snapshot", "--snapshotter", "stargz", "ls"]);
            if ls.lines().nth(1).is_none() {
                break;
            }
            assert!(Instant::now() < deadline, "snapshots left: {ls}");
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let logs = || {
        format!(
            "--- stargz.log\n{}\n--- containerd.log (tail)\n{}",
            std::fs::read_to_string(dir.join("stargz.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("containerd.log"))
                .unwrap_or_default()
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .join("\n")
        )
    };
    if let Err(p) = result {
        eprintln!("{}", logs());
        std::panic::resume_unwind(p);
    }
    let left: Vec<_> = std::fs::read_dir(snap_root.join("snapshotter/snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "snapshot directories left: {left:?}");
    let m = mounts_under(&snap_root);
    assert!(m.is_empty(), "mounts left: {m:?}");
}
