//! The node install kit in deploy/: the Kubernetes manifests pass a strict schema check,
//! and `stargz-node-install` turns a stock containerd config into one that a real
//! containerd loads with our daemon as its `stargz` proxy snapshotter, changes nothing
//! on a second run, and never writes a config it could not edit safely.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use common::{require, stop, wait_for};

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn installer() -> PathBuf {
    repo().join("deploy/kubernetes/stargz-node-install")
}

/// A payload directory as the installer image carries it: the real binaries and unit.
fn payload(dir: &Path) -> PathBuf {
    let p = dir.join("payload");
    std::fs::create_dir_all(p.join("bin")).unwrap();
    std::fs::create_dir_all(p.join("systemd")).unwrap();
    let daemon = Path::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc"));
    let manager = Path::new(env!("CARGO_BIN_EXE_stargz-fuse-manager"));
    std::fs::copy(daemon, p.join("bin/containerd-stargz-grpc")).unwrap();
    std::fs::copy(manager, p.join("bin/stargz-fuse-manager")).unwrap();
    // ctr-remote belongs to another package of the workspace; any file stands in.
    std::fs::write(p.join("bin/ctr-remote"), b"#!/bin/sh\n").unwrap();
    std::fs::copy(
        repo().join("deploy/containerd-stargz-grpc.service"),
        p.join("systemd/containerd-stargz-grpc.service"),
    )
    .unwrap();
    p
}

fn install(host: &Path, payload: &Path, sock: &Path, extra: &[&str]) -> Output {
    Command::new("python3")
        .arg(installer())
        .arg("--host-root")
        .arg(host)
        .arg("--payload")
        .arg(payload)
        .arg("--snapshotter-socket")
        .arg(sock)
        .arg("--no-restart")
        .args(extra)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn manifests_pass_a_strict_schema_check() {
    let ok = Command::new("sh")
        .args(["-c", "command -v kubernetes-validate"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            !common::ci(),
            "kubernetes-validate missing (pip install kubernetes-validate)"
        );
        eprintln!("\n!!!!!!!! SKIPPING TEST: kubernetes-validate missing !!!!!!!!\n");
        return;
    }
    let manifest = repo().join("deploy/kubernetes/stargz-rs.yaml");
    for version in ["1.27.0", "1.37.0"] {
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "-k", version])
            .arg(&manifest)
            .output()
            .unwrap();
        let t = text(&out);
        assert!(out.status.success(), "manifest invalid for {version}: {t}");
        for kind in ["daemonset/stargz-rs", "clusterrole/", "configmap/"] {
            assert!(t.contains(kind), "{kind} not checked: {t}");
        }
    }
    // The checker does reject a manifest with a misspelt field.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.yaml");
    let good = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&bad, good.replace("hostPID: true", "hostPid: true")).unwrap();
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a misspelt field passed: {}",
        text(&out)
    );
}

