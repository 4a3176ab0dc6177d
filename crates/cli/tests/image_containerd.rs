//! `ctr-remote image convert|get-toc-digest|inspect` on containerd's image store, as
//! the reference's ctr-remote.md runs them (`image pull SRC`, convert into containerd,
//! `image push DST`), against a real containerd and registry; the new conversion
//! flags (external TOC, keep-diff-id, zstd:chunked level, chunk size and record), checked
//! with the reference checker and against Debian's reference `ctr-remote`; the mode
//! rule's errors; TLS flags; and no colour codes when stderr is not a terminal.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{json, missing, oracle, run_ok};
use registry::{Client, Digest, Reference};
use serde_json::{json as j, Value};
use sha2::{Digest as _, Sha256};

const NS: &str = "ctrtest";
const TOC: &str = "containerd.io/snapshot/stargz/toc.digest";
const REFERENCE_CTR_REMOTE: &str = "/usr/bin/ctr-remote";

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    fn sock(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    fn start() -> Option<Containerd> {
        let bin = testenv::require_tool("containerd")?;
        testenv::require_tool("ctr")?;
        if !nix::unistd::geteuid().is_root() {
            return missing("root (containerd)");
        }
        let dir = tempfile::Builder::new()
            .prefix("ctd-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let d = dir.path().display().to_string();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/c.sock\"\n\
             [ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n\
             [debug]\n  address = \"{d}/debug.sock\"\n"
        );
        std::fs::write(dir.path().join("config.toml"), config).expect("config");
        let log = std::fs::File::create(dir.path().join("log")).expect("log");
        let child = Command::new(bin)
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd");
        let c = Containerd { child, dir };
        let start = Instant::now();
        while !c.sock().exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "containerd did not start: {}",
                std::fs::read_to_string(c.dir.path().join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(c)
    }

    /// `bin -a SOCK -n NS` (ours, the reference's, or ctr).
    fn tool(&self, bin: &Path) -> Command {
        let mut c = Command::new(bin);
        c.arg("-a").arg(self.sock()).args(["-n", NS]);
        c
    }

    fn ours(&self) -> Command {
        self.tool(Path::new(env!("CARGO_BIN_EXE_ctr-remote")))
    }

    fn ctr(&self) -> Command {
        self.tool(Path::new("ctr"))
    }

    fn reference(&self) -> Option<Command> {
        if Path::new(REFERENCE_CTR_REMOTE).exists() {
            Some(self.tool(Path::new(REFERENCE_CTR_REMOTE)))
        } else {
            missing("Debian's stargz-snapshotter (/usr/bin/ctr-remote)")
        }
    }

    /// The blob `digest` of the content store.
    fn content(&self, digest: &str) -> Vec<u8> {
        run_ok(self.ctr().args(["content", "get", digest]))
    }

    fn images(&self) -> String {
        String::from_utf8_lossy(&run_ok(self.ctr().args(["images", "ls", "-q"]))).to_string()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.path().join("root"))
            .stderr(Stdio::null())
            .status();
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

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("gunzip");
    out
}

/// Two layers: small files, and a 3 MiB random file so chunk sizes matter.
fn layer_tars() -> Vec<Vec<u8>> {
    vec![
        tar_of(&[
            ("etc/hello.txt", b"hello\n".to_vec()),
            ("bin/tool", testenv::random_bytes(20_000, 1)),
        ]),
        tar_of(&[("data/big.bin", testenv::random_bytes(3 << 20, 2))]),
    ]
}

/// Pushes a plain gzip OCI image of `tars` as `HOST/REPO:v1`; returns its config's diff IDs.
fn push_image(host: &str, repo: &str, tars: &[Vec<u8>]) -> Vec<String> {
    let blobs: Vec<Vec<u8>> = tars.iter().map(|t| gzip(t)).collect();
    let diff_ids: Vec<String> = tars.iter().map(|t| sha(t)).collect();
    let config = serde_json::to_vec(&j!({
        "architecture": registry::Platform::host().architecture, "os": "linux",
        "config": {"Cmd": ["/bin/tool"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}}))
    .expect("json");
    let manifest = serde_json::to_vec(&j!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha(&config), "size": config.len()},
        "layers": blobs.iter().map(|b| j!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": sha(b), "size": b.len()})).collect::<Vec<_>>()}))
    .expect("json");
    let r = Reference::parse(&format!("{host}/{repo}:v1")).expect("ref");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let c = Client::anonymous();
        for b in blobs.iter().chain(std::iter::once(&config)) {
            c.push_blob(&r, b.clone().into(), &Default::default())
                .await
                .expect("push");
        }
        c.push_manifest(
            &r,
            "application/vnd.oci.image.manifest.v1+json",
            manifest.into(),
        )
        .await
        .expect("manifest");
    });
    diff_ids
}

fn registry_manifest(reference: &str) -> (Digest, Vec<u8>) {
    let r = Reference::parse(reference).expect("ref");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let m = rt
        .block_on(Client::anonymous().get_manifest(&r))
        .expect("manifest");
    (m.digest, m.bytes.to_vec())
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The manifest of containerd image `name`, from its content store.
fn stored_manifest(ctd: &Containerd, name: &str) -> (String, Value) {
    let ls = String::from_utf8_lossy(&run_ok(ctd.ctr().args(["images", "ls"]))).to_string();
    let line = ls
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no image {name} in {ls}"));
    let digest = line
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .expect("digest")
        .to_string();
    let m = json(&ctd.content(&digest));
    (digest, m)
}

/// A blob whose TOC was kept out, with that TOC put back in front of a normal
/// footer: what the reference checker can verify.
fn with_toc_inside(blob: &[u8], toc: &[u8]) -> Vec<u8> {
    let payload = &blob[..blob.len() - estargz::EXTERNAL_TOC_FOOTER_SIZE];
    let mut out = payload.to_vec();
    out.extend_from_slice(toc);
    out.extend(
        estargz::Footer::Estargz {
            toc_offset: payload.len() as u64,
        }
        .encode(),
    );
    out
}

fn verify_with_oracle(
    scratch: &Path,
    name: &str,
    blob: &[u8],
    toc_digest: &str,
    tar: Option<&[u8]>,
) {
    let Some(o) = oracle() else { return };
    let p = scratch.join(format!("{name}.blob"));
    std::fs::write(&p, blob).expect("write");
    let mut c = Command::new(o);
    c.args(["verify", "--toc-digest", toc_digest]).arg(&p);
    if let Some(t) = tar {
        let tp = scratch.join(format!("{name}.tar"));
        std::fs::write(&tp, t).expect("write");
        c.arg(&tp);
    }
    let v = json(&run_ok(&mut c));
    assert_eq!(v["ok"], true, "{name}: {v}");
}

/// The reference flow of ctr-remote.md with `image convert`: pull, convert in
/// containerd, push. The result survives garbage collection once the source is gone,
/// and the reference's ctr-remote reads our layers' TOC digests from the content
/// store, as ours reads its.
#[test]
fn convert_in_containerd_then_push() {
    let Some(ctd) = Containerd::start() else {
        return;
    };
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default())
        .or_else(|| missing("docker-registry"))
    else {
        return;
    };
    let host = reg.host();
    let tars = layer_tars();
    push_image(&host, "src/app", &tars);
    let src = format!("{host}/src/app:v1");
    let dst = format!("{host}/dst/app:esgz");
    ok(&ctd
        .ours()
        .args(["image", "pull", "--plain-http", &src])
        .output()
        .unwrap());

    let out = ctd
        .ours()
        .args(["image", "convert", "--estargz", "--oci", &src, &dst])
        .output()
        .unwrap();
    let digest = ok(&out).trim().to_string();
    assert!(ctd.images().contains(&dst), "DST is an image in containerd");
    let (stored, m) = stored_manifest(&ctd, &dst);
    assert_eq!(stored, digest, "stdout names the image's digest");
    let layers = m["layers"].as_array().unwrap().clone();
    assert_eq!(layers.len(), 2);
    let scratch = tempfile::tempdir().unwrap();
    for (i, l) in layers.iter().enumerate() {
        let d = l["digest"].as_str().unwrap();
        let toc = l["annotations"][TOC].as_str().expect("TOC annotation");
        verify_with_oracle(
            scratch.path(),
            &format!("l{i}"),
            &ctd.content(d),
            toc,
            Some(&tars[i]),
        );
        // get-toc-digest on a content-store digest: ours and the reference agree.
        let got = ok(&ctd
            .ours()
            .args(["image", "get-toc-digest", d])
            .output()
            .unwrap());
        assert_eq!(got.trim(), toc);
        if let Some(mut r) = ctd.reference() {
            let theirs = ok(&r.args(["image", "get-toc-digest", d]).output().unwrap());
            assert_eq!(theirs.trim(), toc, "the reference reads our layer");
            let dumped_theirs = json(
                ok(&ctd
                    .reference()
                    .unwrap()
                    .args(["image", "get-toc-digest", "--dump-toc", d])
                    .output()
                    .unwrap())
                .as_bytes(),
            );
            let dumped_ours = ok(&ctd
                .ours()
                .args(["image", "get-toc-digest", "--dump-toc", d])
                .output()
                .unwrap());
            assert!(
                dumped_ours.starts_with("{\n\t\""),
                "tab-indented: {dumped_ours:.40}"
            );
            assert_eq!(json(dumped_ours.as_bytes()), dumped_theirs);
        }
    }

    // The source gone and garbage collected, the converted image keeps its content.
    run_ok(ctd.ctr().args(["images", "rm", "--sync", &src]));
    let content =
        String::from_utf8_lossy(&run_ok(ctd.ctr().args(["content", "ls", "-q"]))).to_string();
    for l in &layers {
        assert!(
            content.contains(l["digest"].as_str().unwrap()),
            "layer kept: {content}"
        );
    }
    assert!(content.contains(m["config"]["digest"].as_str().unwrap()));

    // ctr-remote image push (ctr's) sends it as it is.
    ok(&ctd
        .ours()
        .args(["image", "push", "--plain-http", &dst])
        .output()
        .unwrap());
    let (pushed, bytes) = registry_manifest(&dst);
    assert_eq!(pushed.to_string(), digest);
    assert_eq!(json(&bytes), m);

    // The reference's conversion in the same containerd, read back by ours.
    if let Some(mut r) = ctd.reference() {
        ok(&ctd
            .ours()
            .args(["image", "pull", "--plain-http", &src])
            .output()
            .unwrap());
        let rdst = format!("{host}/ref/app:esgz");
        ok(&r
            .args(["image", "convert", "--estargz", "--oci", &src, &rdst])
            .output()
            .unwrap());
        let (_, rm) = stored_manifest(&ctd, &rdst);
        for l in rm["layers"].as_array().unwrap() {
            let d = l["digest"].as_str().unwrap();
            let got = ok(&ctd
                .ours()
                .args(["image", "get-toc-digest", d])
                .output()
                .unwrap());
            assert_eq!(got.trim(), l["annotations"][TOC].as_str().unwrap());
        }
        // inspect reads containerd images by their plain names.
        let ins = json(
            ok(&ctd
                .ours()
                .args(["image", "inspect", "--json", &rdst])
                .output()
                .unwrap())
            .as_bytes(),
        );
        assert_eq!(ins["manifests"][0]["layers"][0]["format"], "estargz");
    }
}

/// Plain names mean containerd: a source it lacks is an error naming the ways out,
/// never a silent registry read; docker:// and --from-registry read the registry and
/// a plain target then goes to the registry too.
#[test]
fn the_mode_rule_never_guesses() {
    let Some(ctd) = Containerd::start() else {
        return;
    };
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default())
        .or_else(|| missing("docker-registry"))
    else {
        return;
    };
    let host = reg.host();
    push_image(&host, "src/app", &layer_tars());
    let src = format!("{host}/src/app:v1");
    let out = ctd
        .ours()
        .args([
            "image",
            "convert",
            "--estargz",
            "--oci",
            &src,
            &format!("{host}/x:1"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not an image in containerd's image store")
            && err.contains("ctr-remote image pull")
            && err.contains("docker://"),
        "{err}"
    );
    assert!(!ctd.images().contains(&format!("{host}/x:1")));

    // From the registry, to the registry.
    let d1 = ok(&ctd
        .ours()
        .args([
            "image",
            "convert",
            "--estargz",
            "--oci",
            &format!("docker://{src}"),
            &format!("{host}/r2r:1"),
        ])
        .output()
        .unwrap());
    assert_eq!(
        registry_manifest(&format!("{host}/r2r:1")).0.to_string(),
        d1.trim()
    );
    // ctr's global flags are accepted before our subcommands too.
    let d2 = ok(&ctd
        .ours()
        .args(["--timeout", "60s", "--connect-timeout", "5s", "--debug"])
        .args([
            "image",
            "convert",
            "--estargz",
            "--oci",
            "--from-registry",
            &src,
            &format!("{host}/r2r:2"),
        ])
        .output()
        .unwrap());
    assert_eq!(d1, d2, "same conversion, same digest");
    // From the registry into containerd, explicitly.
    ok(&ctd
        .ours()
        .args([
            "image",
            "convert",
            "--estargz",
            "--oci",
            "--from-registry",
            &src,
            "containerd://local/app:1",
        ])
        .output()
        .unwrap());
    assert!(ctd.images().contains("local/app:1"));
    assert!(
        !ctd.images().contains(&src),
        "the source was read, not pulled"
    );

    // containerd unreachable: the error says what a plain name means.
    let out = Command::new(env!("CARGO_BIN_EXE_ctr-remote"))
        .args([
            "-a",
            "/nonexistent/c.sock",
            "image",
            "convert",
            "--estargz",
            &src,
            "x:1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("containerd's image store") && err.contains("docker://"),
        "{err}"
    );
}

/// The flags the reference added after v0.12: external TOC (the TOC image beside the
/// image), keep-diff-id, and zstd:chunked's own level, chunk size and record.
#[test]
fn new_conversion_flags() {
    let Some(ctd) = Containerd::start() else {
        return;
    };
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default())
        .or_else(|| missing("docker-registry"))
    else {
        return;
    };
    let host = reg.host();
    let tars = layer_tars();
    let diff_ids = push_image(&host, "src/app", &tars);
    let src = format!("{host}/src/app:v1");
    ok(&ctd
        .ours()
        .args(["image", "pull", "--plain-http", &src])
        .output()
        .unwrap());
    let scratch = tempfile::tempdir().unwrap();

    for keep in [false, true] {
        let dst = format!("{host}/ext/app:{}", if keep { "keep" } else { "new" });
        let mut c = ctd.ours();
        c.args([
            "image",
            "convert",
            "--estargz",
            "--oci",
            "--estargz-external-toc",
        ]);
        if keep {
            c.arg("--estargz-keep-diff-id");
        }
        let stdout = ok(&c.args([&src, &dst]).output().unwrap());
        let toc_name = format!("{dst}-esgztoc");
        assert!(
            stdout.starts_with(&format!("extra image: {toc_name}\n")),
            "the TOC image is named as the reference names it: {stdout}"
        );
        let (_, m) = stored_manifest(&ctd, &dst);
        let (_, tm) = stored_manifest(&ctd, &toc_name);
        assert_eq!(
            tm["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(
            json(&ctd.content(tm["config"]["digest"].as_str().unwrap())),
            j!({})
        );
        let toc_layers = tm["layers"].as_array().unwrap();
        assert_eq!(toc_layers.len(), 2);
        let config = json(&ctd.content(m["config"]["digest"].as_str().unwrap()));
        for (i, l) in m["layers"].as_array().unwrap().iter().enumerate() {
            let d = l["digest"].as_str().unwrap();
            let blob = ctd.content(d);
            let entry = toc_layers
                .iter()
                .find(|t| t["annotations"]["containerd.io/snapshot/stargz/layer.digest"] == d)
                .expect("the TOC image has this layer's TOC");
            assert_eq!(
                entry["mediaType"],
                "application/vnd.oci.image.layer.v1.tar+gzip"
            );
            let toc = ctd.content(entry["digest"].as_str().unwrap());
            let toc_digest = l["annotations"][TOC].as_str().unwrap();
            // Every chunk and file checks out read through the external TOC.
            let t = toc.clone();
            let opts = estargz::OpenOptions {
                expected_toc_digest: Some(toc_digest.to_string()),
                external_toc: Some(std::sync::Arc::new(move || Ok(t.clone()))),
                ..Default::default()
            };
            let mut orig = &tars[i][..];
            estargz::verify_blob_with(&blob, &opts, Some(&mut orig)).expect("verifies");
            if !keep {
                // The reference checker verifies the blob with its TOC put back inside
                // (a lossless stream ends with the tar's own end-of-archive, before
                // which the checker wants the TOC entry).
                verify_with_oracle(
                    scratch.path(),
                    &format!("ext-{i}"),
                    &with_toc_inside(&blob, &toc),
                    toc_digest,
                    Some(&tars[i]),
                );
            }
            // get-toc-digest IMAGE LAYER finds the TOC through the TOC image.
            let got = ok(&ctd
                .ours()
                .args(["image", "get-toc-digest", &dst, d])
                .output()
                .unwrap());
            assert_eq!(got.trim(), toc_digest);
            // On the bare content digest there is no image to look in: a clear error.
            let out = ctd
                .ours()
                .args(["image", "get-toc-digest", d])
                .output()
                .unwrap();
            assert!(!out.status.success());
            assert!(String::from_utf8_lossy(&out.stderr).contains("external TOC"));
            let stream = gunzip(&blob);
            if keep {
                assert_eq!(stream, tars[i], "keep-diff-id: the tar stream is untouched");
                assert_eq!(config["rootfs"]["diff_ids"][i], diff_ids[i].as_str());
            } else {
                assert_eq!(config["rootfs"]["diff_ids"][i], sha(&stream).as_str());
            }
        }
        // Both images push; the TOC image is an ordinary image to a registry.
        ok(&ctd
            .ours()
            .args(["image", "push", "--plain-http", &dst])
            .output()
            .unwrap());
        ok(&ctd
            .ours()
            .args(["image", "push", "--plain-http", &toc_name])
            .output()
            .unwrap());
        let (_, pushed) = registry_manifest(&toc_name);
        assert_eq!(json(&pushed), tm);
    }

    // Registry to registry, with the TOC image next to the target.
    let stdout = ok(&ctd
        .ours()
        .args([
            "image",
            "convert",
            "--estargz",
            "--oci",
            "--estargz-external-toc",
            &format!("docker://{src}"),
            &format!("{host}/ext/r2r:1"),
        ])
        .output()
        .unwrap());
    assert!(
        stdout.contains(&format!("extra image: {host}/ext/r2r:1-esgztoc")),
        "{stdout}"
    );
    let (_, tm) = registry_manifest(&format!("{host}/ext/r2r:1-esgztoc"));
    assert_eq!(json(&tm)["layers"].as_array().map(Vec::len), Some(2));

    // zstd:chunked: level, chunk size and record of its own.
    let rec = scratch.path().join("rec.json");
    std::fs::write(&rec, "{\"path\":\"etc/hello.txt\"}\n").unwrap();
    let zdst = format!("{host}/zstd/app:1");
    ok(&ctd
        .ours()
        .args([
            "image",
            "convert",
            "--zstdchunked",
            "--oci",
            "--zstdchunked-compression-level",
            "9",
            "--zstdchunked-chunk-size",
            "1000000",
            "--zstdchunked-record-in",
        ])
        .arg(&rec)
        .args([&src, &zdst])
        .output()
        .unwrap());
    let (_, zm) = stored_manifest(&ctd, &zdst);
    let ins = json(
        ok(&ctd
            .ours()
            .args(["image", "inspect", "--json", &zdst])
            .output()
            .unwrap())
        .as_bytes(),
    );
    let ls = ins["manifests"][0]["layers"].as_array().unwrap();
    assert_eq!(ls[0]["format"], "zstd:chunked");
    assert_eq!(
        ls[0]["prioritized_files"], 1,
        "the record prioritizes etc/hello.txt"
    );
    let big = zm["layers"][1]["digest"].as_str().unwrap();
    let toc = json(
        ok(&ctd
            .ours()
            .args(["image", "get-toc-digest", "--dump-toc", &zdst, big])
            .output()
            .unwrap())
        .as_bytes(),
    );
    let chunks = toc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "data/big.bin")
        .count();
    assert_eq!(chunks, 4, "3 MiB in chunks of 1000000 bytes");

    // Options the reference refuses, refused here too.
    for (args, why) in [
        (
            vec!["--estargz", "--oci", "--estargz-keep-diff-id"],
            "must be used with --estargz-external-toc",
        ),
        (
            vec!["--estargz", "--oci", "--estargz-external-toc", "--reuse"],
            "--reuse",
        ),
        (
            vec![
                "--estargz",
                "--oci",
                "--estargz-external-toc",
                "--estargz-keep-diff-id",
                "--estargz-record-in",
                "/dev/null",
            ],
            "conflicts with --estargz-record-in",
        ),
        (
            vec!["--zstdchunked", "--oci", "--estargz-external-toc"],
            "eStargz",
        ),
    ] {
        let out = ctd
            .ours()
            .args(["image", "convert"])
            .args(&args)
            .args([&src, "x/y:1"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
    }
}

/// Warnings (here: an ignored flag) reach a pipe without escape codes.
#[test]
fn no_colour_codes_in_pipes() {
    let dir = tempfile::tempdir().unwrap();
    let tars = layer_tars();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("blobs/sha256")).unwrap();
    // A one-layer OCI layout.
    let blob = gzip(&tars[0]);
    let config = serde_json::to_vec(
        &j!({"architecture": registry::Platform::host().architecture,
        "os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha(&tars[0])]}}),
    )
    .unwrap();
    let manifest = serde_json::to_vec(&j!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(&blob), "size": blob.len()}]})).unwrap();
    for b in [&blob, &config, &manifest] {
        std::fs::write(src.join("blobs/sha256").join(&sha(b)[7..]), b).unwrap();
    }
    std::fs::write(src.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        src.join("index.json"),
        serde_json::to_vec(&j!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha(&manifest), "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "v1"}}]})).unwrap(),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ctr-remote"))
        .args([
            "image",
            "convert",
            "--estargz",
            "--oci",
            "--estargz-gzip-helper",
            "pigz",
        ])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(format!("oci:{}:esgz", dir.path().join("dst").display()))
        .env_remove("NO_COLOR")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("WARN") && err.contains("--estargz-gzip-helper"),
        "{err}"
    );
    assert!(!err.contains('\u{1b}'), "escape codes in a pipe: {err:?}");
}

