//! `ctr-remote image rpull` against a real containerd and registry. The native
//! snapshotter refuses remote mounts, so this covers the fetch-and-unpack path,
//! the content store writes and the image record.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{missing, run_ok};
use registry::{Client, Reference};
use serde_json::json;
use sha2::{Digest as _, Sha256};

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    fn sock(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    fn start() -> Option<Containerd> {
        let bin = testenv::require_tool("containerd")?;
        if !nix::unistd::geteuid().is_root() {
            return missing("root (containerd)");
        }
        let dir = tempfile::Builder::new()
            .prefix("ctd-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let d = dir.path().display().to_string();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/c.sock\"\n\
             [ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n\
             [debug]\n  address = \"{d}/debug.sock\"\n"
        );
        std::fs::write(dir.path().join("config.toml"), config).expect("config");
        let log = std::fs::File::create(dir.path().join("log")).expect("log");
        let child = Command::new(bin)
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd");
        let c = Containerd { child, dir };
        let start = Instant::now();
        while !c.sock().exists() {
            if start.elapsed() > Duration::from_secs(30) {
                panic!(
                    "containerd did not start: {}",
                    std::fs::read_to_string(c.dir.path().join("log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(c)
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.sock())
            .args(["-n", "rpulltest"]);
        c
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Snapshots may still be mounted by the native snapshotter's bind mounts.
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.path().join("root"))
            .stderr(Stdio::null())
            .status();
    }
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).expect("tar");
    }
    b.into_inner().expect("tar")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

fn chain(diff_ids: &[String]) -> String {
    let mut c = diff_ids[0].clone();
    for d in &diff_ids[1..] {
        c = sha(format!("{c} {d}").as_bytes());
    }
    c
}

#[test]
fn rpull_unpacks_when_the_snapshotter_refuses() {
    let Some(ctd) = Containerd::start() else {
        return;
    };
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default())
        .or_else(|| missing("docker-registry"))
    else {
        return;
    };
    let host = reg.host();
    let tars = [
        tar_of(&[("etc/a.txt", b"one")]),
        tar_of(&[("etc/b.txt", b"two")]),
    ];
    let blobs: Vec<Vec<u8>> = tars.iter().map(|t| gzip(t)).collect();
    let diff_ids: Vec<String> = tars.iter().map(|t| sha(t)).collect();
    let arch = registry::Platform::host().architecture;
    let config = serde_json::to_vec(&json!({"architecture": arch, "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids}}))
    .expect("json");
    let manifest = serde_json::to_vec(&json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": blobs.iter().map(|b| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": sha(b), "size": b.len()})).collect::<Vec<_>>()}))
    .expect("json");
    let r = Reference::parse(&format!("{host}/rpull/app:v1")).expect("ref");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let c = Client::anonymous();
        for b in blobs.iter().chain(std::iter::once(&config)) {
            c.push_blob(&r, b.clone().into(), &Default::default())
                .await
                .expect("push");
        }
        c.push_manifest(
            &r,
            "application/vnd.oci.image.manifest.v1+json",
            manifest.clone().into(),
        )
        .await
        .expect("manifest");
    });

    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ctr-remote"))
            .arg("--address")
            .arg(ctd.sock())
            .args([
                "-n",
                "rpulltest",
                "image",
                "rpull",
                "--snapshotter",
                "native",
            ])
            .args(extra)
            .arg(format!("{host}/rpull/app:v1"))
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(ctd.dir.path().join("log")).unwrap_or_default()
        );
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (digest, err) = run(&[]);
    assert_eq!(digest, sha(&manifest));
    assert!(err.contains("2 unpacked"), "{err}");

    let images =
        String::from_utf8_lossy(&run_ok(ctd.ctr().args(["images", "ls", "-q"]))).to_string();
    assert!(images.contains(&format!("{host}/rpull/app:v1")), "{images}");
    let snaps = String::from_utf8_lossy(&run_ok(ctd.ctr().args([
        "snapshots",
        "--snapshotter",
        "native",
        "ls",
    ])))
    .to_string();
    assert!(snaps.contains(&chain(&diff_ids)), "{snaps}");
    let content =
        String::from_utf8_lossy(&run_ok(ctd.ctr().args(["content", "ls", "-q"]))).to_string();
    assert!(content.contains(&sha(&config)) && content.contains(&sha(&manifest)));

    // A second pull finds every snapshot in place; --label labels the image record.
    let (_, err) = run(&["--label", "org.example/pulled-by=test", "-k"]);
    assert!(err.contains("2 already present"), "{err}");
    let ls = String::from_utf8_lossy(&run_ok(ctd.ctr().args(["images", "ls"]))).to_string();
    assert!(ls.contains("org.example/pulled-by=test"), "{ls}");
}
