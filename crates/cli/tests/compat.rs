//! Compatibility with the reference implementation, both ways, through its own Go
//! library (the checker in `shared/oracle`), over a corpus of tars that covers PAX,
//! GNU and USTAR headers, long and UTF-8 names, links, devices, fifos, xattrs,
//! whiteouts, empty, exact-chunk and multi-chunk files, duplicates and prioritized files.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use std::fs::File;
use std::path::Path;
use std::process::Command;

use common::{corpus, json, oracle, run_ok};
use estargz::{BuildOptions, Codec, FileBlob, Toc};

const TARS: &[&str] = &["pax", "gnu", "ustar", "empty-files", "pax-prio"];

fn prioritized(dir: &Path, tar: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("{tar}.prio")))
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

fn build_ours(dir: &Path, tar: &str, opts: &BuildOptions, out: &Path) -> estargz::BuildOutput {
    let input = File::open(dir.join(format!("{tar}.tar"))).expect("tar");
    let output = File::create(out).expect("blob");
    estargz::build(input, output, opts).unwrap_or_else(|e| panic!("building {tar}: {e}"))
}

/// Option sets exercised on both sides.
fn option_sets(prio: &[String]) -> Vec<(&'static str, BuildOptions)> {
    vec![
        (
            "default",
            BuildOptions {
                prioritized_files: prio.to_vec(),
                ..Default::default()
            },
        ),
        (
            "small-chunks-level1",
            BuildOptions {
                codec: Codec::Gzip { level: 1 },
                chunk_size: 100_000,
                prioritized_files: prio.to_vec(),
                ..Default::default()
            },
        ),
        (
            "zstd",
            BuildOptions {
                codec: Codec::Zstd { level: 3 },
                prioritized_files: prio.to_vec(),
                ..Default::default()
            },
        ),
        (
            "one-thread",
            BuildOptions {
                threads: 1,
                prioritized_files: prio.to_vec(),
                ..Default::default()
            },
        ),
    ]
}

#[test]
fn our_blobs_verify_with_the_reference() {
    let Some(oracle) = oracle() else { return };
    let Some(dir) = corpus() else { return };
    for tar in TARS {
        let prio = prioritized(dir.path(), tar);
        for (label, opts) in option_sets(&prio) {
            let blob = dir.path().join(format!("{tar}-{label}.ours"));
            let built = build_ours(dir.path(), tar, &opts, &blob);
            let zstd = matches!(opts.codec, Codec::Zstd { .. });
            let mut cmd = Command::new(&oracle);
            cmd.arg("verify").arg("--toc-digest").arg(&built.toc_digest);
            if zstd {
                cmd.arg("--zstdchunked");
            }
            cmd.arg(&blob).arg(dir.path().join(format!("{tar}.tar")));
            let v = json(&run_ok(&mut cmd));
            assert_eq!(v["ok"], true, "{tar}/{label}: {v}");
            assert_eq!(v["tocDigest"], built.toc_digest.as_str(), "{tar}/{label}");
            assert_eq!(v["diffID"], built.diff_id.as_str(), "{tar}/{label}: diffID");
            if !zstd {
                run_ok(Command::new("gzip").arg("-t").arg(&blob));
                let listing =
                    String::from_utf8(run_ok(Command::new("tar").arg("-tzf").arg(&blob))).unwrap();
                assert!(
                    listing.contains("stargz.index.json"),
                    "{tar}/{label}: tar -tzf lists the TOC"
                );
            }
            let landmark = if prio.is_empty() {
                ".no.prefetch.landmark"
            } else {
                ".prefetch.landmark"
            };
            let pf = json(&run_ok(
                Command::new(&oracle)
                    .args(if zstd {
                        vec!["list-prefetch", "--zstdchunked"]
                    } else {
                        vec!["list-prefetch"]
                    })
                    .arg(&blob),
            ));
            assert_eq!(pf["landmark"], landmark, "{tar}/{label}: {pf}");
        }
    }
}

#[test]
fn reference_blobs_are_read_and_verified_by_us() {
    let Some(oracle) = oracle() else { return };
    let Some(dir) = corpus() else { return };
    let variants: &[(&str, &[&str])] = &[
        ("gzip", &[]),
        (
            "gzip-procs2-level1",
            &["--procs", "2", "--level", "1", "--chunk-size", "100000"],
        ),
        ("zstd", &["--zstdchunked"]),
    ];
    for tar in TARS {
        let tar_path = dir.path().join(format!("{tar}.tar"));
        let prio = prioritized(dir.path(), tar);
        for (label, args) in variants {
            let blob = dir.path().join(format!("{tar}-{label}.ref"));
            let mut cmd = Command::new(&oracle);
            cmd.arg("build").args(*args);
            if !prio.is_empty() {
                cmd.arg("--prioritized").arg(prio.join(","));
            }
            let built = json(&run_ok(cmd.arg(&tar_path).arg(&blob)));
            let src = FileBlob::open(&blob).unwrap();
            let mut original = File::open(&tar_path).unwrap();
            let expected = built["tocDigest"].as_str().unwrap();
            let report = estargz::verify_blob(&src, Some(expected), Some(&mut original))
                .unwrap_or_else(|e| {
                    panic!("{tar}/{label}: our verifier rejects the reference's blob: {e}")
                });
            assert_eq!(report.toc_digest, expected, "{tar}/{label}");
            assert_eq!(
                report.diff_id,
                built["diffID"].as_str().unwrap(),
                "{tar}/{label}: diffID"
            );
            assert_eq!(
                report.uncompressed_size,
                built["uncompressedSize"].as_u64().unwrap(),
                "{tar}/{label}"
            );
            assert!(report.compared_with_tar.unwrap() > 0);
            // Every file read lazily equals the tar's bytes.
            let reader = estargz::Reader::open(&src, &Default::default()).unwrap();
            let mut archive = tar::Archive::new(File::open(&tar_path).unwrap());
            let mut expected_files = std::collections::HashMap::new();
            for entry in archive.entries().unwrap() {
                let mut entry = entry.unwrap();
                if entry.header().entry_type().is_file() {
                    let name =
                        estargz::clean_name(&entry.path().unwrap().to_string_lossy()).unwrap();
                    let mut data = Vec::new();
                    std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
                    expected_files.insert(name, data);
                }
            }
            for (name, data) in &expected_files {
                let id = reader
                    .index
                    .lookup(name)
                    .unwrap_or_else(|| panic!("{tar}/{label}: {name} missing"));
                assert_eq!(
                    &reader.read_file(&src, id).unwrap(),
                    data,
                    "{tar}/{label}: {name}"
                );
            }
        }
    }
}

