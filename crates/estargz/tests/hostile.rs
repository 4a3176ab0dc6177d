//! Hostile blobs, hand-made: every attack must end in a clear error (or correct bytes)
//! with bounded memory and time. Risky cases run in a child process (this test binary
//! re-executed) under `RLIMIT_AS`, so an unbounded allocation aborts the child and
//! fails the test instead of taking the machine down; streaming cases check the
//! child's peak RSS (`VmHWM`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

use std::io::Cursor;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use estargz::compress_member;
use estargz::synthetic_file_header;
use estargz::{
    decode_chunk, BuildOptions, Codec, Compression, EntryType, Error, Footer, OpenOptions, Reader,
    Toc, TocEntry,
};
use estargz::{BlobSource, Chunk, MAX_CHUNK_SIZE, MAX_INNER_OFFSET};
use sha2::{Digest as _, Sha256};

const CASE_ENV: &str = "ESTARGZ_HOSTILE_CASE";
const RESULT_TAG: &str = "HOSTILE-RESULT:";
/// Address space a child may use: well above what any bounded case needs, well below
/// what the attacks used to ask for.
const CHILD_AS_LIMIT: u64 = 768 << 20;

/// Runs `body` in a child process limited to `CHILD_AS_LIMIT` of address space and
/// returns what it returned. `case` must be the name of the calling test.
fn bounded(case: &str, body: impl FnOnce() -> String) -> String {
    if std::env::var(CASE_ENV).as_deref() == Ok(case) {
        let lim = libc::rlimit {
            rlim_cur: CHILD_AS_LIMIT,
            rlim_max: CHILD_AS_LIMIT,
        };
        // SAFETY: setrlimit with a valid rlimit struct.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) }, 0);
        let out = body();
        println!("{RESULT_TAG}{}", out.replace('\n', " "));
        return out;
    }
    let start = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([case, "--exact", "--nocapture", "--test-threads=1"])
        .env(CASE_ENV, case)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{case}: child failed ({:?}) after {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        start.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.split_once(RESULT_TAG).map(|(_, r)| r))
        .unwrap_or_else(|| panic!("{case}: no result from the child: {stdout}"))
        .to_string()
}

/// Peak resident memory of this process, in bytes.
fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

fn err_text<T>(r: estargz::Result<T>) -> String {
    match r {
        Ok(_) => "OK".into(),
        Err(e) => e.to_string(),
    }
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn sample() -> (Vec<u8>, Toc) {
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let tar = tar_of(&[("a.txt", b"hello"), ("dir/big", &big)]);
    let mut blob = Vec::new();
    let opts = BuildOptions {
        chunk_size: 64 << 10,
        ..Default::default()
    };
    let out = estargz::build(Cursor::new(tar), &mut blob, &opts).unwrap();
    (blob, out.toc)
}

/// The gzip TOC member and footer for `toc` placed at `toc_offset`.
fn toc_tail(toc: &Toc, toc_offset: u64) -> Vec<u8> {
    let json = toc.to_json().unwrap();
    toc_tail_json(&json, toc_offset)
}

fn toc_tail_json(json: &[u8], toc_offset: u64) -> Vec<u8> {
    let mut member = synthetic_file_header("stargz.index.json", json.len() as u64).to_vec();
    member.extend_from_slice(json);
    member.resize(512 + json.len().div_ceil(512) * 512 + 1024, 0);
    let mut out = compress_member(Codec::Gzip { level: 6 }, &member).unwrap();
    out.extend(Footer::Estargz { toc_offset }.encode());
    out
}

/// Replaces a gzip blob's TOC with `toc`, keeping its data.
fn with_toc(blob: &[u8], toc: &Toc) -> Vec<u8> {
    let footer = Footer::detect(&blob[blob.len() - 51..], blob.len() as u64).unwrap();
    let mut out = blob[..footer.toc_offset() as usize].to_vec();
    let at = out.len() as u64;
    out.extend(toc_tail(toc, at));
    out
}

/// Opens with the TOC digest expected, as a verifying reader does: the attacker wrote
/// the TOC, so its digest is "valid".
fn open_trusted(src: &dyn BlobSource) -> estargz::Result<Reader> {
    let raw = estargz::read_toc(src, &OpenOptions::default())?;
    let opts = OpenOptions {
        expected_toc_digest: Some(raw.digest),
        ..OpenOptions::default()
    };
    Reader::open(src, &opts)
}

/// A blob whose middle is a gap of zeros nobody stores; records the largest read.
struct Sparse {
    head: Vec<u8>,
    gap: u64,
    tail: Vec<u8>,
    largest_read: AtomicU64,
}

impl BlobSource for Sparse {
    fn size(&self) -> u64 {
        self.head.len() as u64 + self.gap + self.tail.len() as u64
    }
    fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.largest_read.fetch_max(len as u64, Ordering::SeqCst);
        let end = offset + len as u64;
        if end > self.size() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut out = Vec::with_capacity(len);
        let tail_start = self.head.len() as u64 + self.gap;
        for pos in offset..end {
            out.push(if pos < self.head.len() as u64 {
                self.head[pos as usize]
            } else if pos >= tail_start {
                self.tail[(pos - tail_start) as usize]
            } else {
                0
            });
        }
        Ok(out)
    }
}

