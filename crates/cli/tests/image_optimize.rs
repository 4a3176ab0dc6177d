//! `ctr-remote image optimize` with real runc, overlayfs, fanotify and a real
//! registry: the files the workload reads become each layer's prioritized files,
//! in access order, in the layer that provides them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

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
    if !nix::unistd::geteuid().is_root() {
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
    let r = Reference::parse(image.trim_start_matches("docker://")).expect("ref");
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
    let (src, img) = registry_image(&rt, &host, &busybox);
    let scratch = tempfile::tempdir().expect("tempdir");
    let rec = scratch.path().join("record.json");
    let dst = format!("docker://{host}/dst/app:opt");
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
    let again = format!("docker://{host}/dst/app:from-record");
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
    let (src, _) = registry_image(&rt, &host, &busybox);
    let scratch = tempfile::tempdir().expect("tempdir");
    let shared = scratch.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::write(shared.join("note"), "from the host\n").expect("write");
    let rec = scratch.path().join("record.json");
    let dst = format!("docker://{host}/dst/app:custom");
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
    let Some((scratch, src)) = scratch_with_layout() else {
        return;
    };
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

/// A random number for names and addresses that parallel runs must not share.
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

/// The four-layer test image pushed to `host` as `HOST/src/app:v1`: its name on the
/// command line (`docker://HOST/src/app:v1`) and the image.
fn registry_image(rt: &tokio::runtime::Runtime, host: &str, busybox: &[u8]) -> (String, TestImage) {
    let name = format!("{host}/src/app:v1");
    let img = image(&layer_tars(busybox));
    push(
        rt,
        &Client::anonymous(),
        &Reference::parse(&name).expect("ref"),
        &img,
    );
    (format!("docker://{name}"), img)
}

/// A scratch directory holding the test image as an OCI layout: (scratch, `oci:DIR:v1`).
fn scratch_with_layout() -> Option<(tempfile::TempDir, String)> {
    let (_reg, busybox) = prerequisites()?;
    let scratch = tempfile::tempdir().expect("tempdir");
    let src = layout_image(&busybox, scratch.path());
    Some((scratch, src))
}

/// The four-layer test image in an OCI layout under `dir`, as `oci:DIR:v1`.
fn layout_image(busybox: &[u8], dir: &Path) -> String {
    let img = image(&layer_tars(busybox));
    let src_dir = dir.join("src");
    write_layout(&src_dir, "v1", &img);
    format!("oci:{}:v1", src_dir.display())
}

/// A bridge the test made (with the gateway address), deleted on drop.
struct Bridge(String);

impl Bridge {
    fn create(name: &str, gateway_cidr: &str) -> Bridge {
        run_ok(Command::new("ip").args(["link", "add", name, "type", "bridge"]));
        let b = Bridge(name.to_string());
        run_ok(Command::new("ip").args(["addr", "add", gateway_cidr, "dev", name]));
        run_ok(Command::new("ip").args(["link", "set", name, "up"]));
        b
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let st = Command::new("ip")
            .args(["link", "del", &self.0])
            .status()
            .expect("run ip");
        if !std::thread::panicking() {
            assert!(st.success(), "deleting bridge {}", self.0);
        }
    }
}

/// Answers every HTTP request on `addr` with `token`; returns the port.
fn http_token_server(addr: &str, token: String) -> u16 {
    use std::io::Read;
    let listener = std::net::TcpListener::bind((addr, 0)).expect("bind on the gateway address");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let body = format!("{token}\n");
            let _ = write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[test]
fn cni_bridge_gives_eth0_an_address_and_is_torn_down() {
    let Some((_reg, busybox)) = prerequisites() else {
        return;
    };
    let plugin_dir = Path::new("/usr/lib/cni");
    if !plugin_dir.join("bridge").is_file() || !plugin_dir.join("host-local").is_file() {
        missing::<()>(
            "CNI plugins bridge and host-local in /usr/lib/cni (containernetworking-plugins)",
        );
        return;
    }
    if testenv::require_tool("ip").is_none() {
        missing::<()>("ip (iproute2)");
        return;
    }
    let scratch = tempfile::tempdir().expect("tempdir");
    let src = layout_image(&busybox, scratch.path());

    let r = random();
    let net = format!("10.{}.{}", 128 + (r % 64), (r >> 8) % 256);
    let gateway = format!("{net}.1");
    let bridge_name = format!("sgz{:08x}", (r >> 16) as u32);
    let network = format!("optimize-test-{:08x}", (r >> 16) as u32);
    let _bridge = Bridge::create(&bridge_name, &format!("{gateway}/24"));
    let token = format!("TOKEN-{r:016x}");
    let port = http_token_server(&gateway, token.clone());

    let conf_dir = scratch.path().join("net.d");
    let ipam_dir = scratch.path().join("ipam");
    std::fs::create_dir(&conf_dir).expect("mkdir");
    // A file sorting later must not be the one used.
    std::fs::write(
        conf_dir.join("99-other.conf"),
        r#"{"cniVersion":"0.4.0","name":"unused","type":"no-such-plugin"}"#,
    )
    .expect("write");
    let conflist = j!({
        "cniVersion": "0.4.0",
        "name": network,
        "plugins": [{
            "type": "bridge",
            "bridge": bridge_name,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": format!("{net}.0/24"), "gateway": gateway}]],
                "dataDir": ipam_dir,
            },
        }],
    });
    std::fs::write(
        conf_dir.join("10-test.conflist"),
        serde_json::to_vec(&conflist).expect("json"),
    )
    .expect("write");

    let script = format!(
        "busybox ip -4 addr show dev eth0; busybox ip link show dev lo; cat /etc/hosts /etc/resolv.conf; \
         busybox wget -q -O - http://gateway.test:{port}/"
    );
    let entrypoint = serde_json::to_string(&["/bin/sh", "-c", &script]).expect("json");
    let dst = format!("oci:{}:cni", scratch.path().join("dst").display());
    let out = ctr_remote()
        .env("RUST_LOG", "convert::optimize=info")
        .env("NO_COLOR", "1")
        .args([
            "image",
            "optimize",
            "--oci",
            "--cni",
            "--cni-plugin-conf-dir",
        ])
        .arg(&conf_dir)
        .args(["--cni-plugin-dir"])
        .arg(plugin_dir)
        .args([
            "--add-hosts",
            &format!("gateway.test:{gateway}"),
            "--dns-nameservers",
            "192.0.2.53",
            "--entrypoint",
            &entrypoint,
            &src,
            &dst,
        ])
        .output()
        .expect("run ctr-remote");
    let stdout = ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains(&format!("inet {net}.")),
        "eth0 has an address of the subnet: {stdout}"
    );
    assert!(stdout.contains("lo: <LOOPBACK,UP"), "lo is up: {stdout}");
    assert!(
        stdout.contains(&format!("{gateway}\tgateway.test"))
            && stdout.contains("nameserver 192.0.2.53"),
        "the generated /etc/hosts and /etc/resolv.conf are used: {stdout}"
    );
    assert!(
        stdout.contains(&token),
        "the workload reached the host through the bridge: {stdout}\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("ips={net}.")),
        "the address is logged: {stderr}"
    );
    assert_eq!(prioritized(&dst, scratch.path())[0].1, "prefetch");

    // The namespace is gone and DEL released the address.
    let netns = stderr
        .split_whitespace()
        .find_map(|w| w.strip_prefix("netns="))
        .expect("the netns is logged");
    assert!(netns.starts_with("/var/run/netns/optimize-"), "{netns}");
    assert!(!Path::new(netns).exists(), "{netns} is left behind");
    let leases = || -> Vec<String> {
        std::fs::read_dir(ipam_dir.join(&network))
            .expect("host-local's data dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&net))
            .collect()
    };
    assert!(
        leases().is_empty(),
        "addresses still allocated: {:?}",
        leases()
    );

    // SIGTERM while the workload runs cleans up the same way. Where the
    // reference's default plugin directory is absent (Debian), this run relies on
    // the fallback to /usr/lib/cni.
    let mut cmd = ctr_remote();
    cmd.env("RUST_LOG", "convert::optimize=info")
        .env("NO_COLOR", "1")
        .args([
            "image",
            "optimize",
            "--oci",
            "--cni",
            "--cni-plugin-conf-dir",
        ])
        .arg(&conf_dir);
    if Path::new("/opt/cni/bin").exists() {
        cmd.arg("--cni-plugin-dir").arg(plugin_dir);
    }
    let mut child = cmd
        .args([
            "--wait-on-line",
            "NEVER-PRINTED",
            "--entrypoint",
            r#"["/bin/sh","-c","echo RUNNING; exec sleep 100000"]"#,
            &src,
            &format!("oci:{}:term", scratch.path().join("dst").display()),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run ctr-remote");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    while !line.contains("RUNNING") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stdout, &mut line).expect("read");
        assert!(n > 0, "the workload ended before printing RUNNING");
    }
    assert_eq!(leases().len(), 1, "the running workload holds an address");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("terminated"),
        "{stderr}"
    );
    let netns = stderr
        .split_whitespace()
        .find_map(|w| w.strip_prefix("netns="))
        .expect("the netns is logged");
    assert!(
        !Path::new(netns).exists(),
        "{netns} is left behind after SIGTERM"
    );
    assert!(
        leases().is_empty(),
        "addresses still allocated after SIGTERM: {:?}",
        leases()
    );
}

#[test]
fn cni_plugin_failures_are_clear_and_clean_up() {
    let Some((scratch, src)) = scratch_with_layout() else {
        return;
    };
    let conf_dir = scratch.path().join("net.d");
    let plugin_dir = scratch.path().join("bin");
    std::fs::create_dir(&conf_dir).expect("mkdir");
    std::fs::create_dir(&plugin_dir).expect("mkdir");
    std::fs::write(
        conf_dir.join("a.conf"),
        r#"{"cniVersion":"0.4.0","name":"failing","type":"fail"}"#,
    )
    .expect("write");
    // A plugin that fails ADD with a CNI error and records its DEL.
    let del_log = scratch.path().join("del.log");
    let plugin = format!(
        "#!/bin/sh\nif [ \"$CNI_COMMAND\" = DEL ]; then echo \"$CNI_CONTAINERID $CNI_NETNS\" >> {}; exit 0; fi\n\
         echo '{{\"cniVersion\":\"0.4.0\",\"code\":11,\"msg\":\"no addresses left\",\"details\":\"range exhausted\"}}'\nexit 1\n",
        del_log.display()
    );
    let bin = plugin_dir.join("fail");
    std::fs::write(&bin, plugin).expect("write");
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let dst = format!("oci:{}:x", scratch.path().join("dst").display());
    let stderr = optimize_cni_fails(&conf_dir, &plugin_dir, &src, &dst);
    assert!(
        stderr.contains("CNI plugin fail failed on ADD: no addresses left (range exhausted)"),
        "{stderr}"
    );
    let dels = std::fs::read_to_string(&del_log).expect("DEL ran after the failed ADD");
    let netns = dels.split_whitespace().nth(1).expect("netns");
    assert!(!Path::new(netns).exists(), "{netns} is left behind");

    // A missing plugin is named before anything runs.
    std::fs::remove_file(&bin).expect("rm");
    let stderr = optimize_cni_fails(&conf_dir, &plugin_dir, &src, &dst);
    assert!(stderr.contains("CNI plugin \"fail\" not found"), "{stderr}");
}

/// Runs optimize with `--cni` on these directories, expects it to fail, returns stderr.
fn optimize_cni_fails(conf_dir: &Path, plugin_dir: &Path, src: &str, dst: &str) -> String {
    let out = optimize(
        &[
            "--cni",
            "--cni-plugin-conf-dir",
            conf_dir.to_str().expect("utf8"),
            "--cni-plugin-dir",
            plugin_dir.to_str().expect("utf8"),
        ],
        src,
        dst,
    );
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const FAKE_GPU_SPEC: &str = r#"
cdiVersion: "0.6.0"
kind: nvidia.com/gpu
containerEdits:
  env: ["FAKE_GPU_DRIVER=test-driver"]
devices:
  - name: "0"
    containerEdits:
      env: ["FAKE_GPU_INDEX=zero"]
      deviceNodes:
        - path: /dev/fakegpu0
          hostPath: /dev/zero
"#;

#[test]
fn gpus_come_from_cdi_specs() {
    let Some((scratch, src)) = scratch_with_layout() else {
        return;
    };
    let cdi = scratch.path().join("cdi");
    std::fs::create_dir(&cdi).expect("mkdir");
    std::fs::write(cdi.join("fake-gpu.yaml"), FAKE_GPU_SPEC).expect("write");
    let run = |gpus: &str, tag: &str| {
        ctr_remote()
            .env("CDI_SPEC_DIRS", &cdi)
            .args(["image", "optimize", "--oci", "--gpus", gpus, "--entrypoint"])
            .arg(r#"["/bin/sh","-c","test -c /dev/fakegpu0 && echo DEVICE_PRESENT; echo \"gpu=$FAKE_GPU_INDEX driver=$FAKE_GPU_DRIVER\"; cat /data/b.txt"]"#)
            .arg(&src)
            .arg(format!("oci:{}:{tag}", scratch.path().join("dst").display()))
            .output()
            .expect("run ctr-remote")
    };
    let out = run("0", "gpu");
    let stdout = ok(&out);
    assert!(stdout.contains("DEVICE_PRESENT"), "{stdout}");
    assert!(stdout.contains("gpu=zero driver=test-driver"), "{stdout}");
    let dst = format!("oci:{}:gpu", scratch.path().join("dst").display());
    assert_eq!(prioritized(&dst, scratch.path())[1].0, s(&["data/b.txt"]));

    let out = run("1", "nogpu");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no CDI device nvidia.com/gpu=1")
            && stderr.contains(&cdi.display().to_string())
            && stderr.contains("devices of that kind: 0"),
        "{stderr}"
    );
}

#[test]
fn stdin_reaches_the_workload_only_with_i() {
    let Some((scratch, src)) = scratch_with_layout() else {
        return;
    };
    let run = |flags: &[&str], tag: &str| {
        let mut child = ctr_remote()
            .args(["image", "optimize", "--oci"])
            .args(flags)
            .args([
                "--entrypoint",
                r#"["/bin/sh","-c","test -t 0 || echo NOT_A_TTY; busybox tr a-z A-Z; echo END"]"#,
                &src,
                &format!("oci:{}:{tag}", scratch.path().join("dst").display()),
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run ctr-remote");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"hello from stdin\n").expect("write");
        drop(stdin);
        child.wait_with_output().expect("wait")
    };
    let stdout = ok(&run(&["-i"], "in"));
    assert!(
        stdout.contains("NOT_A_TTY") && stdout.contains("HELLO FROM STDIN\nEND"),
        "{stdout}"
    );
    let stdout = ok(&run(&[], "noin"));
    assert!(
        stdout.contains("END") && !stdout.contains("HELLO"),
        "without -i the workload's stdin is empty: {stdout}"
    );
}

#[test]
fn terminal_flag_gives_the_workload_a_tty() {
    let Some((_reg, busybox)) = prerequisites() else {
        return;
    };
    if testenv::require_tool("script").is_none() {
        missing::<()>("script (bsdutils)");
        return;
    }
    let scratch = tempfile::tempdir().expect("tempdir");
    let src = layout_image(&busybox, scratch.path());
    let dst = format!("oci:{}:tty", scratch.path().join("dst").display());
    // script(1) runs the command on a pseudo-terminal, as an interactive user would.
    let runner = scratch.path().join("run.sh");
    std::fs::write(
        &runner,
        format!(
            "exec '{}' image optimize --oci -t -i --entrypoint '[\"/bin/sh\",\"-c\",\"test -t 0 && test -t 1 && echo IS_TTY; echo TTY_NAME=$(busybox tty); cat /data/c.txt\"]' '{src}' '{dst}'\n",
            env!("CARGO_BIN_EXE_ctr-remote")
        ),
    )
    .expect("write");
    let out = Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!("sh {}", runner.display()))
        .arg("/dev/null")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("IS_TTY"), "{stdout}");
    // The container's own pseudo-terminal, not one passed through from ours.
    assert!(stdout.contains("TTY_NAME=/dev/pts/0"), "{stdout}");
    assert!(stdout.contains("sea"), "{stdout}");
    assert_eq!(prioritized(&dst, scratch.path())[1].0, s(&["data/c.txt"]));
}

/// A hostile image's whiteouts go through its own symlinks (`x -> /ABS/canary-dir`
/// then `x/.wh.file`; `y -> /ABS/canary2` then `y/.wh..wh..opq`), in the same layer
/// and across layers. Whatever optimize makes of the image, nothing outside its
/// scratch root changes: the canary files stay, no device node replaces them, and no
/// host directory becomes opaque.
#[test]
fn hostile_whiteouts_never_reach_the_host() {
    let Some((_reg, busybox)) = prerequisites() else {
        return;
    };
    let scratch = tempfile::tempdir().expect("tempdir");
    let host = scratch.path().join("host");
    let canaries = [
        host.join("canary-dir"),
        host.join("canary2"),
        host.join("canary3"),
        host.join("canary4"),
    ];
    for dir in &canaries {
        std::fs::create_dir_all(dir).expect("mkdir");
        std::fs::write(dir.join("file"), b"canary\n").expect("write");
    }
    let abs = |i: usize| canaries[i].to_str().expect("utf8").to_string();
    let (a0, a1, a2, a3) = (abs(0), abs(1), abs(2), abs(3));
    let mut tars = layer_tars(&busybox);
    // Links and whiteouts in one layer.
    tars.push(tar_of(&[
        Entry::Link("x", &a0),
        Entry::File("x/.wh.file", Vec::new(), 0o644),
        Entry::Link("y", &a1),
        Entry::File("y/.wh..wh..opq", Vec::new(), 0o644),
    ]));
    // Links in one layer, whiteouts through them in the next.
    tars.push(tar_of(&[Entry::Link("p", &a2), Entry::Link("q", &a3)]));
    tars.push(tar_of(&[
        Entry::File("p/.wh.file", Vec::new(), 0o644),
        Entry::File("q/.wh..wh..opq", Vec::new(), 0o644),
    ]));
    let src_dir = scratch.path().join("src");
    write_layout(&src_dir, "v1", &image(&tars));
    let src = format!("oci:{}:v1", src_dir.display());
    let dst = format!("oci:{}:opt", scratch.path().join("dst").display());
    let wd = scratch.path().join("work");
    std::fs::create_dir(&wd).expect("mkdir");

    let out = optimize_in(&wd, &[], &src, &dst);
    eprintln!(
        "optimize exited {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    for dir in &canaries {
        let file = dir.join("file");
        let meta = std::fs::symlink_metadata(&file)
            .unwrap_or_else(|e| panic!("{} is gone: {e}", file.display()));
        assert!(
            meta.file_type().is_file(),
            "{} was replaced",
            file.display()
        );
        assert_eq!(std::fs::read(&file).expect("read"), b"canary\n");
        let opaque = xattr_of(dir, "trusted.overlay.opaque");
        assert!(opaque.is_none(), "{} became opaque", dir.display());
    }
}

fn xattr_of(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let n = std::ffi::CString::new(name).expect("name");
    let mut buf = [0u8; 64];
    // SAFETY: both names are NUL-terminated and `buf` is writable for its length.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

/// `--prefetch-list`: the listed paths and glob matches are prioritized in the layer
/// that shows them, without running anything; paths the image lacks are skipped.
#[test]
fn prefetch_list_prioritizes_paths_and_globs() {
    let Some((scratch, src)) = scratch_with_layout() else {
        return;
    };
    let list = scratch.path().join("prefetch.txt");
    std::fs::write(
        &list,
        "# files to prefetch\n/data/a.txt\ndata/[bc].txt\n\netc/*\nmissing/file\n",
    )
    .expect("write");
    let rec = scratch.path().join("rec.json");
    let dst = format!("oci:{}:listed", scratch.path().join("dst").display());
    let out = optimize(
        &[
            "--prefetch-list",
            list.to_str().expect("utf8"),
            "--record-out",
            rec.to_str().expect("utf8"),
        ],
        &src,
        &dst,
    );
    ok(&out);
    let paths: Vec<String> = record(&rec)
        .iter()
        .map(|e| e["path"].as_str().expect("path").to_string())
        .collect();
    assert_eq!(
        paths,
        s(&[
            "data/a.txt",
            "data/b.txt",
            "data/c.txt",
            "etc/group",
            "etc/passwd"
        ])
    );
    assert_eq!(
        prioritized(&dst, scratch.path()),
        vec![
            (s(&["etc/group", "etc/passwd"]), "prefetch"),
            (s(&["data/b.txt", "data/c.txt"]), "prefetch"),
            (s(&["data/a.txt"]), "prefetch"),
            (vec![], "no-prefetch"),
        ]
    );
    let out = optimize(
        &[
            "--prefetch-list",
            list.to_str().expect("utf8"),
            "--no-optimize",
        ],
        &src,
        &dst,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used together"));
}

/// The workload has the capabilities containerd gives a container by default: a
/// start-up script that changes owners as root (as postgres's does) runs through.
#[test]
fn workload_may_chown_as_root() {
    let Some((reg, busybox)) = prerequisites() else {
        return;
    };
    let rt = rt();
    let host = reg.host();
    let (src, _) = registry_image(&rt, &host, &busybox);
    let dst = format!("docker://{host}/dst/app:chown");
    let out = optimize(
        &[
            "--entrypoint",
            r#"["/bin/sh","-c"]"#,
            "--args",
            r#"["mkdir -p /run/owned && chown 1:1 /run/owned && stat -c %u:%g /run/owned && cat /data/unused.txt"]"#,
        ],
        &src,
        &dst,
    );
    let stdout = ok(&out);
    assert!(
        stdout.contains("1:1") && stdout.contains("never read"),
        "{stdout}"
    );
}

/// Busybox (with `dd`) in one layer and a 4 MiB file `/big` in another.
fn big_file_tars(busybox: &[u8], big: &[u8]) -> Vec<Vec<u8>> {
    vec![
        tar_of(&[
            Entry::Dir("bin"),
            Entry::File("bin/busybox", busybox.to_vec(), 0o755),
            Entry::Link("bin/sh", "busybox"),
            Entry::Link("bin/dd", "busybox"),
        ]),
        tar_of(&[Entry::File("big", big.to_vec(), 0o644)]),
    ]
}

#[test]
fn ranges_of_a_partly_read_file_are_recorded_per_layer() {
    use convert::optimize::{OptimizeOptions, StopWhen, Workload};
    use convert::{ConvertOptions, Location, Store};

    let Some((_reg, busybox)) = prerequisites() else {
        return;
    };
    if !Path::new("/dev/fuse").exists() {
        let _: Option<()> = missing("/dev/fuse (reads are traced through FUSE)");
        return;
    }
    const MIB: u64 = 1024 * 1024;
    let big: Vec<u8> = (0..4 * MIB)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let img = image(&big_file_tars(&busybox, &big));
    let manifest: Value = serde_json::from_slice(&img.manifest).expect("manifest");
    let layer_digests: Vec<String> = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_string())
        .collect();
    let scratch = tempfile::tempdir().expect("tempdir");
    let src_dir = scratch.path().join("src");
    write_layout(&src_dir, "v1", &img);
    let wd = scratch.path().join("work");
    std::fs::create_dir_all(&wd).expect("workdir");
    let client = Client::anonymous();
    let open = |s: String| Store::open(&Location::parse(&s).expect("location"), &client);
    let src = open(format!("oci:{}:v1", src_dir.display()));
    let dst = open(format!("oci:{}:opt", scratch.path().join("dst").display()));
    let opts = OptimizeOptions {
        convert: ConvertOptions {
            oci: true,
            workdir: Some(wd.clone()),
            ..Default::default()
        },
        workload: Workload {
            // The 513th 4 KiB block of /big, and nothing else of it.
            entrypoint: Some(s(&[
                "/bin/sh",
                "-c",
                "dd if=/big of=/dev/null bs=4096 skip=512 count=1",
            ])),
            ..Default::default()
        },
        stop: StopWhen::Period(std::time::Duration::from_secs(20)),
        optimize: true,
        cni: None,
        gpus: Vec::new(),
        prefetch_list: None,
        record_ranges: true,
    };
    let report = rt()
        .block_on(convert::optimize::optimize(&src, &dst, &opts))
        .expect("optimize");

    let layers: Vec<String> = report.ranges.iter().map(|l| l.layer.to_string()).collect();
    assert_eq!(
        layers, layer_digests,
        "one entry per source layer, bottom first"
    );
    let files = &report.ranges[1].files;
    let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, ["big"], "{files:?}");
    let r = &files[0].1;
    let at = 512 * 4096;
    assert!(
        r.iter().any(|r| r.start <= at && at + 4096 <= r.end),
        "the block dd read is in {r:?}"
    );
    let bytes: u64 = r.iter().map(|r| r.end - r.start).sum();
    assert!(bytes < 4 * MIB / 2, "far less than the whole file: {r:?}");
    assert!(r.iter().all(|r| r.end <= 4 * MIB), "{r:?}");
    eprintln!("/big read as {r:?} ({bytes} bytes)");
    // Busybox ran from the other layer: executing it reads (maps) it.
    let bottom = &report.ranges[0].files;
    let busybox_read = bottom
        .iter()
        .find(|(p, _)| p == "bin/busybox")
        .unwrap_or_else(|| panic!("bin/busybox not read: {bottom:?}"));
    let bb: u64 = busybox_read.1.iter().map(|r| r.end - r.start).sum();
    eprintln!(
        "bin/busybox ({} bytes) read as {} range(s), {bb} bytes",
        busybox.len(),
        busybox_read.1.len()
    );
    assert!(bb > 0 && bb <= busybox.len() as u64);
    // fanotify's record is unchanged: the file is listed as accessed.
    assert!(
        report.record.iter().any(|e| e.path == "big"),
        "{:?}",
        report.record
    );

    // Nothing is left mounted or behind.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains(&wd.display().to_string()), "{mounts}");
    let left: Vec<_> = std::fs::read_dir(&wd).expect("workdir").collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}
