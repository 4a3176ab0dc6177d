//! `ctr-remote layer mount --blob`: a real FUSE mount in the foreground, read through,
//! and unmounted cleanly on SIGTERM.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{corpus, json, missing, run_ok};

fn mounted(dir: &std::path::Path) -> bool {
    let canon = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(canon.to_str().unwrap_or("")))
}

#[test]
fn mounts_a_local_blob_and_unmounts_on_sigterm() {
    if !std::path::Path::new("/dev/fuse").exists() || !nix::unistd::geteuid().is_root() {
        let _: Option<()> = missing("/dev/fuse and root for a FUSE mount");
        return;
    }
    let Some(dir) = corpus() else { return };
    let d = dir.path();
    let bin = env!("CARGO_BIN_EXE_ctr-remote");
    let out = json(&run_ok(
        Command::new(bin)
            .args(["blob", "build", "--json"])
            .arg(d.join("pax.tar"))
            .arg(d.join("l.blob")),
    ));
    let toc = out["tocDigest"].as_str().unwrap().to_string();
    let mnt = d.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut child = Command::new(bin)
        .args(["layer", "mount", "--toc-digest", &toc, "--blob"])
        .arg(d.join("l.blob"))
        .arg(&mnt)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !mounted(&mnt) {
        assert!(Instant::now() < deadline, "mount did not appear");
        assert!(
            child.try_wait().unwrap().is_none(),
            "ctr-remote exited early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let result = std::panic::catch_unwind(|| {
        assert_eq!(
            std::fs::read(mnt.join("etc/config")).unwrap(),
            b"second version\n"
        );
        assert_eq!(
            std::fs::read_link(mnt.join("bin/sh")).unwrap().to_str(),
            Some("tool")
        );
        let big = std::fs::metadata(mnt.join("data/big.bin")).unwrap();
        assert_eq!(big.len(), 9 * 1024 * 1024 + 123);
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = child.wait().unwrap();
    if mounted(&mnt) {
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    }
    result.unwrap();
    assert!(
        status.success(),
        "ctr-remote exits cleanly on SIGTERM: {status}"
    );
    assert!(!mounted(&mnt), "the mount is gone after SIGTERM");
}
