//! Hostile and broken input: every case must end in a typed error that says what is
//! wrong, never a panic, a hang, an unbounded allocation or wrong bytes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

use std::io::Cursor;

use estargz::compress_member;
use estargz::read_toc;
use estargz::synthetic_file_header;
use estargz::{BuildOptions, Codec, EntryType, Error, Footer, OpenOptions, Reader, Toc};

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

fn sample() -> (Vec<u8>, estargz::BuildOutput) {
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let tar = tar_of(&[
        ("a.txt", b"hello".to_vec()),
        ("dir/big", big),
        ("dir/small", b"x".repeat(10)),
    ]);
    let mut blob = Vec::new();
    let opts = BuildOptions {
        chunk_size: 64 << 10,
        ..Default::default()
    };
    let out = estargz::build(Cursor::new(tar), &mut blob, &opts).unwrap();
    (blob, out)
}

/// Replaces a gzip blob's TOC with `toc`, keeping its data.
fn with_toc(blob: &[u8], toc: &Toc) -> Vec<u8> {
    let footer = Footer::detect(&blob[blob.len() - 51..], blob.len() as u64).unwrap();
    let mut out = blob[..footer.toc_offset() as usize].to_vec();
    let json = toc.to_json().unwrap();
    let mut member = synthetic_file_header("stargz.index.json", json.len() as u64).to_vec();
    member.extend_from_slice(&json);
    member.resize(512 + json.len().div_ceil(512) * 512 + 1024, 0);
    let toc_offset = out.len() as u64;
    out.extend(compress_member(Codec::Gzip { level: 6 }, &member).unwrap());
    out.extend(Footer::Estargz { toc_offset }.encode());
    out
}

fn open(blob: &[u8]) -> estargz::Result<Reader> {
    Reader::open(&blob.to_vec(), &OpenOptions::default())
}

fn edited(f: impl FnOnce(&mut Toc)) -> estargz::Result<Reader> {
    let (blob, out) = sample();
    let mut toc = out.toc.clone();
    f(&mut toc);
    open(&with_toc(&blob, &toc))
}

