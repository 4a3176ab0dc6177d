//! `ctr-remote blob ...` as a user runs it: exit codes, messages and outputs.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use std::process::Command;

use common::{corpus, json, run_ok};

fn ctr_remote() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ctr-remote"))
}

#[test]
fn build_verify_toc_extract_round_trip() {
    let Some(dir) = corpus() else { return };
    let d = dir.path();
    let out = json(&run_ok(
        ctr_remote()
            .args(["blob", "build", "--json", "--prioritized-files"])
            .arg(d.join("pax-prio.prio"))
            .arg(d.join("pax-prio.tar"))
            .arg(d.join("b.blob")),
    ));
    let toc_digest = out["tocDigest"].as_str().unwrap().to_string();
    assert_eq!(
        out["annotations"]["containerd.io/snapshot/stargz/toc.digest"],
        toc_digest.as_str()
    );
    assert!(out["annotations"]["io.containers.estargz.uncompressed-size"].is_string());

    let v = json(&run_ok(
        ctr_remote()
            .args([
                "blob",
                "verify",
                "--json",
                "--toc-digest",
                &toc_digest,
                "--tar",
            ])
            .arg(d.join("pax-prio.tar"))
            .arg(d.join("b.blob")),
    ));
    assert_eq!(v["ok"], true);
    assert_eq!(v["diffID"], out["diffID"]);

    let toc = run_ok(ctr_remote().args(["blob", "toc"]).arg(d.join("b.blob")));
    let toc = estargz::Toc::from_json(&toc).unwrap();
    let names: Vec<&str> = toc.entries.iter().map(|e| e.name.as_str()).collect();
    let landmark = names
        .iter()
        .position(|n| *n == ".prefetch.landmark")
        .unwrap();
    let text = names.iter().position(|n| *n == "data/text.txt").unwrap();
    assert!(text < landmark, "prioritized files precede the landmark");

    run_ok(
        ctr_remote()
            .args(["blob", "extract"])
            .arg(d.join("b.blob"))
            .arg(d.join("root")),
    );
    let config = std::fs::read(d.join("root/etc/config")).unwrap();
    assert_eq!(config, b"second version\n", "the later duplicate wins");
    let link = std::fs::read_link(d.join("root/bin/sh")).unwrap();
    assert_eq!(link.to_str(), Some("tool"));
}

#[test]
fn failures_exit_non_zero_with_a_clear_message() {
    let Some(dir) = corpus() else { return };
    let d = dir.path();
    run_ok(
        ctr_remote()
            .args(["blob", "build"])
            .arg(d.join("ustar.tar"))
            .arg(d.join("u.blob")),
    );

    let wrong = format!("sha256:{}", "ab".repeat(32));
    let out = ctr_remote()
        .args(["blob", "verify", "--toc-digest", &wrong])
        .arg(d.join("u.blob"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TOC digest mismatch"), "{err}");

    let mut blob = std::fs::read(d.join("u.blob")).unwrap();
    blob[100] ^= 0xff;
    std::fs::write(d.join("bad.blob"), &blob).unwrap();
    let out = ctr_remote()
        .args(["blob", "verify"])
        .arg(d.join("bad.blob"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a corrupted blob must not verify");

    let out = ctr_remote()
        .args(["blob", "verify", "--tar"])
        .arg(d.join("gnu.tar"))
        .arg(d.join("u.blob"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the wrong original tar must not match"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("original tar"));

    let out = ctr_remote()
        .args(["blob", "toc"])
        .arg(d.join("ustar.tar"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("footer"));

    std::fs::write(d.join("prio"), "no/such/file\n").unwrap();
    let out = ctr_remote()
        .args(["blob", "build", "--prioritized-files"])
        .arg(d.join("prio"))
        .arg(d.join("ustar.tar"))
        .arg(d.join("p.blob"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such/file"));
    assert!(
        !d.join("p.blob").exists() && !d.join("p.partial").exists(),
        "no partial output is left"
    );

    let out = ctr_remote()
        .args(["blob", "build", "--level", "12"])
        .arg(d.join("ustar.tar"))
        .arg(d.join("l.blob"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("level"));
}
