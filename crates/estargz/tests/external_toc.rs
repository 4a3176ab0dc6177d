//! Blobs whose TOC is kept outside them (`--estargz-external-toc`) and lossless builds
//! (`--estargz-keep-diff-id`): the footer, reading through a supplied TOC, refusing
//! without one, and the tar stream kept byte for byte.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

use std::io::{Cursor, Read};
use std::sync::Arc;

use estargz::{BuildOptions, Codec, Error, Footer, OpenOptions, Reader};
use sha2::{Digest as _, Sha256};

fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn big() -> Vec<u8> {
    (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn sample_tar() -> Vec<u8> {
    tar_of(&[
        ("a.txt", b"hello".to_vec()),
        ("dir/big", big()),
        ("dir/small", b"x".repeat(10)),
        // A duplicate: a lossless build keeps both, readers take the last.
        ("a.txt", b"second".to_vec()),
    ])
}

fn build(tar: &[u8], lossless: bool) -> (Vec<u8>, estargz::BuildOutput) {
    let mut blob = Vec::new();
    let opts = BuildOptions {
        chunk_size: 64 << 10,
        external_toc: true,
        lossless,
        threads: 2,
        ..Default::default()
    };
    let out = estargz::build(Cursor::new(tar.to_vec()), &mut blob, &opts).unwrap();
    (blob, out)
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn open_with(blob: &[u8], toc: Vec<u8>, expected: Option<String>) -> estargz::Result<Reader> {
    let opts = OpenOptions {
        expected_toc_digest: expected,
        external_toc: Some(Arc::new(move || Ok(toc.clone()))),
        ..OpenOptions::default()
    };
    Reader::open(&blob.to_vec(), &opts)
}

#[test]
fn external_toc_blob_reads_through_the_supplied_toc() {
    for lossless in [false, true] {
        let tar = sample_tar();
        let (blob, out) = build(&tar, lossless);
        let toc = out.external_toc.clone().expect("external TOC");
        // The blob ends with the 46-byte footer and holds no TOC.
        assert_eq!(
            Footer::detect(&blob[blob.len() - 51..], blob.len() as u64).unwrap(),
            Footer::ExternalToc {
                payload_end: blob.len() as u64 - 46
            }
        );
        let stream = gunzip(&blob);
        assert!(
            !stream
                .windows(b"stargz.index.json".len())
                .any(|w| w == b"stargz.index.json"),
            "TOC in the blob"
        );
        // diff ID and uncompressed size describe the blob alone.
        assert_eq!(out.diff_id, sha(&stream));
        assert_eq!(out.uncompressed_size, stream.len() as u64);
        // The TOC member is a gzip of the stargz.index.json tar entry, the TOC digest
        // the sha256 of the JSON inside.
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&toc[..]));
        let mut e = ar.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.path().unwrap().to_str(), Some("stargz.index.json"));
        let mut json = Vec::new();
        e.read_to_end(&mut json).unwrap();
        assert_eq!(out.toc_digest, sha(&json));

        let r = open_with(&blob, toc.clone(), Some(out.toc_digest.clone())).unwrap();
        let id = r.index.lookup("dir/big").unwrap();
        assert_eq!(r.read_file(&blob.to_vec(), id).unwrap(), big());
        let id = r.index.lookup("a.txt").unwrap();
        assert_eq!(r.read_file(&blob.to_vec(), id).unwrap(), b"second");
        assert_eq!(r.payload_end(), blob.len() as u64 - 46);

        // Whole-blob verification passes through the same TOC.
        let opts = OpenOptions {
            external_toc: Some(Arc::new(move || Ok(toc.clone()))),
            ..OpenOptions::default()
        };
        let rep = estargz::verify_blob_with(&blob.to_vec(), &opts, None).unwrap();
        assert_eq!(rep.diff_id, out.diff_id);

        if lossless {
            // Byte for byte the input tar: the layer keeps its diff ID.
            assert_eq!(stream, tar);
            assert_eq!(out.diff_id, sha(&tar));
        } else {
            // No end-of-archive in the blob: it travels with the TOC, as the reference
            // writes it; the stream starts with the no-prefetch landmark.
            assert_ne!(stream, tar);
            assert!(r.index.no_prefetch_landmark);
        }
    }
}