#[test]
fn toc_entries_equal_the_reference_apart_from_offsets() {
    let Some(oracle) = oracle() else { return };
    let Some(dir) = corpus() else { return };
    for tar in TARS {
        let tar_path = dir.path().join(format!("{tar}.tar"));
        let prio = prioritized(dir.path(), tar);
        for zstd in [false, true] {
            let ref_blob = dir.path().join(format!("{tar}-{zstd}.cmp-ref"));
            let mut cmd = Command::new(&oracle);
            cmd.args(["build", "--procs", "1"]);
            if zstd {
                cmd.arg("--zstdchunked");
            }
            if !prio.is_empty() {
                cmd.arg("--prioritized").arg(prio.join(","));
            }
            run_ok(cmd.arg(&tar_path).arg(&ref_blob));
            let mut toc_cmd = Command::new(&oracle);
            toc_cmd.arg("toc");
            if zstd {
                toc_cmd.arg("--zstdchunked");
            }
            let theirs = Toc::from_json(&run_ok(toc_cmd.arg(&ref_blob))).unwrap();
            let opts = BuildOptions {
                codec: if zstd {
                    Codec::Zstd { level: 3 }
                } else {
                    Codec::Gzip { level: 9 }
                },
                prioritized_files: prio.clone(),
                ..Default::default()
            };
            let ours = build_ours(
                dir.path(),
                tar,
                &opts,
                &dir.path().join(format!("{tar}-{zstd}.cmp-ours")),
            )
            .toc;
            assert_eq!(
                ours.entries.len(),
                theirs.entries.len(),
                "{tar} zstd={zstd}"
            );
            for (i, (a, b)) in ours.entries.iter().zip(&theirs.entries).enumerate() {
                let (mut a, mut b) = (a.clone(), b.clone());
                a.offset = 0;
                b.offset = 0;
                assert_eq!(a, b, "{tar} zstd={zstd}: entry {i} differs");
            }
        }
    }
}

/// Blobs built with an external TOC (`--estargz-external-toc`): with the TOC put back
/// in front of an ordinary footer the reference verifies them against the original
/// tar; lossless ones (`--estargz-keep-diff-id`) decompress to the tar itself and
/// every file reads back through the external TOC.
#[test]
fn external_toc_blobs_verify_with_the_reference() {
    let Some(oracle) = oracle() else { return };
    let Some(dir) = corpus() else { return };
    for tar in TARS {
        let tar_path = dir.path().join(format!("{tar}.tar"));
        let tar_bytes = std::fs::read(&tar_path).unwrap();
        for lossless in [false, true] {
            let blob_path = dir.path().join(format!("{tar}-{lossless}.ext"));
            let opts = BuildOptions {
                external_toc: true,
                lossless,
                chunk_size: 100_000,
                ..Default::default()
            };
            let built = build_ours(dir.path(), tar, &opts, &blob_path);
            let toc = built.external_toc.clone().unwrap();
            let blob = std::fs::read(&blob_path).unwrap();
            let src = FileBlob::open(&blob_path).unwrap();
            let t = toc.clone();
            let open = estargz::OpenOptions {
                expected_toc_digest: Some(built.toc_digest.clone()),
                external_toc: Some(std::sync::Arc::new(move || Ok(t.clone()))),
                ..Default::default()
            };
            let mut original = File::open(&tar_path).unwrap();
            let report = estargz::verify_blob_with(&src, &open, Some(&mut original))
                .unwrap_or_else(|e| panic!("{tar} lossless={lossless}: {e}"));
            assert_eq!(report.diff_id, built.diff_id);
            let mut stream = Vec::new();
            std::io::Read::read_to_end(
                &mut flate2::read::MultiGzDecoder::new(&blob[..]),
                &mut stream,
            )
            .unwrap();
            if lossless {
                assert_eq!(stream, tar_bytes, "{tar}: lossless keeps the tar");
                continue;
            }
            let payload = &blob[..blob.len() - estargz::EXTERNAL_TOC_FOOTER_SIZE];
            let mut inside = payload.to_vec();
            inside.extend_from_slice(&toc);
            inside.extend(
                estargz::Footer::Estargz {
                    toc_offset: payload.len() as u64,
                }
                .encode(),
            );
            let p = dir.path().join(format!("{tar}.ext-inside"));
            std::fs::write(&p, &inside).unwrap();
            let v = json(&run_ok(
                Command::new(&oracle)
                    .args(["verify", "--toc-digest", &built.toc_digest])
                    .arg(&p)
                    .arg(&tar_path),
            ));
            assert_eq!(v["ok"], true, "{tar}: {v}");
        }
    }
}