// 1. innerOffset bomb -------------------------------------------------------------

#[test]
fn inner_offset_bomb_is_refused_at_open() {
    let r = bounded("inner_offset_bomb_is_refused_at_open", || {
        let (blob, mut toc) = sample();
        let e = toc.entries.iter_mut().find(|e| e.name == "a.txt").unwrap();
        e.inner_offset = 1 << 36;
        let bad = with_toc(&blob, &toc);
        err_text(open_trusted(&bad))
    });
    assert!(r.contains("inner offset") && r.contains("a.txt"), "{r}");
}

#[test]
fn decoding_never_allocates_for_the_inner_offset() {
    let r = bounded("decoding_never_allocates_for_the_inner_offset", || {
        let member = compress_member(Codec::Gzip { level: 6 }, b"tiny member").unwrap();
        let chunk = Chunk {
            file_offset: 0,
            size: 4,
            blob_offset: 1,
            blob_end: 1 + member.len() as u64,
            inner_offset: 1 << 36,
            digest: None,
        };
        let t = Instant::now();
        let r = err_text(decode_chunk(Compression::Gzip, &member, &chunk, "f", false));
        assert!(t.elapsed() < Duration::from_secs(5));
        r
    });
    assert!(r.contains("cannot decompress"), "{r}");
}

#[test]
fn a_large_inner_offset_streams_through_a_small_window() {
    let r = bounded(
        "a_large_inner_offset_streams_through_a_small_window",
        || {
            // A member of zeros with the chunk at its very end, as far in as allowed.
            let skip = MAX_INNER_OFFSET;
            let mut data = vec![0u8; skip as usize];
            data.extend_from_slice(b"the chunk");
            let member = compress_member(Codec::Gzip { level: 6 }, &data).unwrap();
            drop(data);
            let chunk = Chunk {
                file_offset: 0,
                size: 9,
                blob_offset: 1,
                blob_end: 1 + member.len() as u64,
                inner_offset: skip,
                digest: Some(Sha256::digest(b"the chunk").into()),
            };
            let before = peak_rss();
            let got = decode_chunk(Compression::Gzip, &member, &chunk, "f", true).unwrap();
            assert_eq!(got, b"the chunk");
            let z = compress_member(Codec::Zstd { level: 3 }, &{
                let mut d = vec![0u8; skip as usize];
                d.extend_from_slice(b"the chunk");
                d
            })
            .unwrap();
            let before_z = peak_rss();
            let got = decode_chunk(Compression::Zstd, &z, &chunk, "f", true).unwrap();
            assert_eq!(got, b"the chunk");
            // Neither decoder held the 64 MiB before the chunk.
            format!(
                "{} {}",
                peak_rss().saturating_sub(before),
                peak_rss().saturating_sub(before_z)
            )
        },
    );
    let grew: Vec<u64> = r.split(' ').map(|n| n.parse().unwrap()).collect();
    assert!(grew.iter().all(|&g| g < 16 << 20), "peak grew by {grew:?}");
}

// 2. Footer and blob size: gaps and lies ------------------------------------------

