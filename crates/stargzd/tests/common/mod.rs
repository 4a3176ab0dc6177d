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
