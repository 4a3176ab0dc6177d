//! `ctr-remote image convert|inspect|get-toc-digest` against a real registry and
//! OCI layouts, checked with the reference checker and skopeo; and the hand-off of
//! other subcommands to `ctr`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{json, missing, oracle, run_ok};
use registry::{Client, Digest, Reference};
use serde_json::{json as j, Value};
use sha2::{Digest as _, Sha256};

const TOC: &str = "containerd.io/snapshot/stargz/toc.digest";
const USIZE: &str = "io.containers.estargz.uncompressed-size";

fn ctr_remote() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ctr-remote"))
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn start_registry() -> Option<testenv::Registry> {
    match testenv::Registry::start(testenv::RegistryOpts::default()) {
        Some(r) => Some(r),
        None => missing("docker-registry"),
    }
}

fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice()).expect("tar");
    }
    b.into_inner().expect("tar")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// An image made in memory: blobs plus the manifest.
struct TestImage {
    blobs: Vec<Vec<u8>>,
    manifest: Vec<u8>,
    manifest_type: &'static str,
}

/// Two layers (a small file and a 5 MiB random file so chunking matters).
fn layers(seed: u64) -> Vec<Vec<u8>> {
    vec![
        tar_of(&[
            ("etc/hello.txt", b"hello\n".to_vec()),
            ("bin/tool", testenv::random_bytes(20_000, seed)),
        ]),
        tar_of(&[("data/big.bin", testenv::random_bytes(5 << 20, seed + 1))]),
    ]
}

fn image(
    tars: &[Vec<u8>],
    arch: &str,
    docker: bool,
    precompressed: &[Option<Vec<u8>>],
) -> TestImage {
    let mut blobs = Vec::new();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, t) in tars.iter().enumerate() {
        let blob = precompressed
            .get(i)
            .cloned()
            .flatten()
            .unwrap_or_else(|| gzip(t));
        diff_ids.push(sha(t));
        descs.push(j!({
            "mediaType": if docker { "application/vnd.docker.image.rootfs.diff.tar.gzip" } else { "application/vnd.oci.image.layer.v1.tar+gzip" },
            "digest": sha(&blob), "size": blob.len()}));
        blobs.push(blob);
    }
    let config = serde_json::to_vec(&j!({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/tool"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "test"}],
    }))
    .expect("json");
    let (mt, cmt) = if docker {
        (
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.container.image.v1+json",
        )
    } else {
        (
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.config.v1+json",
        )
    };
    let manifest = serde_json::to_vec(&j!({
        "schemaVersion": 2, "mediaType": mt,
        "config": {"mediaType": cmt, "digest": sha(&config), "size": config.len()},
        "layers": descs,
    }))
    .expect("json");
    blobs.push(config);
    TestImage {
        blobs,
        manifest,
        manifest_type: mt,
    }
}

async fn push(client: &Client, r: &Reference, img: &TestImage) -> Digest {
    for b in &img.blobs {
        client
            .push_blob(r, b.clone().into(), &Default::default())
            .await
            .expect("push blob");
    }
    client
        .push_manifest(r, img.manifest_type, img.manifest.clone().into())
        .await
        .expect("push manifest")
}

/// Pushes an index over two platforms under `tag`.
async fn push_index(client: &Client, repo: &Reference) -> Digest {
    let mut entries = Vec::new();
    for (i, arch) in ["amd64", "arm64"].iter().enumerate() {
        let img = image(&layers(10 + i as u64 * 7), arch, false, &[]);
        let d = push(client, &repo.at_digest(Digest::sha256(&img.manifest)), &img).await;
        entries.push(j!({"mediaType": img.manifest_type, "digest": d.to_string(),
            "size": img.manifest.len(), "platform": {"os": "linux", "architecture": arch}}));
    }
    let idx = serde_json::to_vec(&j!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}))
    .expect("json");
    client
        .push_manifest(repo, "application/vnd.oci.image.index.v1+json", idx.into())
        .await
        .expect("push index")
}