#[test]
fn a_genuine_toc_behind_a_64_gib_gap_fetches_only_what_chunks_need() {
    let r = bounded(
        "a_genuine_toc_behind_a_64_gib_gap_fetches_only_what_chunks_need",
        || {
            let (blob, toc) = sample();
            let footer = Footer::detect(&blob[blob.len() - 51..], blob.len() as u64).unwrap();
            let head = blob[..footer.toc_offset() as usize].to_vec();
            let gap = 64u64 << 30;
            let toc_offset = head.len() as u64 + gap;
            let src = Sparse {
                tail: toc_tail(&toc, toc_offset),
                head,
                gap,
                largest_read: AtomicU64::new(0),
            };
            let r = open_trusted(&src).unwrap();
            for name in ["a.txt", "dir/big"] {
                let id = r.index.lookup(name).unwrap();
                r.read_file(&src, id).unwrap();
            }
            // Prefetch of prioritized files is bounded the same way.
            assert!(r.index.prefetch_end.is_none_or(|e| e < 1 << 20));
            src.largest_read.load(Ordering::SeqCst).to_string()
        },
    );
    let largest: u64 = r.parse().unwrap();
    assert!(largest < 2 << 20, "largest read {largest}");
}

#[test]
fn footers_pointing_anywhere_are_refused() {
    let (blob, toc) = sample();
    let footer = Footer::detect(&blob[blob.len() - 51..], blob.len() as u64).unwrap();
    let body = &blob[..footer.toc_offset() as usize];
    for toc_offset in [u64::MAX, 1 << 63, blob.len() as u64 * 2, 0] {
        let mut bad = body.to_vec();
        bad.extend(toc_tail(&toc, footer.toc_offset()));
        let n = bad.len();
        bad.truncate(n - 51);
        bad.extend(Footer::Estargz { toc_offset }.encode());
        let err = Reader::open(&bad, &OpenOptions::default()).unwrap_err();
        assert!(
            matches!(err, Error::BadFooter(_) | Error::BadToc { .. }),
            "{toc_offset}: {err}"
        );
    }
    // zstd:chunked footers whose sizes overflow or exceed the blob.
    for (off, csize, size) in [
        (1u64, u64::MAX, 10u64),
        (u64::MAX - 5, 10, 10),
        (1, 10, u64::MAX),
    ] {
        let mut bad = vec![0u8; 100];
        bad.extend(
            Footer::ZstdChunked {
                toc_offset: off,
                toc_compressed_size: csize,
                toc_size: size,
            }
            .encode(),
        );
        assert!(Reader::open(&bad, &OpenOptions::default()).is_err());
    }
}

#[test]
fn a_lying_blob_size_costs_no_memory() {
    let r = bounded("a_lying_blob_size_costs_no_memory", || {
        // The registry claims a terabyte; what it serves there is a footer whose TOC
        // offset is in range but whose TOC claims a huge JSON entry.
        let json_claim = 200u64 << 20;
        let mut member = synthetic_file_header("stargz.index.json", json_claim).to_vec();
        member.extend_from_slice(b"{\"version\":1,");
        let gz = compress_member(Codec::Gzip { level: 6 }, &member).unwrap();
        let head = vec![0u8; 16];
        let gap = 1u64 << 40;
        let toc_offset = head.len() as u64 + gap;
        let mut tail = gz;
        tail.extend(Footer::Estargz { toc_offset }.encode());
        let src = Sparse {
            head,
            gap,
            tail,
            largest_read: AtomicU64::new(0),
        };
        let e = err_text(Reader::open(&src, &OpenOptions::default()));
        format!(
            "{e} | largest read {}",
            src.largest_read.load(Ordering::SeqCst)
        )
    });
    assert!(r.contains("TOC"), "{r}");
}

// 3. Hardlinks --------------------------------------------------------------------

fn link_chain_toc(n: usize) -> (Vec<u8>, Toc) {
    let (blob, mut toc) = sample();
    // l00000 -> l00001 -> ... -> l{n-1} -> a.txt: sorted names resolve last-first.
    for i in 0..n {
        let mut l = TocEntry::new(format!("links/l{i:06}"), EntryType::Hardlink);
        l.link_name = if i + 1 == n {
            "a.txt".into()
        } else {
            format!("links/l{:06}", i + 1)
        };
        toc.entries.push(l);
    }
    (blob, toc)
}

