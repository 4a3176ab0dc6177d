//! Helpers shared by the integration tests: locating the reference checker, making
//! the tar corpus, and failing (not skipping) under CI when a prerequisite is missing.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// True when running under CI, where a missing prerequisite is a failure.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Reports a missing prerequisite: a panic under CI, a loud skip otherwise.
/// Returns `None` so callers can `let Some(x) = ... else { return };`.
pub fn missing<T>(what: &str) -> Option<T> {
    if ci() {
        panic!("prerequisite missing under CI=true: {what}");
    }
    eprintln!("SKIPPED: prerequisite missing: {what}");
    None
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The `shared/` directory next to the checkout (or `$STARGZ_SHARED_DIR`).
pub fn shared_dir() -> PathBuf {
    std::env::var_os("STARGZ_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared"))
}

/// The reference checker binary, built once per test process.
pub fn oracle() -> Option<PathBuf> {
    static ORACLE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = ORACLE.get_or_init(|| {
        if let Some(p) = std::env::var_os("ESTARGZ_ORACLE") {
            return Ok(PathBuf::from(p));
        }
        let out_dir = workspace_root().join("target/oracle");
        let script = shared_dir().join("oracle/build.sh");
        if !script.exists() {
            return Err(format!("{} not found", script.display()));
        }
        let out = Command::new("bash")
            .arg(&script)
            .arg(&out_dir)
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(out_dir.join("estargz-oracle"))
    });
    match r {
        Ok(p) => Some(p.clone()),
        Err(e) => missing(&format!("the reference checker: {e}")),
    }
}

/// Writes the tar corpus into a fresh temporary directory.
pub fn corpus() -> Option<tempfile::TempDir> {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mktars.py");
    match Command::new("python3")
        .arg(&script)
        .arg(dir.path())
        .status()
    {
        Ok(s) if s.success() => Some(dir),
        Ok(s) => panic!("{} failed: {s}", script.display()),
        Err(e) => missing(&format!("python3 ({e})")),
    }
}

/// Runs a command, returning stdout; panics with stderr on failure.
pub fn run_ok(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out.stdout
}

pub fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}