#[test]
fn installer_refuses_configs_it_cannot_edit_and_leaves_them_alone() {
    if !require(&["/usr/bin/python3"], "python3") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let host = tmp.path().join("host");
    let cfg = host.join("etc/containerd/config.toml");
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    let payload = payload(tmp.path());
    let sock = Path::new("/run/containerd-stargz-grpc/containerd-stargz-grpc.sock");

    for (what, body) in [
        ("does not parse", "version = 2\n[plugins\n"),
        ("version 1", "[plugins.cri]\n  sandbox_image = \"pause\"\n"),
        (
            "a different [proxy_plugins.stargz]",
            "version = 2\n[proxy_plugins.stargz]\n  type = \"snapshot\"\n  address = \"/run/other.sock\"\n",
        ),
        (
            "CRI settings as an inline table",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  containerd = { snapshotter = \"overlayfs\" }\n",
        ),
    ] {
        std::fs::write(&cfg, body).unwrap();
        let out = install(&host, &payload, sock, &[]);
        assert!(!out.status.success(), "{what}: accepted: {}", text(&out));
        assert!(text(&out).contains("left unchanged"), "{what}: {}", text(&out));
        assert_eq!(std::fs::read_to_string(&cfg).unwrap(), body, "{what}: file changed");
        assert!(
            !host.join("usr/local/bin/containerd-stargz-grpc").exists(),
            "{what}: binaries installed although the run stopped"
        );
    }

    // --force replaces another proxy plugin of that name.
    std::fs::write(
        &cfg,
        "version = 2\n[proxy_plugins.stargz]\n  type = \"snapshot\"\n  address = \"/run/other.sock\"\n",
    )
    .unwrap();
    let out = install(&host, &payload, sock, &["--force"]);
    assert!(out.status.success(), "{}", text(&out));
    let now = std::fs::read_to_string(&cfg).unwrap();
    assert!(!now.contains("/run/other.sock"), "{now}");
    assert!(now.contains(&sock.display().to_string()), "{now}");
}

#[test]
fn installed_node_config_loads_our_daemon_in_containerd() {
    if !require(
        &["/usr/bin/containerd", "/usr/bin/ctr", "/usr/bin/python3"],
        "containerd python3",
    ) {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("stargz-deploy-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let host = dir.join("host");
    let cfg = host.join("etc/containerd/config.toml");
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    // A node's stock config, as `containerd config default` writes it for kubeadm.
    let stock = Command::new("/usr/bin/containerd")
        .args(["config", "default"])
        .output()
        .unwrap();
    assert!(stock.status.success());
    std::fs::write(&cfg, &stock.stdout).unwrap();
    let payload = payload(dir);
    let snap_sock = dir.join("run/stargz.sock");

    let out = install(&host, &payload, &snap_sock, &["--cri-keychain"]);
    assert!(out.status.success(), "{}", text(&out));
    for f in [
        "usr/local/bin/containerd-stargz-grpc",
        "usr/local/bin/stargz-fuse-manager",
        "usr/local/bin/ctr-remote",
        "etc/systemd/system/containerd-stargz-grpc.service",
        "etc/containerd/config.toml.before-stargz-rs",
    ] {
        assert!(host.join(f).exists(), "{f} not installed");
    }
    let daemon_cfg = host.join("etc/containerd-stargz-grpc/config.toml");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&daemon_cfg).unwrap().permissions(),
    );
    assert_eq!(mode & 0o077, 0, "daemon config readable by others");
    let dcfg = std::fs::read_to_string(&daemon_cfg).unwrap();
    assert!(dcfg.contains("[cri_keychain]") && dcfg.contains("enable_keychain = true"));
    // Comments and the rest of the admin's file survive the edit.
    let edited = std::fs::read_to_string(&cfg).unwrap();
    let stock = String::from_utf8(stock.stdout).unwrap();
    assert_eq!(
        edited.lines().count(),
        stock.lines().count() + 5,
        "more than the settings changed:\n{edited}"
    );

    // A second run changes nothing.
    let before = std::fs::metadata(&cfg).unwrap().modified().unwrap();
    let out = install(&host, &payload, &snap_sock, &["--cri-keychain"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !text(&out).contains("installed") && !text(&out).contains("updated"),
        "second run changed files: {}",
        text(&out)
    );
    assert_eq!(std::fs::metadata(&cfg).unwrap().modified().unwrap(), before);

    // A real containerd loads that config: our daemon as its stargz snapshotter, and
    // the CRI plugin set to pull through it with snapshot labels.
    let dump = Command::new("/usr/bin/containerd")
        .arg("--config")
        .arg(&cfg)
        .args(["config", "dump"])
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    assert!(dump.contains("snapshotter = \"stargz\""), "{dump}");
    assert!(
        dump.contains("disable_snapshot_annotations = false"),
        "{dump}"
    );

    let root = dir.join("daemon-root");
    let mut daemon = Command::new(host.join("usr/local/bin/containerd-stargz-grpc"))
        .arg("--address")
        .arg(&snap_sock)
        .arg("--root")
        .arg(&root)
        .arg("--config")
        .arg(&daemon_cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    wait_for(&snap_sock, "containerd-stargz-grpc");
    let ctrd_sock = dir.join("containerd.sock");
    let mut containerd = Command::new("/usr/bin/containerd")
        .arg("--config")
        .arg(&cfg)
        .arg("--root")
        .arg(dir.join("ctrd-root"))
        .arg("--state")
        .arg(dir.join("ctrd-state"))
        .arg("--address")
        .arg(&ctrd_sock)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("containerd.log")).unwrap())
        .spawn()
        .unwrap();
    wait_for(&ctrd_sock, "containerd");
    let ctr = |args: &[&str]| {
        Command::new("/usr/bin/ctr")
            .arg("--address")
            .arg(&ctrd_sock)
            .args(args)
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let plugins = loop {
        let out = ctr(&["plugins", "ls"]);
        let t = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && t.contains("stargz") {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "containerd not answering: {}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let line = plugins
        .lines()
        .find(|l| l.contains("io.containerd.snapshotter.v1") && l.contains("stargz"))
        .unwrap_or_else(|| panic!("no stargz snapshotter: {plugins}"));
    assert!(line.trim_end().ends_with("ok"), "{line}");
    let snaps = ctr(&["snapshots", "--snapshotter", "stargz", "ls"]);
    assert!(snaps.status.success(), "{}", text(&snaps));

    stop(&mut containerd, libc::SIGTERM, Duration::from_secs(10));
    stop(&mut daemon, libc::SIGINT, Duration::from_secs(10));
}

/// The k3s template with k3s's values filled in the way its renderer would: the result
/// is a config a real containerd loads, with our snapshotter under its own name.
#[test]
fn k3s_template_renders_to_a_config_containerd_loads() {
    if !require(&["/usr/bin/containerd"], "containerd") {
        return;
    }
    let tmpl =
        std::fs::read_to_string(repo().join("deploy/kubernetes/k3s-config.toml.tmpl")).unwrap();
    let values = [
        (
            "{{ .NodeConfig.Containerd.Opt }}",
            "/var/lib/rancher/k3s/agent/containerd",
        ),
        ("{{ .NodeConfig.SELinux }}", "false"),
        (
            "{{ .NodeConfig.AgentConfig.PauseImage }}",
            "rancher/mirrored-pause:3.6",
        ),
        ("{{ .SystemdCgroup }}", "true"),
        (
            "{{ .NodeConfig.AgentConfig.CNIBinDir }}",
            "/var/lib/rancher/k3s/data/current/bin",
        ),
        (
            "{{ .NodeConfig.AgentConfig.CNIConfDir }}",
            "/var/lib/rancher/k3s/agent/etc/cni/net.d",
        ),
        (
            "{{ .NodeConfig.Containerd.Registry }}",
            "/var/lib/rancher/k3s/agent/etc/containerd/certs.d",
        ),
    ];
    let mut rendered = String::new();
    for line in tmpl.lines() {
        // `{{- if X }}` / `{{- end }}`: every condition holds on a typical node.
        if line.trim_start().starts_with("{{-") {
            continue;
        }
        let mut l = line.to_string();
        for (k, v) in values {
            l = l.replace(k, v);
        }
        assert!(!l.contains("{{"), "template field without a value: {l}");
        rendered.push_str(&l);
        rendered.push('\n');
    }
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("config.toml");
    std::fs::write(&cfg, &rendered).unwrap();
    let out = Command::new("/usr/bin/containerd")
        .arg("--config")
        .arg(&cfg)
        .args(["config", "dump"])
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    assert!(dump.contains("snapshotter = \"stargz-rs\""), "{dump}");
    assert!(
        dump.contains("disable_snapshot_annotations = false"),
        "{dump}"
    );
    assert!(
        dump.contains("[proxy_plugins.stargz-rs]")
            || dump.contains("[proxy_plugins.\"stargz-rs\"]"),
        "{dump}"
    );
}