#[test]
fn fifty_thousand_chained_hardlinks_resolve_in_linear_time() {
    let n = 50_000;
    let (blob, toc) = link_chain_toc(n);
    let payload_end = Footer::detect(&blob[blob.len() - 51..], blob.len() as u64)
        .unwrap()
        .toc_offset();
    let t = Instant::now();
    let ix = estargz::Index::build(&toc, payload_end).unwrap();
    let took = t.elapsed();
    let limit = if cfg!(debug_assertions) {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(2)
    };
    assert!(took < limit, "{n} links took {took:?}");
    let file = ix.lookup("a.txt").unwrap();
    for i in 0..n {
        assert_eq!(ix.lookup(&format!("links/l{i:06}")), Some(file), "link {i}");
    }
    assert_eq!(ix.node(file).nlink as usize, n + 1);
}

#[test]
fn hardlink_loops_self_links_and_links_to_dirs_are_refused() {
    let (blob, toc) = sample();
    let edit = |f: &dyn Fn(&mut Toc)| {
        let mut t = toc.clone();
        f(&mut t);
        err_text(Reader::open(&with_toc(&blob, &t), &OpenOptions::default()))
    };
    let link = |name: &str, to: &str| {
        let mut l = TocEntry::new(name, EntryType::Hardlink);
        l.link_name = to.into();
        l
    };
    let e = edit(&|t| t.entries.push(link("self", "self")));
    assert!(e.contains("self") && e.contains("loop"), "{e}");
    let e = edit(&|t| {
        t.entries
            .extend([link("a", "b"), link("b", "c"), link("c", "a")])
    });
    assert!(e.contains("loop"), "{e}");
    let e = edit(&|t| t.entries.push(link("d", "dir")));
    assert!(e.contains("directory"), "{e}");
    let e = edit(&|t| t.entries.push(link("up", "../a.txt")));
    assert!(e.contains(".."), "{e}");
    // A duplicate link name: the last one wins, its target is used.
    let mut t = toc.clone();
    t.entries.push(link("dup", "missing"));
    t.entries.push(link("dup", "a.txt"));
    let r = Reader::open(&with_toc(&blob, &t), &OpenOptions::default()).unwrap();
    assert_eq!(r.index.lookup("dup"), r.index.lookup("a.txt"));
}

// 4. Memory from small downloads --------------------------------------------------

#[test]
fn a_million_directories_exceed_the_toc_budget() {
    let r = bounded("a_million_directories_exceed_the_toc_budget", || {
        let mut json = b"{\"version\":1,\"entries\":[".to_vec();
        for i in 0..1_000_000u32 {
            if i > 0 {
                json.push(b',');
            }
            json.extend_from_slice(format!("{{\"name\":\"d{i}/\",\"type\":\"dir\"}}").as_bytes());
        }
        json.extend_from_slice(b"]}");
        let mut blob = vec![0u8; 10];
        blob.extend(toc_tail_json(&json, 10));
        drop(json);
        let size = blob.len();
        let t = Instant::now();
        let e = err_text(open_trusted(&blob));
        format!("{e} | blob {size} bytes | {:?}", t.elapsed())
    });
    assert!(
        r.contains("per-layer budget") && r.contains("entries"),
        "{r}"
    );
}

#[test]
fn deep_implicit_directories_exceed_the_index_budget() {
    let r = bounded("deep_implicit_directories_exceed_the_index_budget", || {
        // Each entry creates ~2000 implicit directories with ~2 KiB paths.
        let deep = "a/".repeat(2000);
        let mut toc = Toc {
            version: 1,
            entries: Vec::new(),
        };
        for i in 0..2000 {
            toc.entries
                .push(TocEntry::new(format!("p{i}/{deep}f"), EntryType::Dir));
        }
        let mut blob = vec![0u8; 10];
        blob.extend(toc_tail(&toc, 10));
        err_text(open_trusted(&blob))
    });
    assert!(r.contains("index memory"), "{r}");
}

