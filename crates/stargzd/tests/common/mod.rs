//! Small helpers shared by the daemon's end-to-end tests.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Under `CI=true` a missing prerequisite fails the test instead of skipping it.
pub fn ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

/// Waits up to 30 s for `path` (a socket) to appear.
pub fn wait_for(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what} did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Whether every path in `paths` exists. A missing one fails the test under `CI=true`
/// and skips it loudly otherwise; `packages` names the Debian packages that provide them.
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

/// Mount points under `dir` with their filesystem types, in mount order.
pub fn mounts_under(dir: &Path) -> Vec<(String, String)> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let point = l.split(' ').nth(4)?.to_string();
            // The filesystem type follows the " - " separator.
            let fstype = l.split(" - ").nth(1)?.split(' ').next()?.to_string();
            Some((point, fstype))
        })
        .filter(|(m, _)| m.starts_with(&prefix))
        .collect()
}

/// The FUSE mount points under `dir`.
pub fn fuse_mounts(dir: &Path) -> Vec<String> {
    mounts_under(dir)
        .into_iter()
        .filter(|(_, t)| t.starts_with("fuse"))
        .map(|(m, _)| m)
        .collect()
}

/// Detaches every mount under `dir`, innermost first.
pub fn detach_mounts(dir: &Path) {
    for (m, _) in mounts_under(dir).into_iter().rev() {
        if let Ok(c) = std::ffi::CString::new(m) {
            // SAFETY: a valid C string; detaching a mount under the test's own directory.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Sends `sig` and waits up to `wait` for the process to exit, then kills it.
pub fn stop(c: &mut std::process::Child, sig: i32, wait: Duration) {
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