#[test]
fn the_sample_opens_and_reads_back() {
    let (blob, out) = sample();
    let r = open(&blob).unwrap();
    assert_eq!(r.toc_digest, out.toc_digest);
    let id = r.index.lookup("dir/big").unwrap();
    assert_eq!(r.index.node(id).chunks.len(), 5);
    let data = r.read_range(&blob, id, 65_000, 2_000).unwrap();
    let want: Vec<u8> = (65_000..67_000u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(data, want);
}

#[test]
fn names_that_climb_out_or_are_absolute_are_refused() {
    for bad in ["../etc/passwd", "a/../../b", "/etc/shadow"] {
        let err = edited(|t| t.entries[1].name = bad.into()).unwrap_err();
        assert!(matches!(err, Error::BadEntry { .. }), "{bad}: {err}");
        assert!(err.to_string().contains(bad), "{err}");
    }
}

#[test]
fn absurd_sizes_and_offsets_are_refused() {
    fn big(t: &mut Toc) -> &mut estargz::TocEntry {
        t.entries.iter_mut().find(|e| e.name == "dir/big").unwrap()
    }
    // A size the chunks do not cover.
    let err = edited(|t| big(t).size = 1 << 60).unwrap_err();
    assert!(err.to_string().contains("dir/big"), "{err}");
    // A chunk larger than any reader should allocate.
    let err = edited(|t| big(t).chunk_size = 1 << 40).unwrap_err();
    assert!(err.to_string().contains("chunk size"), "{err}");
    // An offset past the data.
    let err = edited(|t| big(t).offset = 1 << 50).unwrap_err();
    assert!(err.to_string().contains("outside the blob"), "{err}");
    // Overlapping chunks.
    let err = edited(|t| {
        let i = t
            .entries
            .iter()
            .position(|e| e.kind == EntryType::Chunk)
            .unwrap();
        t.entries[i].chunk_offset -= 10;
    })
    .unwrap_err();
    assert!(err.to_string().contains("previous one ends"), "{err}");
    // A chunk with nothing before it.
    let err = edited(|t| {
        let i = t
            .entries
            .iter()
            .position(|e| e.kind == EntryType::Chunk)
            .unwrap();
        let c = t.entries.remove(i);
        t.entries.insert(0, c);
    })
    .unwrap_err();
    assert!(err.to_string().contains("chunk without"), "{err}");
}

#[test]
fn broken_links_and_parents_are_refused() {
    let err = edited(|t| {
        let mut l = estargz::TocEntry::new("link", EntryType::Hardlink);
        l.link_name = "nowhere".into();
        t.entries.push(l);
    })
    .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let err = edited(|t| {
        let mut a = estargz::TocEntry::new("loop-a", EntryType::Hardlink);
        a.link_name = "loop-b".into();
        let mut b = estargz::TocEntry::new("loop-b", EntryType::Hardlink);
        b.link_name = "loop-a".into();
        t.entries.extend([a, b]);
    })
    .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let err = edited(|t| {
        t.entries
            .push(estargz::TocEntry::new("a.txt/inside", EntryType::Reg))
    })
    .unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
}

#[test]
fn deep_nesting_and_duplicates() {
    let deep = "d/".repeat(1500) + "f";
    let r = edited(|t| {
        t.entries
            .push(estargz::TocEntry::new(deep.clone(), EntryType::Reg))
    })
    .unwrap();
    assert!(r.index.lookup(&deep).is_some());
    let err = edited(|t| {
        t.entries
            .push(estargz::TocEntry::new("d/".repeat(3000), EntryType::Dir))
    })
    .unwrap_err();
    assert!(err.to_string().contains("longer than"), "{err}");
    // Duplicates: the last entry wins.
    let r = edited(|t| {
        let mut dup = estargz::TocEntry::new("a.txt", EntryType::Symlink);
        dup.link_name = "dir/small".into();
        t.entries.push(dup);
    })
    .unwrap();
    let n = r.index.node(r.index.lookup("a.txt").unwrap());
    assert_eq!(n.kind, estargz::NodeKind::Symlink);
    assert_eq!(n.link_target, "dir/small");
}

#[test]
fn bad_footers_truncated_blobs_and_huge_tocs() {
    let (blob, _) = sample();
    let mut bad = blob.clone();
    let n = bad.len();
    bad[n - 30] ^= 0x20; // inside "STARGZ"/hex offset
    assert!(
        matches!(open(&bad), Err(Error::BadFooter(_))),
        "{:?}",
        open(&bad).err()
    );
    assert!(open(&blob[..blob.len() - 10]).is_err());
    assert!(matches!(open(&blob[..20]), Err(Error::BlobTooSmall { .. })));
    // The TOC member corrupted.
    let footer = Footer::detect(&blob[n - 51..], n as u64).unwrap();
    let mut bad = blob.clone();
    bad[footer.toc_offset() as usize + 20] ^= 0xff;
    assert!(
        matches!(open(&bad), Err(Error::BadToc { .. } | Error::TocJson(_))),
        "{:?}",
        open(&bad).err()
    );
    // A TOC larger than the limit is refused before it is read.
    let opts = OpenOptions {
        max_toc_size: 16,
        ..Default::default()
    };
    assert!(matches!(
        read_toc(&blob, &opts),
        Err(Error::TocTooLarge { .. })
    ));
    // A zstd:chunked footer claiming a huge TOC.
    let mut z = vec![0u8; 100];
    z.extend(
        Footer::ZstdChunked {
            toc_offset: 10,
            toc_compressed_size: 20,
            toc_size: 1 << 50,
        }
        .encode(),
    );
    assert!(matches!(
        read_toc(&z, &OpenOptions::default()),
        Err(Error::TocTooLarge { .. })
    ));
}

#[test]
fn wrong_toc_digest_is_refused() {
    let (blob, _) = sample();
    let opts = OpenOptions {
        expected_toc_digest: Some(format!("sha256:{}", "0".repeat(64))),
        ..Default::default()
    };
    assert!(matches!(
        Reader::open(&blob, &opts),
        Err(Error::TocDigestMismatch { .. })
    ));
}

#[test]
fn corrupted_chunks_never_return_data() {
    let (blob, _) = sample();
    let r = open(&blob).unwrap();
    let id = r.index.lookup("dir/big").unwrap();
    let chunk = r.index.node(id).chunks[2].clone();
    // Flip a byte in the middle of the compressed chunk: either inflate or the
    // digest check must fail.
    let mut bad = blob.clone();
    let mid = ((chunk.blob_offset + chunk.blob_end) / 2) as usize;
    bad[mid] ^= 0x55;
    let err = r.read_range(&bad, id, chunk.file_offset, 10).unwrap_err();
    assert!(matches!(err, Error::BadChunk { .. }), "{err}");
    assert!(err.to_string().contains("dir/big"), "{err}");
    // Other chunks still read.
    assert!(r.read_range(&bad, id, 0, 10).is_ok());
    // A chunk whose digest in the TOC is wrong.
    let err = edited(|t| {
        let e = t.entries.iter_mut().find(|e| e.name == "a.txt").unwrap();
        e.chunk_digest = format!("sha256:{}", "1".repeat(64));
    })
    .and_then(|r| {
        let (blob, _) = sample();
        let id = r.index.lookup("a.txt").unwrap();
        let (_, out) = sample();
        let mut toc = out.toc.clone();
        toc.entries
            .iter_mut()
            .find(|e| e.name == "a.txt")
            .unwrap()
            .chunk_digest = format!("sha256:{}", "1".repeat(64));
        r.read_file(&with_toc(&blob, &toc), id)
    })
    .unwrap_err();
    assert!(err.to_string().contains("chunkDigest mismatch"), "{err}");
    // verify_blob catches the corruption too.
    assert!(estargz::verify_blob(&bad, None, None).is_err());
}

#[test]
fn output_does_not_depend_on_thread_count() {
    let files: Vec<(String, Vec<u8>)> = (0..50)
        .map(|i| {
            (
                format!("f{i}"),
                (0..(i * 3000)).map(|j| (j * i % 256) as u8).collect(),
            )
        })
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
    let tar = tar_of(&refs);
    let digests: Vec<String> = [1, 2, 4]
        .iter()
        .map(|&threads| {
            let mut blob = Vec::new();
            let opts = BuildOptions {
                threads,
                chunk_size: 10_000,
                ..Default::default()
            };
            estargz::build(Cursor::new(&tar), &mut blob, &opts)
                .unwrap()
                .blob_digest
        })
        .collect();
    assert_eq!(digests[0], digests[1]);
    assert_eq!(digests[0], digests[2]);
}

#[test]
fn min_chunk_size_packs_small_files_and_reads_back() {
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| (format!("s{i}"), format!("small file {i}\n").into_bytes()))
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
    let tar = tar_of(&refs);
    let mut blob = Vec::new();
    let opts = BuildOptions {
        min_chunk_size: 4096,
        ..Default::default()
    };
    let out = estargz::build(Cursor::new(&tar), &mut blob, &opts).unwrap();
    assert!(out.toc.entries.iter().any(|e| e.inner_offset > 0));
    let r = open(&blob).unwrap();
    for (name, data) in &files {
        assert_eq!(
            &r.read_file(&blob, r.index.lookup(name).unwrap()).unwrap(),
            data
        );
    }
    estargz::verify_blob(&blob, Some(&out.toc_digest), Some(&mut Cursor::new(&tar))).unwrap();
}