#[test]
fn a_chunk_of_512_mib_of_zeros_is_refused() {
    let r = bounded("a_chunk_of_512_mib_of_zeros_is_refused", || {
        // 512 MiB of zeros compress to ~0.5 MB; the TOC claims one chunk for all of it.
        let zeros = vec![0u8; 1 << 20];
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(9));
        for _ in 0..512 {
            std::io::Write::write_all(&mut enc, &zeros).unwrap();
        }
        let member = enc.finish().unwrap();
        let mut blob = vec![0u8; 1];
        blob.extend(&member);
        let mut e = TocEntry::new("zeros", EntryType::Reg);
        e.size = 512 << 20;
        e.offset = 1;
        let toc = Toc {
            version: 1,
            entries: vec![e],
        };
        let at = blob.len() as u64;
        blob.extend(toc_tail(&toc, at));
        let e = err_text(open_trusted(&blob));
        format!("{e} | blob {} bytes", blob.len())
    });
    assert!(
        r.contains("chunk size") && r.contains(&MAX_CHUNK_SIZE.to_string()),
        "{r}"
    );
}

#[test]
fn a_chunk_that_decompresses_short_costs_what_it_holds() {
    let r = bounded(
        "a_chunk_that_decompresses_short_costs_what_it_holds",
        || {
            // A zstd chunk that claims the maximum size but holds a few bytes.
            let z = compress_member(Codec::Zstd { level: 3 }, b"short").unwrap();
            let chunk = Chunk {
                file_offset: 0,
                size: MAX_CHUNK_SIZE,
                blob_offset: 1,
                blob_end: 1 + z.len() as u64,
                inner_offset: 0,
                digest: None,
            };
            let before = peak_rss();
            let e = err_text(decode_chunk(Compression::Zstd, &z, &chunk, "f", false));
            format!("{e} | grew {}", peak_rss().saturating_sub(before))
        },
    );
    assert!(r.contains("cannot decompress"), "{r}");
    let grew: u64 = r.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(grew < 16 << 20, "{r}");
}

/// A 256 MiB file of zeros (4 MiB chunks) written to a temp blob for the streaming
/// checks; returns the blob path.
fn big_file_blob(dir: &std::path::Path) -> std::path::PathBuf {
    let tar_path = dir.join("big.tar");
    {
        let f = std::fs::File::create(&tar_path).unwrap();
        let mut b = tar::Builder::new(f);
        let mut h = tar::Header::new_gnu();
        let size = 256u64 << 20;
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "big", std::io::Read::take(std::io::repeat(0), size))
            .unwrap();
        b.finish().unwrap();
    }
    let blob_path = dir.join("big.blob");
    let out = std::fs::File::create(&blob_path).unwrap();
    let opts = BuildOptions {
        codec: Codec::Gzip { level: 1 },
        ..Default::default()
    };
    estargz::build_from_file(
        &std::fs::File::open(&tar_path).unwrap(),
        std::io::BufWriter::new(out),
        &opts,
    )
    .unwrap();
    std::fs::remove_file(&tar_path).unwrap();
    blob_path
}

#[test]
fn verify_and_extract_stream_large_files() {
    const BLOB_ENV: &str = "ESTARGZ_HOSTILE_BIG_BLOB";
    let dir = tempfile::tempdir().unwrap();
    let blob = match std::env::var(BLOB_ENV) {
        Ok(p) => std::path::PathBuf::from(p),
        Err(_) => {
            let p = big_file_blob(dir.path());
            // SAFETY: set before the child starts; no other thread reads it.
            unsafe { std::env::set_var(BLOB_ENV, &p) };
            p
        }
    };
    let r = bounded("verify_and_extract_stream_large_files", || {
        let src = estargz::FileBlob::open(&blob).unwrap();
        let before = peak_rss();
        let report = estargz::verify_blob(&src, None, None).unwrap();
        assert_eq!(report.regular_files, 1);
        let verify_grew = peak_rss().saturating_sub(before);
        let reader = Reader::open(&src, &OpenOptions::default()).unwrap();
        let dest = tempfile::tempdir().unwrap();
        let out = dest.path().join("x");
        estargz::extract(&reader, &src, &out, &Default::default()).unwrap();
        assert_eq!(
            std::fs::metadata(out.join("big")).unwrap().len(),
            256u64 << 20
        );
        format!("{verify_grew} {}", peak_rss().saturating_sub(before))
    });
    let grew: Vec<u64> = r.split(' ').map(|n| n.parse().unwrap()).collect();
    // A 256 MiB file, 4 MiB chunks: a few chunks' worth at most.
    assert!(grew.iter().all(|&g| g < 64 << 20), "peak grew by {grew:?}");
}

