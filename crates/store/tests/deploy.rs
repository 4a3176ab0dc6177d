//! The files in deploy/ for stargz-store: the system unit's command line brings a store
//! up with the shipped config and tells systemd it is ready and stopping; the rootless
//! unit's flags are the binary's; the storage.conf snippets are what Podman 4.3 loads.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The words of a unit's `ExecStart` from `stargz-store` on.
fn exec_start(unit: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join(unit)).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    let at = words
        .iter()
        .position(|w| w.ends_with("/stargz-store"))
        .unwrap();
    words[at + 1..].to_vec()
}

#[test]
fn system_unit_starts_a_store_that_notifies_systemd() {
    if !common::require(&["/dev/fuse"], "fuse3") {
        return;
    }
    let args = exec_start("deploy/stargz-store.service");
    assert_eq!(
        args.last().map(String::as_str),
        Some("/var/lib/stargz-store/store"),
        "the reference's mount point"
    );
    assert!(args.contains(&"--config=/etc/stargz-store/config.toml".to_string()));
    let tmp = tempfile::tempdir().unwrap();
    let (root, mp) = (tmp.path().join("root"), tmp.path().join("store"));
    let config = repo().join("deploy/stargz-store-config.toml");
    // Same flags, paths moved into the scratch directory.
    let args: Vec<String> = args
        .iter()
        .map(|a| match a.split_once('=') {
            Some(("--config", _)) => format!("--config={}", config.display()),
            Some(("--root", _)) => format!("--root={}", root.display()),
            _ if a == "/var/lib/stargz-store/store" => mp.display().to_string(),
            _ => a.clone(),
        })
        .collect();
    let notify = UnixDatagram::bind(tmp.path().join("notify")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut store = Command::new(env!("CARGO_BIN_EXE_stargz-store"))
        .args(&args)
        .env("NOTIFY_SOCKET", tmp.path().join("notify"))
        .env("REGISTRY_AUTH_FILE", tmp.path().join("none.json"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).unwrap_or_else(|e| {
        let _ = store.kill();
        panic!(
            "no READY=1: {e}\n{}",
            std::fs::read_to_string(tmp.path().join("log")).unwrap_or_default()
        )
    });
    assert_eq!(&buf[..n], b"READY=1");
    assert!(common::mounts_under(&mp).iter().any(|(m, _)| *m == mp));
    assert!(root.join("store.sock").exists(), "the hand-off socket");
    common::stop(&mut store, libc::SIGTERM, Duration::from_secs(20));
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(common::mounts_under(&mp).is_empty(), "unmounted on SIGTERM");
    assert!(!root.join("store.sock").exists());
    common::detach_mounts(tmp.path());
}

#[test]
fn rootless_unit_flags_are_the_binarys() {
    let args = exec_start("deploy/podman/stargz-store-rootless.service");
    // --help after every flag: clap refuses an unknown flag before it gets there.
    let out = Command::new(env!("CARGO_BIN_EXE_stargz-store"))
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(repo().join("deploy/podman/stargz-store-rootless.service"))
        .unwrap();
    assert!(text.contains("ExecStart=/usr/bin/podman unshare /usr/local/bin/stargz-store"));
}

#[test]
fn storage_conf_snippets_load_in_podman() {
    if !common::require(&["/usr/bin/podman"], "podman") {
        return;
    }
    for (file, home) in [
        ("deploy/podman/storage.conf", None),
        ("deploy/podman/storage-rootless.conf", Some("/home/USER")),
    ] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        assert!(
            text.contains(":ref\"]"),
            "{file}: the store needs the reference"
        );
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().display().to_string();
        let store = format!("{d}/store");
        std::fs::create_dir_all(&store).unwrap();
        let mut conf = match home {
            None => text.replace("/var/lib/stargz-store/store", &store),
            Some(h) => text.replace(&format!("{h}/.local/share/stargz-store/store"), &store),
        };
        conf = conf
            .replace("/var/lib/containers/storage", &format!("{d}/graph"))
            .replace("/run/containers/storage", &format!("{d}/run"));
        if home.is_some() {
            conf = conf.replace(
                "driver = \"overlay\"",
                &format!("driver = \"overlay\"\ngraphroot = \"{d}/graph\"\nrunroot = \"{d}/run\""),
            );
        }
        std::fs::write(tmp.path().join("storage.conf"), conf).unwrap();
        let out = Command::new("/usr/bin/podman")
            .env("CONTAINERS_STORAGE_CONF", tmp.path().join("storage.conf"))
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            .arg("--tmpdir")
            .arg(tmp.path().join("tmp"))
            .args([
                "info",
                "--format",
                "{{.Store.GraphDriverName}} {{.Store.GraphOptions}}",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.starts_with("overlay ") && text.contains(&format!("{store}:ref")),
            "{file}: {text}"
        );
        common::detach_mounts(tmp.path());
    }
}
