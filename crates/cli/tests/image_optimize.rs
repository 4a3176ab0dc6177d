//! `ctr-remote image optimize` with real runc, overlayfs, fanotify and a real
//! registry: the files the workload reads become each layer's prioritized files,
//! in access order, in the layer that provides them.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

use common::{json, missing, oracle, run_ok};
use registry::{Client, Digest, Reference};
use serde_json::{json as j, Value};
use sha2::{Digest as _, Sha256};

fn ctr_remote() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ctr-remote"))
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Root, runc, busybox and a registry, or a skip (a failure under CI).
fn prerequisites() -> Option<(testenv::Registry, Vec<u8>)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return missing("root (overlayfs, fanotify, runc)");
    }
    testenv::require_tool("runc").or_else(|| missing("runc"))?;
    let busybox = match std::fs::read("/bin/busybox") {
        Ok(b) => b,
        Err(_) => return missing("/bin/busybox (busybox-static)"),
    };
    let reg = testenv::Registry::start(testenv::RegistryOpts::default())
        .or_else(|| missing("docker-registry"))?;
    Some((reg, busybox))
}

enum Entry<'a> {
    File(&'a str, Vec<u8>, u32),
    Link(&'a str, &'a str),
    Dir(&'a str),
}

fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::File(name, data, mode) => {
                h.set_size(data.len() as u64);
                h.set_mode(*mode);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_cksum();
                b.append_data(&mut h, name, data.as_slice()).expect("tar");
            }
            Entry::Link(name, target) => {
                h.set_size(0);
                h.set_mode(0o777);
                h.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut h, name, target).expect("tar");
            }
            Entry::Dir(name) => {
                h.set_size(0);
                h.set_mode(0o755);
                h.set_entry_type(tar::EntryType::Directory);
                h.set_cksum();
                b.append_data(&mut h, name, std::io::empty()).expect("tar");
            }
        }
    }
    b.into_inner().expect("tar")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

const ENTRY_SH: &str =
    "#!/bin/sh\ncat /data/b.txt\ncat /data/a.txt\nexec /opt/busybox2 cat /data/c.txt\n";

/// Four layers: busybox as /bin/sh etc.; data, an entrypoint script and a second
/// binary; a replacement of data/a.txt; a layer the workload never reads.
fn layer_tars(busybox: &[u8]) -> Vec<Vec<u8>> {
    vec![
        tar_of(&[
            Entry::Dir("bin"),
            Entry::File("bin/busybox", busybox.to_vec(), 0o755),
            Entry::Link("bin/sh", "busybox"),
            Entry::Link("bin/cat", "busybox"),
            Entry::Link("bin/sleep", "busybox"),
            Entry::Dir("etc"),
            Entry::File(
                "etc/passwd",
                b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/:/bin/sh\n".to_vec(),
                0o644,
            ),
            Entry::File("etc/group", b"root:x:0:\napp:x:1000:\n".to_vec(), 0o644),
            Entry::Dir("data"),
            Entry::File("data/a.txt", b"old a\n".to_vec(), 0o644),
        ]),
        tar_of(&[
            Entry::File("entry.sh", ENTRY_SH.as_bytes().to_vec(), 0o755),
            Entry::Dir("data"),
            Entry::File("data/b.txt", b"bee\n".to_vec(), 0o644),
            Entry::File("data/c.txt", b"sea\n".to_vec(), 0o644),
            Entry::File("data/unused.txt", b"never read\n".to_vec(), 0o644),
            Entry::Dir("opt"),
            Entry::File("opt/busybox2", busybox.to_vec(), 0o755),
        ]),
        tar_of(&[
            Entry::Dir("data"),
            Entry::File("data/a.txt", b"new a\n".to_vec(), 0o644),
        ]),
        tar_of(&[
            Entry::Dir("srv"),
            Entry::File("srv/idle.txt", b"idle\n".to_vec(), 0o644),
        ]),
    ]
}

struct TestImage {
    blobs: Vec<Vec<u8>>,
    manifest: Vec<u8>,
}

const MT: &str = "application/vnd.docker.distribution.manifest.v2+json";