#[test]
fn bad_tars_are_refused_by_the_builder() {
    let mut evil = tar_of(&[("x", b"data".to_vec())]);
    evil[..2].copy_from_slice(b"..");
    evil[2] = b'/';
    // Fix the checksum so only the name is wrong.
    let mut h = [0u8; 512];
    h.copy_from_slice(&evil[..512]);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&c| c as u32).sum();
    evil[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let err = estargz::build(Cursor::new(&evil), Vec::new(), &BuildOptions::default()).unwrap_err();
    assert!(err.to_string().contains(".."), "{err}");
    // A regular file that names the root.
    let root_file = tar_of(&[("./", b"data".to_vec())]);
    let err = estargz::build(
        Cursor::new(&root_file),
        Vec::new(),
        &BuildOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("names the root"), "{err}");
    // A directory that claims data.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(10);
    h.set_mode(0o755);
    h.set_cksum();
    b.append_data(&mut h, "d/", &[7u8; 10][..]).unwrap();
    let dir_with_data = b.into_inner().unwrap();
    let err = estargz::build(
        Cursor::new(&dir_with_data),
        Vec::new(),
        &BuildOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("claims 10 bytes"), "{err}");
    // Truncated data.
    let tar = tar_of(&[("x", vec![7u8; 5000])]);
    let err = estargz::build(
        Cursor::new(&tar[..2000]),
        Vec::new(),
        &BuildOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::BadTar { .. }), "{err}");
    // A missing prioritized file.
    let opts = BuildOptions {
        prioritized_files: vec!["nope".into()],
        ..Default::default()
    };
    let err = estargz::build(Cursor::new(&tar), Vec::new(), &opts).unwrap_err();
    assert!(matches!(err, Error::PrioritizedNotFound(_)), "{err}");
}