#[test]
fn external_toc_blob_is_refused_without_its_toc() {
    let (blob, out) = build(&sample_tar(), false);
    let err = Reader::open(&blob, &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, Error::ExternalToc), "{err}");
    // Another blob's TOC does not pass the digest check.
    let (_, other) = build(&tar_of(&[("z", b"z".to_vec())]), false);
    let err = open_with(
        &blob,
        other.external_toc.unwrap(),
        Some(out.toc_digest.clone()),
    )
    .unwrap_err();
    assert!(matches!(err, Error::TocDigestMismatch { .. }), "{err}");
    // A failing source is an I/O error naming the external TOC.
    let opts = OpenOptions {
        external_toc: Some(Arc::new(|| Err(std::io::Error::other("registry down")))),
        ..OpenOptions::default()
    };
    let err = Reader::open(&blob, &opts).unwrap_err();
    assert!(err.to_string().contains("external TOC"), "{err}");
    // A lying size is bounded by the TOC limit.
    let opts = OpenOptions {
        max_toc_size: 10,
        external_toc: Some(Arc::new(|| Ok(vec![0u8; 11]))),
        ..OpenOptions::default()
    };
    assert!(matches!(
        Reader::open(&blob, &opts).unwrap_err(),
        Error::TocTooLarge { .. }
    ));
}

#[test]
fn lossless_builds_need_an_external_gzip_toc_and_no_priorities() {
    let tar = sample_tar();
    let bad = [
        BuildOptions {
            lossless: true,
            ..Default::default()
        },
        BuildOptions {
            lossless: true,
            external_toc: true,
            prioritized_files: vec!["a.txt".into()],
            ..Default::default()
        },
        BuildOptions {
            external_toc: true,
            codec: Codec::Zstd { level: 3 },
            ..Default::default()
        },
    ];
    for opts in bad {
        let err = estargz::build(Cursor::new(tar.clone()), Vec::new(), &opts).unwrap_err();
        assert!(matches!(err, Error::InvalidOption(_)), "{err}");
    }
    // A tar that already holds a TOC cannot be kept byte for byte.
    let with_toc = tar_of(&[("stargz.index.json", b"{}".to_vec())]);
    let opts = BuildOptions {
        lossless: true,
        external_toc: true,
        ..Default::default()
    };
    let err = estargz::build(Cursor::new(with_toc), Vec::new(), &opts).unwrap_err();
    assert!(matches!(err, Error::BadTar { .. }), "{err}");
}

/// A tar with PAX headers, a long name and trailing zero records beyond the two
/// end-of-archive blocks (as `tar` pads to its record size) comes back unchanged.
#[test]
fn lossless_keeps_extension_headers_and_trailing_records() {
    let mut b = tar::Builder::new(Vec::new());
    let long = format!("d/{}", "n".repeat(150));
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o600);
    h.set_cksum();
    b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
    b.append_pax_extensions([("SCHILY.xattr.user.k", &b"v"[..])])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(70_000);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "x/data", &big()[..70_000]).unwrap();
    let mut tar = b.into_inner().unwrap();
    tar.extend(vec![0u8; 10 * 512]);
    let (blob, out) = build(&tar, true);
    assert_eq!(gunzip(&blob), tar);
    assert_eq!(out.diff_id, sha(&tar));
    let r = open_with(&blob, out.external_toc.unwrap(), Some(out.toc_digest)).unwrap();
    let id = r.index.lookup(&long).unwrap();
    assert_eq!(r.read_file(&blob.to_vec(), id).unwrap(), b"abc");
    let id = r.index.lookup("x/data").unwrap();
    assert_eq!(
        r.index.node(id).xattrs.get("user.k").map(Vec::as_slice),
        Some(&b"v"[..])
    );
    assert_eq!(r.read_file(&blob.to_vec(), id).unwrap(), &big()[..70_000]);
}
