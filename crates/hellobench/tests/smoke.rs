//! Smoke run of the whole harness: busybox image, one sample, `lan` profile, through a
//! real shaped link, registry, containerd, runc and our daemon; checks the records and
//! that the report and chart are written.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn prerequisite_missing(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("hellobench smoke: {why}");
    }
    eprintln!("!!!!!!!! SKIPPING hellobench smoke: {why} !!!!!!!!");
}

/// target/<profile>/ from target/<profile>/deps/smoke-HASH.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target profile directory")
        .to_path_buf()
}

#[test]
fn smoke_run_writes_records_report_and_chart() {
    if !nix::unistd::geteuid().is_root() {
        return prerequisite_missing("needs root (netns, containerd, FUSE)");
    }
    for t in [
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/bin/ctr-remote",
        "/usr/bin/docker-registry",
        "/usr/bin/skopeo",
        "/bin/busybox",
        "/dev/fuse",
        "/dev/net/tun",
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    ] {
        if !Path::new(t).exists() {
            return prerequisite_missing(&format!("{t} missing (scripts/deps.sh)"));
        }
    }
    let bins = profile_dir();
    if !bins.join("ctr-remote").exists() || !bins.join("containerd-stargz-grpc").exists() {
        let mut c = Command::new(env!("CARGO"));
        c.args(["build", "-q", "-p", "cli", "-p", "stargzd"]);
        if bins.ends_with("release") {
            c.arg("--release");
        }
        assert!(
            c.status().expect("cargo build").success(),
            "building the daemon and ctr-remote"
        );
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = tmp.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hellobench"))
        .args(["run", "--smoke"])
        .arg("--bin-dir")
        .arg(&bins)
        .arg("--out")
        .arg(&out)
        .arg("--cache-dir")
        .arg(tmp.path().join("cache"))
        .arg("--work-dir")
        .arg(tmp.path().join("work"))
        .spawn()
        .expect("running hellobench");
    let pid = child.id();
    let status = child.wait().expect("waiting for hellobench");
    assert!(status.success(), "hellobench run --smoke failed");

    let text = std::fs::read_to_string(out.join("lan.jsonl")).expect("records");
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("record JSON"))
        .collect();
    for mode in ["legacy", "estargz-noopt", "zstdchunked"] {
        let r = records
            .iter()
            .find(|r| r["mode"] == mode)
            .unwrap_or_else(|| panic!("no record for {mode}: {text}"));
        assert!(
            r["error"].is_null() && r["skipped"].is_null(),
            "{mode}: {r}"
        );
        assert_eq!(r["line_seen"], "hello", "{mode}: workload line");
        for phase in ["pull_s", "create_s", "run_s"] {
            assert!(
                r[phase].as_f64().unwrap_or(0.0) > 0.0,
                "{mode}: {phase} is zero: {r}"
            );
        }
        assert!(
            r["bytes"].as_u64().unwrap_or(0) > 0,
            "{mode}: nothing crossed the link: {r}"
        );
    }
    let md = std::fs::read_to_string(out.join("lan.md")).expect("report");
    assert!(md.contains("| busybox | estargz-noopt |"), "{md}");
    let png = std::fs::read(out.join("lan.png")).expect("chart");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 2000,
        "chart is not a PNG"
    );
    // Nothing left behind: the run's namespaces are gone.
    let ns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns");
    assert!(
        !String::from_utf8_lossy(&ns.stdout).contains(&format!("hb{pid}-")),
        "namespaces left behind"
    );
}