fn write_layout(dir: &Path, tag: &str, img: &TestImage) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    for b in img.blobs.iter().chain(std::iter::once(&img.manifest)) {
        std::fs::write(blobs.join(&sha(b)[7..]), b).expect("write blob");
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("write");
    let idx = j!({"schemaVersion": 2, "manifests": [{"mediaType": img.manifest_type,
        "digest": sha(&img.manifest), "size": img.manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&idx).expect("json"),
    )
    .expect("write");
}

/// Reads a blob from a registry or a layout directory.
trait Blobs {
    fn blob(&self, digest: &str) -> Vec<u8>;
    fn manifest(&self, reference: &str) -> Vec<u8>;
}

struct Remote<'a> {
    client: &'a Client,
    repo: Reference,
    rt: &'a tokio::runtime::Runtime,
}

impl Blobs for Remote<'_> {
    fn blob(&self, digest: &str) -> Vec<u8> {
        let d = Digest::parse(digest).expect("digest");
        self.rt
            .block_on(self.client.get_blob(&self.repo, &d))
            .expect("get blob")
            .to_vec()
    }
    fn manifest(&self, reference: &str) -> Vec<u8> {
        let r = if reference.starts_with("sha256:") {
            self.repo
                .at_digest(Digest::parse(reference).expect("digest"))
        } else {
            self.repo.at_tag(reference).expect("tag")
        };
        self.rt
            .block_on(self.client.get_manifest(&r))
            .expect("get manifest")
            .bytes
            .to_vec()
    }
}

struct Layout(PathBuf);

impl Blobs for Layout {
    fn blob(&self, digest: &str) -> Vec<u8> {
        std::fs::read(self.0.join("blobs/sha256").join(&digest[7..])).expect("layout blob")
    }
    fn manifest(&self, reference: &str) -> Vec<u8> {
        if reference.starts_with("sha256:") {
            return self.blob(reference);
        }
        let idx = json(&std::fs::read(self.0.join("index.json")).expect("index.json"));
        let entry = idx["manifests"]
            .as_array()
            .expect("manifests")
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == reference)
            .expect("tagged entry");
        self.blob(entry["digest"].as_str().expect("digest"))
    }
}

fn decompress(blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if blob.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd_decode(blob, &mut out);
    } else {
        std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(blob), &mut out)
            .expect("gunzip");
    }
    out
}

fn zstd_decode(blob: &[u8], out: &mut Vec<u8>) {
    let mut c = Command::new("zstd");
    c.args(["-d", "-c", "-q"]);
    let mut child = c
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("zstd");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = blob.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&data));
    let o = child.wait_with_output().expect("zstd");
    let _ = w.join();
    out.extend_from_slice(&o.stdout);
}

/// Checks a converted image manifest: OCI types, annotations, oracle-verified
/// layers whose diffIDs are the new config's. Returns the layer descriptors.
fn check_image(src: &dyn Blobs, manifest: &[u8], zstd: bool, scratch: &Path) -> Vec<Value> {
    let m = json(manifest);
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config = json(&src.blob(m["config"]["digest"].as_str().expect("config")));
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .expect("diff_ids")
        .clone();
    assert_eq!(
        config["config"]["Cmd"][0], "/bin/tool",
        "config fields survive"
    );
    let layers = m["layers"].as_array().expect("layers").clone();
    assert_eq!(layers.len(), diff_ids.len());
    let oracle = oracle();
    for (i, l) in layers.iter().enumerate() {
        let want = if zstd {
            "application/vnd.oci.image.layer.v1.tar+zstd"
        } else {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        };
        assert_eq!(l["mediaType"], want);
        let toc = l["annotations"][TOC].as_str().expect("toc annotation");
        let blob = src.blob(l["digest"].as_str().expect("digest"));
        assert_eq!(sha(&blob), l["digest"].as_str().expect("digest"));
        let raw = decompress(&blob);
        assert_eq!(
            sha(&raw),
            diff_ids[i].as_str().expect("diff id"),
            "diff_id of layer {i}"
        );
        assert_eq!(
            l["annotations"][USIZE].as_str().expect("uncompressed size"),
            raw.len().to_string()
        );
        if zstd {
            assert!(l["annotations"]["io.containers.zstd-chunked.manifest-checksum"].is_string());
            assert!(l["annotations"]["io.containers.zstd-chunked.manifest-position"].is_string());
        }
        if let Some(o) = &oracle {
            let p = scratch.join(format!("layer-{i}.blob"));
            std::fs::write(&p, &blob).expect("write");
            let mut c = Command::new(o);
            c.args(["verify", "--toc-digest", toc]);
            if zstd {
                c.arg("--zstdchunked");
            }
            let v = json(&run_ok(c.arg(&p)));
            assert_eq!(v["ok"], true, "{v}");
        }
    }
    layers
}

fn skopeo() -> Option<PathBuf> {
    testenv::require_tool("skopeo").or_else(|| missing("skopeo"))
}