/// `-k`, `--tlscacert` and `--hosts-dir` reach a registry served over TLS.
#[test]
fn tls_flags_reach_a_tls_registry() {
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts {
        tls: true,
        ..Default::default()
    })
    .or_else(|| missing("docker-registry")) else {
        return;
    };
    let tls = reg.tls.as_ref().expect("tls");
    let host = reg.host();
    // Loopback hosts default to plain HTTP: a hosts directory says HTTPS.
    let hosts = tempfile::tempdir().unwrap();
    let hdir = hosts.path().join(host.replace(':', "_") + "_");
    std::fs::create_dir_all(&hdir).unwrap();
    std::fs::write(
        hdir.join("hosts.toml"),
        format!("server = \"https://{host}\"\n"),
    )
    .unwrap();
    // An image pushed over TLS with our own client.
    let mut cfg = registry::RegistryConfig::default();
    cfg.resolver.ca_file = Some(tls.ca_cert.clone());
    cfg.resolver.merge_hosts_dir(hosts.path()).unwrap();
    let client = Client::new(cfg, std::sync::Arc::new(registry::Anonymous)).unwrap();
    let tars = layer_tars();
    let blob = gzip(&tars[0]);
    let config = serde_json::to_vec(
        &j!({"architecture": registry::Platform::host().architecture,
        "os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha(&tars[0])]}}),
    )
    .unwrap();
    let manifest = serde_json::to_vec(&j!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(&blob), "size": blob.len()}]})).unwrap();
    let r = Reference::parse(&format!("{host}/tls/app:v1")).unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        for b in [&blob, &config] {
            client
                .push_blob(&r, b.clone().into(), &Default::default())
                .await
                .unwrap();
        }
        client
            .push_manifest(
                &r,
                "application/vnd.oci.image.manifest.v1+json",
                manifest.into(),
            )
            .await
            .unwrap();
    });
    let inspect = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ctr-remote"))
            .args(["image", "inspect", "--hosts-dir"])
            .arg(hosts.path())
            .args(extra)
            .arg(format!("docker://{host}/tls/app:v1"))
            .output()
            .unwrap()
    };
    let out = inspect(&[]);
    assert!(!out.status.success(), "an unknown CA is refused");
    let ca = tls.ca_cert.display().to_string();
    ok(&inspect(&["--tlscacert", &ca]));
    ok(&inspect(&["-k"]));
    ok(&inspect(&["--skip-verify"]));
    // A client certificate that cannot be read is an error naming it.
    let out = inspect(&[
        "--tlscert",
        "/nonexistent/c.pem",
        "--tlskey",
        "/nonexistent/k.pem",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/c.pem"));
}