// Variants: absurd numbers, names and sums ---------------------------------------

#[test]
fn absurd_numbers_end_in_clear_errors() {
    let (blob, toc) = sample();
    let edit = |f: &dyn Fn(&mut TocEntry)| {
        let mut t = toc.clone();
        let e = t.entries.iter_mut().find(|e| e.name == "dir/big").unwrap();
        f(e);
        err_text(open_trusted(&with_toc(&blob, &t)))
    };
    let chunk_edit = |f: &dyn Fn(&mut TocEntry)| {
        let mut t = toc.clone();
        let e = t
            .entries
            .iter_mut()
            .find(|e| e.kind == EntryType::Chunk)
            .unwrap();
        f(e);
        err_text(open_trusted(&with_toc(&blob, &t)))
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "chunkSize max",
            edit(&|e| e.chunk_size = u64::MAX),
            "chunk size",
        ),
        (
            "chunkSize 2^63",
            edit(&|e| e.chunk_size = 1 << 63),
            "chunk size",
        ),
        ("size max", edit(&|e| e.size = u64::MAX), "dir/big"),
        ("offset max", edit(&|e| e.offset = u64::MAX), "outside"),
        ("uid max", edit(&|e| e.uid = u64::MAX), "uid"),
        (
            "devMajor max",
            edit(&|e| e.dev_major = u64::MAX),
            "devMajor",
        ),
        (
            "bad digest",
            edit(&|e| e.digest = "sha256:zz".into()),
            "dir/big",
        ),
        (
            "chunkOffset max",
            chunk_edit(&|e| e.chunk_offset = u64::MAX),
            "dir/big",
        ),
        (
            "chunkOffset+chunkSize overflow",
            chunk_edit(&|e| {
                e.chunk_offset = u64::MAX - 10;
                e.chunk_size = 100;
            }),
            "dir/big",
        ),
        (
            "chunk innerOffset",
            chunk_edit(&|e| e.inner_offset = MAX_INNER_OFFSET + 1),
            "inner offset",
        ),
        ("chunk offset 0", chunk_edit(&|e| e.offset = 0), "outside"),
        (
            "name ../",
            edit(&|e| e.name = "../../etc/shadow".into()),
            "..",
        ),
        (
            "name absolute",
            edit(&|e| e.name = "/etc/shadow".into()),
            "absolute",
        ),
        ("name NUL", edit(&|e| e.name = "a\0b".into()), "NUL"),
    ];
    for (what, got, want) in cases {
        assert!(got.contains(want), "{what}: {got}");
    }
}

#[test]
fn a_toc_offset_beyond_the_blob_or_a_toc_larger_than_claimed_is_refused() {
    let (blob, toc) = sample();
    let footer = Footer::detect(&blob[blob.len() - 51..], blob.len() as u64).unwrap();
    let mut bad = blob[..footer.toc_offset() as usize].to_vec();
    bad.extend(toc_tail(&toc, footer.toc_offset() + 1_000_000));
    let e = err_text(Reader::open(&bad, &OpenOptions::default()));
    assert!(e.contains("footer"), "{e}");
    // The TOC tar header claims more JSON than the member holds.
    let json = toc.to_json().unwrap();
    let mut member = synthetic_file_header("stargz.index.json", 100 << 20).to_vec();
    member.extend_from_slice(&json);
    let mut bad = blob[..footer.toc_offset() as usize].to_vec();
    bad.extend(compress_member(Codec::Gzip { level: 6 }, &member).unwrap());
    bad.extend(
        Footer::Estargz {
            toc_offset: footer.toc_offset(),
        }
        .encode(),
    );
    let e = err_text(Reader::open(&bad, &OpenOptions::default()));
    assert!(e.contains("TOC"), "{e}");
}