#[test]
fn registry_to_registry_and_layout_to_layout() {
    let Some(reg) = start_registry() else { return };
    let rt = rt();
    let client = Client::anonymous();
    let host = reg.host();
    let src = Reference::parse(&format!("{host}/src/app:v1")).expect("ref");
    let tars = layers(1);
    let img = image(&tars, "amd64", true, &[]);
    rt.block_on(push(&client, &src, &img));
    let scratch = tempfile::tempdir().expect("tempdir");

    // Registry to registry, Docker types to OCI, prioritized files from a record.
    let record = scratch.path().join("record.json");
    std::fs::write(
        &record,
        "{\"path\":\"bin/tool\"}\n{\"path\":\"etc/hello.txt\"}\n",
    )
    .expect("write");
    let out = ctr_remote()
        .args([
            "image",
            "convert",
            "--estargz",
            "--oci",
            "--estargz-record-in",
        ])
        .arg(&record)
        .arg(format!("docker://{host}/src/app:v1"))
        .arg(format!("{host}/dst/app:esgz"))
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("layer ").count(),
        2,
        "one progress line per layer: {stderr}"
    );
    let remote = Remote {
        client: &client,
        repo: Reference::parse(&format!("{host}/dst/app:esgz")).expect("ref"),
        rt: &rt,
    };
    let manifest = remote.manifest("esgz");
    assert_eq!(
        sha(&manifest),
        String::from_utf8_lossy(&out.stdout).trim(),
        "stdout names the pushed digest"
    );
    let conv = check_image(&remote, &manifest, false, scratch.path());

    // get-toc-digest and inspect read the same TOC.
    let first = conv[0]["digest"].as_str().expect("digest");
    let got = run_ok(ctr_remote().args([
        "image",
        "get-toc-digest",
        &format!("docker://{host}/dst/app:esgz"),
        first,
    ]));
    assert_eq!(
        String::from_utf8_lossy(&got).trim(),
        conv[0]["annotations"][TOC]
    );
    let dumped = json(&run_ok(ctr_remote().args([
        "i",
        "get-toc-digest",
        "--dump-toc",
        &format!("docker://{host}/dst/app:esgz"),
        first,
    ])));
    assert!(dumped["entries"].as_array().is_some_and(|e| !e.is_empty()));
    let ins = json(&run_ok(ctr_remote().args([
        "images",
        "inspect",
        "--json",
        &format!("docker://{host}/dst/app:esgz"),
    ])));
    let ls = ins["manifests"][0]["layers"].as_array().expect("layers");
    assert_eq!(ls[0]["format"], "estargz");
    assert_eq!(ls[0]["toc_digest"], conv[0]["annotations"][TOC]);
    assert_eq!(
        ls[0]["prioritized_files"], 2,
        "record-in paths are prioritized"
    );
    let text = String::from_utf8_lossy(&run_ok(ctr_remote().args([
        "image",
        "inspect",
        &format!("docker://{host}/src/app:v1"),
    ])))
    .to_string();
    assert!(text.contains("format=plain"), "{text}");

    // A second run finds every blob already there.
    let again = ctr_remote()
        .args([
            "image",
            "convert",
            "--estargz",
            "--oci",
            "--estargz-record-in",
        ])
        .arg(&record)
        .arg(format!("docker://{host}/src/app:v1"))
        .arg(format!("{host}/dst/app:esgz"))
        .output()
        .expect("run");
    assert!(again.status.success());
    let e2 = String::from_utf8_lossy(&again.stderr);
    assert_eq!(e2.matches("already present").count(), 2, "{e2}");

    // skopeo reads and copies the result.
    if let Some(sk) = skopeo() {
        let info = json(&run_ok(Command::new(&sk).args([
            "inspect",
            "--tls-verify=false",
            &format!("docker://{host}/dst/app:esgz"),
        ])));
        assert_eq!(info["Layers"].as_array().map(Vec::len), Some(2));
        let copy_dir = scratch.path().join("skopeo-copy");
        run_ok(Command::new(&sk).args([
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{host}/dst/app:esgz"),
            &format!("oci:{}:copied", copy_dir.display()),
        ]));
        assert!(copy_dir.join("index.json").exists());
    }

    // Layout to layout.
    let src_dir = scratch.path().join("src-layout");
    let dst_dir = scratch.path().join("dst-layout");
    write_layout(&src_dir, "v1", &img);
    let out = run_ok(
        ctr_remote()
            .args(["image", "convert", "--estargz", "--oci"])
            .arg(format!("oci:{}:v1", src_dir.display()))
            .arg(format!("oci:{}:esgz", dst_dir.display())),
    );
    let layout = Layout(dst_dir.clone());
    let manifest = layout.manifest("esgz");
    assert_eq!(sha(&manifest), String::from_utf8_lossy(&out).trim());
    check_image(&layout, &manifest, false, scratch.path());
    let oci_layout = json(&std::fs::read(dst_dir.join("oci-layout")).expect("oci-layout"));
    assert_eq!(oci_layout["imageLayoutVersion"], "1.0.0");
    if let Some(sk) = skopeo() {
        let info =
            json(&run_ok(Command::new(&sk).args([
                "inspect",
                &format!("oci:{}:esgz", dst_dir.display()),
            ])));
        assert_eq!(info["Layers"].as_array().map(Vec::len), Some(2));
        // And back into a registry.
        run_ok(Command::new(&sk).args([
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:esgz", dst_dir.display()),
            &format!("docker://{host}/from-layout/app:1"),
        ]));
    }

    // zstd:chunked, layout to registry.
    run_ok(
        ctr_remote()
            .args(["image", "convert", "--zstdchunked", "--oci"])
            .arg(format!("oci:{}:v1", src_dir.display()))
            .arg(format!("{host}/zstd/app:1")),
    );
    let remote = Remote {
        client: &client,
        repo: Reference::parse(&format!("{host}/zstd/app:1")).expect("ref"),
        rt: &rt,
    };
    if testenv::require_tool("zstd").is_some() {
        check_image(&remote, &remote.manifest("1"), true, scratch.path());
    }
}