fn image(tars: &[Vec<u8>]) -> TestImage {
    let mut blobs = Vec::new();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for t in tars {
        let blob = gzip(t);
        diff_ids.push(sha(t));
        descs.push(
            j!({"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "digest": sha(&blob), "size": blob.len()}),
        );
        blobs.push(blob);
    }
    let config = serde_json::to_vec(&j!({
        "architecture": registry::Platform::host().architecture, "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Entrypoint": ["/entry.sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .expect("json");
    let manifest = serde_json::to_vec(&j!({
        "schemaVersion": 2, "mediaType": MT,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": sha(&config), "size": config.len()},
        "layers": descs,
    }))
    .expect("json");
    blobs.push(config);
    TestImage { blobs, manifest }
}

fn push(rt: &tokio::runtime::Runtime, client: &Client, r: &Reference, img: &TestImage) {
    rt.block_on(async {
        for b in &img.blobs {
            client
                .push_blob(r, b.clone().into(), &Default::default())
                .await
                .expect("push blob");
        }
        client
            .push_manifest(r, MT, img.manifest.clone().into())
            .await
            .expect("push manifest");
    });
}

fn write_layout(dir: &Path, tag: &str, img: &TestImage) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    for b in img.blobs.iter().chain(std::iter::once(&img.manifest)) {
        std::fs::write(blobs.join(&sha(b)[7..]), b).expect("write blob");
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("write");
    let idx = j!({"schemaVersion": 2, "manifests": [{"mediaType": MT,
        "digest": sha(&img.manifest), "size": img.manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&idx).expect("json"),
    )
    .expect("write");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn optimize(args: &[&str], src: &str, dst: &str) -> Output {
    ctr_remote()
        .args(["image", "optimize", "--oci"])
        .args(args)
        .args([src, dst])
        .output()
        .expect("run ctr-remote")
}

fn optimize_in(workdir: &Path, args: &[&str], src: &str, dst: &str) -> Output {
    let mut all = vec!["--workdir", workdir.to_str().expect("utf8")];
    all.extend_from_slice(args);
    optimize(&all, src, dst)
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "optimize failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Per layer of the image `image`: the regular files before the landmark and
/// which landmark the layer has; each layer is also checked by the oracle.
fn prioritized(image: &str, scratch: &Path) -> Vec<(Vec<String>, &'static str)> {
    let inspect = json(&run_ok(
        ctr_remote().args(["image", "inspect", "--json", image]),
    ));
    let layers = inspect["manifests"][0]["layers"]
        .as_array()
        .expect("layers")
        .clone();
    let oracle = oracle();
    let mut out = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let digest = l["digest"].as_str().expect("digest");
        let toc = json(&run_ok(ctr_remote().args([
            "image",
            "get-toc-digest",
            "--dump-toc",
            image,
            digest,
        ])));
        let mut files = Vec::new();
        let mut landmark = "none";
        for e in toc["entries"].as_array().expect("entries") {
            let name = e["name"].as_str().expect("name");
            if name == ".prefetch.landmark" {
                landmark = "prefetch";
                break;
            }
            if name == ".no.prefetch.landmark" {
                landmark = "no-prefetch";
                break;
            }
            if e["type"] == "reg" {
                files.push(name.to_string());
            }
        }
        if let Some(o) = &oracle {
            let blob = scratch.join(format!("layer-{i}"));
            fetch_blob(image, digest, &blob);
            let v = json(&run_ok(
                Command::new(o)
                    .args([
                        "verify",
                        "--toc-digest",
                        l["toc_digest"].as_str().expect("toc digest"),
                    ])
                    .arg(&blob),
            ));
            assert_eq!(v["ok"], true, "layer {i}: {v}");
        }
        out.push((files, landmark));
    }
    out
}

fn fetch_blob(image: &str, digest: &str, to: &Path) {
    if let Some(rest) = image.strip_prefix("oci:") {
        let dir = rest.rsplit_once(':').map_or(rest, |(d, _)| d);
        std::fs::copy(Path::new(dir).join("blobs/sha256").join(&digest[7..]), to).expect("copy");
        return;
    }
    let r = Reference::parse(image).expect("ref");
    let data = rt()
        .block_on(Client::anonymous().get_blob(&r, &Digest::parse(digest).expect("digest")))
        .expect("get blob");
    std::fs::write(to, &data).expect("write");
}

fn record(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("record")
        .lines()
        .map(|l| json(l.as_bytes()))
        .collect()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn default_workload_prioritizes_accessed_files_per_layer() {
    let Some((reg, busybox)) = prerequisites() else {
        return;
    };
    let rt = rt();
    let host = reg.host();
    let img = image(&layer_tars(&busybox));
    let src = format!("{host}/src/app:v1");
    push(
        &rt,
        &Client::anonymous(),
        &Reference::parse(&src).expect("ref"),
        &img,
    );
    let scratch = tempfile::tempdir().expect("tempdir");
    let rec = scratch.path().join("record.json");
    let dst = format!("{host}/dst/app:opt");
    let out = optimize(&["--record-out", rec.to_str().expect("utf8")], &src, &dst);
    let stdout = ok(&out);
    assert!(
        stdout.contains("bee") && stdout.contains("new a") && stdout.contains("sea"),
        "the workload's output is shown: {stdout}"
    );

    let entries = record(&rec);
    let paths: Vec<&str> = entries
        .iter()
        .map(|e| e["path"].as_str().expect("path"))
        .collect();
    // runc reads the image's passwd and group files to set up the user, as the
    // reference's runs do; then the workload's own reads follow.
    assert_eq!(
        paths,
        [
            "etc/passwd",
            "etc/group",
            "entry.sh",
            "bin/busybox",
            "data/b.txt",
            "data/a.txt",
            "opt/busybox2",
            "data/c.txt"
        ],
        "{entries:?}"
    );
    let manifest_digest = sha(&img.manifest);
    let layer_of: Vec<u64> = entries
        .iter()
        .map(|e| e["layerIndex"].as_u64().expect("index"))
        .collect();
    assert_eq!(layer_of, [0, 0, 1, 0, 1, 2, 1, 1]);
    assert!(entries
        .iter()
        .all(|e| e["manifestDigest"] == manifest_digest.as_str()));

    let layers = prioritized(&dst, scratch.path());
    assert_eq!(
        layers,
        vec![
            (s(&["etc/passwd", "etc/group", "bin/busybox"]), "prefetch"),
            (
                s(&["entry.sh", "data/b.txt", "opt/busybox2", "data/c.txt"]),
                "prefetch"
            ),
            (s(&["data/a.txt"]), "prefetch"),
            (vec![], "no-prefetch"),
        ]
    );

    // The record is accepted back by `image convert`.
    let again = format!("{host}/dst/app:from-record");
    run_ok(
        ctr_remote()
            .args([
                "image",
                "convert",
                "--estargz",
                "--oci",
                "--estargz-record-in",
            ])
            .arg(&rec)
            .args([&src, &again]),
    );
    let from_record = prioritized(&again, scratch.path());
    assert_eq!(
        from_record[1].0,
        s(&["entry.sh", "data/b.txt", "opt/busybox2", "data/c.txt"])
    );
}

#[test]
fn args_env_and_bind_mount_change_what_is_read() {
    let Some((reg, busybox)) = prerequisites() else {
        return;
    };
    let rt = rt();
    let host = reg.host();
    let img = image(&layer_tars(&busybox));
    let src = format!("{host}/src/app:v1");
    push(
        &rt,
        &Client::anonymous(),
        &Reference::parse(&src).expect("ref"),
        &img,
    );
    let scratch = tempfile::tempdir().expect("tempdir");
    let shared = scratch.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::write(shared.join("note"), "from the host\n").expect("write");
    let rec = scratch.path().join("record.json");
    let dst = format!("{host}/dst/app:custom");
    let mount = format!(
        "type=bind,source={},destination=/mnt/host,options=rbind:ro",
        shared.display()
    );
    let out = optimize(
        &[
            "--entrypoint",
            r#"["/bin/sh","-c"]"#,
            "--args",
            r#"["cat /data/$WHICH /mnt/host/note"]"#,
            "--env",
            "WHICH=unused.txt",
            "--mount",
            &mount,
            "--user",
            "app",
            "--record-out",
            rec.to_str().expect("utf8"),
        ],
        &src,
        &dst,
    );
    let stdout = ok(&out);
    assert!(
        stdout.contains("never read") && stdout.contains("from the host"),
        "{stdout}"
    );
    let paths: Vec<String> = record(&rec)
        .iter()
        .map(|e| e["path"].as_str().expect("path").to_string())
        .collect();
    assert_eq!(
        paths,
        s(&["etc/passwd", "etc/group", "bin/busybox", "data/unused.txt"]),
        "files on the bind mount are not the image's"
    );
    let layers = prioritized(&dst, scratch.path());
    assert_eq!(
        layers[0],
        (s(&["etc/passwd", "etc/group", "bin/busybox"]), "prefetch")
    );
    assert_eq!(layers[1], (s(&["data/unused.txt"]), "prefetch"));
    assert_eq!(layers[2], (vec![], "no-prefetch"));
}

#[test]
fn layout_to_layout_no_optimize_failures_and_period() {
    let Some((_reg, busybox)) = prerequisites() else {
        return;
    };
    let img = image(&layer_tars(&busybox));
    let scratch = tempfile::tempdir().expect("tempdir");
    let src_dir = scratch.path().join("src");
    write_layout(&src_dir, "v1", &img);
    let src = format!("oci:{}:v1", src_dir.display());
    let wd = scratch.path().join("work");
    std::fs::create_dir(&wd).expect("mkdir");

    // Layout to layout with the default workload.
    let dst = format!("oci:{}:opt", scratch.path().join("dst").display());
    ok(&optimize_in(&wd, &[], &src, &dst));
    let layers = prioritized(&dst, scratch.path());
    assert_eq!(layers[2], (s(&["data/a.txt"]), "prefetch"));
    assert_eq!(layers[3].1, "no-prefetch");

    // --no-optimize runs nothing: every layer says no prefetch.
    let plain = format!("oci:{}:plain", scratch.path().join("plain").display());
    let out = optimize_in(
        &wd,
        &["--no-optimize", "--entrypoint", r#"["/nonexistent"]"#],
        &src,
        &plain,
    );
    ok(&out);
    assert!(prioritized(&plain, scratch.path())
        .iter()
        .all(|(f, l)| f.is_empty() && *l == "no-prefetch"));

    // A failing entrypoint is an error that shows its output.
    let bad = format!("oci:{}:bad", scratch.path().join("bad").display());
    let out = optimize_in(
        &wd,
        &[
            "--entrypoint",
            r#"["/bin/sh","-c","echo boom-marker >&2; exit 3"]"#,
        ],
        &src,
        &bad,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("workload failed") && stderr.contains("boom-marker"),
        "{stderr}"
    );

    // A missing entrypoint binary also fails clearly.
    let out = optimize_in(&wd, &["--entrypoint", r#"["/no/such/binary"]"#], &src, &bad);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("workload failed") && stderr.contains("/no/such/binary"),
        "{stderr}"
    );

    // --period ends a workload that would run forever; what it read before counts.
    let slow = format!("oci:{}:slow", scratch.path().join("slow").display());
    let out = optimize_in(
        &wd,
        &[
            "--period",
            "2",
            "--entrypoint",
            r#"["/bin/sh","-c","cat /data/c.txt; exec sleep 100000"]"#,
        ],
        &src,
        &slow,
    );
    ok(&out);
    assert_eq!(prioritized(&slow, scratch.path())[1].0, s(&["data/c.txt"]));

    // --wait-on-line stops at the first line containing the text, as servers print it
    // after a pid and a timestamp.
    let line = format!("oci:{}:line", scratch.path().join("line").display());
    let out = optimize_in(
        &wd,
        &[
            "--wait-on-line",
            "READY",
            "--entrypoint",
            r#"["/bin/sh","-c","cat /data/b.txt; echo '1:M 12:00:00.000 * READY for connections'; sleep 100000"]"#,
        ],
        &src,
        &line,
    );
    ok(&out);
    assert_eq!(prioritized(&line, scratch.path())[1].0, s(&["data/b.txt"]));

    // Nothing is left mounted.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains(&wd.display().to_string()), "{mounts}");
    let left: Vec<_> = std::fs::read_dir(&wd).expect("workdir").collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}