#[test]
fn multi_platform_index() {
    let Some(reg) = start_registry() else { return };
    let rt = rt();
    let client = Client::anonymous();
    let host = reg.host();
    let src = Reference::parse(&format!("{host}/multi/app:v1")).expect("ref");
    rt.block_on(push_index(&client, &src));
    let scratch = tempfile::tempdir().expect("tempdir");

    run_ok(ctr_remote().args([
        "image",
        "convert",
        "--estargz",
        "--oci",
        "--all-platforms",
        &format!("docker://{host}/multi/app:v1"),
        &format!("{host}/multi/app:all"),
    ]));
    let remote = Remote {
        client: &client,
        repo: Reference::parse(&format!("{host}/multi/app:all")).expect("ref"),
        rt: &rt,
    };
    let idx = json(&remote.manifest("all"));
    assert_eq!(idx["mediaType"], "application/vnd.oci.image.index.v1+json");
    let entries = idx["manifests"].as_array().expect("manifests");
    let archs: Vec<&str> = entries
        .iter()
        .map(|e| e["platform"]["architecture"].as_str().expect("arch"))
        .collect();
    assert_eq!(archs, ["amd64", "arm64"]);
    for e in entries {
        let m = remote.manifest(e["digest"].as_str().expect("digest"));
        check_image(&remote, &m, false, scratch.path());
    }

    run_ok(ctr_remote().args([
        "image",
        "convert",
        "--estargz",
        "--oci",
        "--platform",
        "linux/arm64",
        &format!("docker://{host}/multi/app:v1"),
        &format!("{host}/multi/app:arm"),
    ]));
    let idx = json(&remote.manifest("arm"));
    let entries = idx["manifests"].as_array().expect("manifests");
    assert_eq!(entries.len(), 1, "other platforms are dropped");
    assert_eq!(entries[0]["platform"]["architecture"], "arm64");

    let out = ctr_remote()
        .args([
            "image",
            "convert",
            "--estargz",
            "--platform",
            "linux/s390x",
            &format!("docker://{host}/multi/app:v1"),
            &format!("{host}/multi/app:none"),
        ])
        .output()
        .expect("run");
    assert!(!out.status.success(), "no matching platform is an error");
}

#[test]
fn reuse_keeps_estargz_layers() {
    let Some(reg) = start_registry() else { return };
    let rt = rt();
    let client = Client::anonymous();
    let host = reg.host();
    let tars = layers(3);
    // The first layer is eStargz already, the second a plain tar.gz.
    let mut built = Vec::new();
    estargz::build(&tars[0][..], &mut built, &estargz::BuildOptions::default()).expect("build");
    let img = image(&tars, "amd64", false, &[Some(built.clone()), None]);
    let src = Reference::parse(&format!("{host}/reuse/app:v1")).expect("ref");
    rt.block_on(push(&client, &src, &img));
    let scratch = tempfile::tempdir().expect("tempdir");

    let out = ctr_remote()
        .args([
            "image",
            "convert",
            "--estargz",
            "--oci",
            "--reuse",
            &format!("docker://{host}/reuse/app:v1"),
            &format!("{host}/reuse/app:esgz"),
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let remote = Remote {
        client: &client,
        repo: Reference::parse(&format!("{host}/reuse/app:esgz")).expect("ref"),
        rt: &rt,
    };
    let layers = check_image(&remote, &remote.manifest("esgz"), false, scratch.path());
    assert_eq!(
        layers[0]["digest"],
        sha(&built),
        "the eStargz layer is kept"
    );
    assert_ne!(
        layers[1]["digest"],
        sha(&img.blobs[1]),
        "the plain layer is converted"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("reused"), "{stderr}");

    // Converting the converted image again with --reuse changes nothing.
    let first = json(&remote.manifest("esgz"));
    run_ok(ctr_remote().args([
        "image",
        "convert",
        "--estargz",
        "--oci",
        "--reuse",
        &format!("docker://{host}/reuse/app:esgz"),
        &format!("{host}/reuse/app:again"),
    ]));
    let second = json(&remote.manifest("again"));
    assert_eq!(first["layers"], second["layers"]);
    assert_eq!(first["config"], second["config"]);
}

#[test]
fn uncompress_and_flag_errors() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let tars = layers(5);
    let img = image(&tars, "amd64", false, &[]);
    let src = scratch.path().join("src");
    write_layout(&src, "v1", &img);
    let dst = scratch.path().join("dst");
    run_ok(
        ctr_remote()
            .args(["image", "convert", "--uncompress"])
            .arg(format!("oci:{}:v1", src.display()))
            .arg(format!("oci:{}:plain", dst.display())),
    );
    let layout = Layout(dst);
    let m = json(&layout.manifest("plain"));
    for (i, l) in m["layers"].as_array().expect("layers").iter().enumerate() {
        assert_eq!(l["mediaType"], "application/vnd.oci.image.layer.v1.tar");
        assert_eq!(l["digest"], sha(&tars[i]));
    }
    for bad in [
        vec!["--estargz", "--zstdchunked"],
        vec!["--estargz", "--uncompress"],
        vec![],
    ] {
        let out = ctr_remote()
            .args(["image", "convert"])
            .args(&bad)
            .arg(format!("oci:{}:v1", src.display()))
            .arg(format!("oci:{}:x", scratch.path().join("x").display()))
            .output()
            .expect("run");
        assert!(!out.status.success(), "{bad:?} must fail");
    }
}

#[test]
fn other_subcommands_go_to_ctr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("args");
    let fake = dir.path().join("ctr");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done > {}\nprintf '%s\\n' \"$CONTAINERD_NAMESPACE\" >> {}\nexit 3\n",
            log.display(),
            log.display()
        ),
    )
    .expect("write");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["-n", "k8s.io", "images", "ls", "-q"],
            vec!["-n", "k8s.io", "images", "ls", "-q"],
        ),
        (
            vec![
                "--log-level",
                "debug",
                "--address",
                "/tmp/x.sock",
                "run",
                "--rm",
                "img",
                "id",
            ],
            vec!["--address", "/tmp/x.sock", "run", "--rm", "img", "id"],
        ),
        (vec!["i", "rm", "foo"], vec!["i", "rm", "foo"]),
        (vec!["content", "ls"], vec!["content", "ls"]),
    ];
    for (args, want) in cases {
        let out = ctr_remote()
            .env("CTR_REMOTE_CTR", &fake)
            .env("CONTAINERD_NAMESPACE", "ns-from-env")
            .args(&args)
            .output()
            .expect("run");
        assert_eq!(
            out.status.code(),
            Some(3),
            "ctr's exit status is ours: {args:?}"
        );
        let got = std::fs::read_to_string(&log).expect("log");
        let mut lines: Vec<&str> = got.lines().collect();
        let env = lines.pop();
        assert_eq!(lines, want, "{args:?}");
        assert_eq!(env, Some("ns-from-env"));
    }
    // Our own subcommands never reach ctr.
    let out = ctr_remote()
        .env("CTR_REMOTE_CTR", &fake)
        .args(["image", "convert", "--help"])
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--estargz-record-in"));
}
