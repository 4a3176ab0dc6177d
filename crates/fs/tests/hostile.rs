//! Hostile layers served by a real registry and mounted through FUSE next to a good
//! one in the same process: a layer whose TOC (digest valid: the attacker wrote it)
//! holds an innerOffset bomb refuses to mount; a layer whose chunk does not match its
//! chunkDigest answers EIO for that file only; the good layer keeps serving.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use std::sync::Arc;

use common::*;
use fs::{Config, LayerDesc, RegistryFetcher};
use sha2::{Digest as _, Sha256};

/// CRC-32 (IEEE), for the hand-made gzip member.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A gzip member holding `data` in stored deflate blocks.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let mut pieces = data.chunks(65_535).peekable();
    if pieces.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(p) = pieces.next() {
        out.push(u8::from(pieces.peek().is_none()));
        let len = p.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(p);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// The blob at `path` with its TOC edited by `edit`; returns the blob and the new
/// TOC's digest (what a hostile image's descriptor would carry).
fn retoc(path: &std::path::Path, edit: impl FnOnce(&mut estargz::Toc)) -> (Vec<u8>, String) {
    let blob = std::fs::read(path).expect("blob");
    let (reader, mut toc) =
        estargz::Reader::open_with_toc(&blob, &estargz::OpenOptions::default()).expect("open");
    edit(&mut toc);
    let json = toc.to_json().expect("json");
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&json)));
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(json.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "stargz.index.json", &json[..])
        .expect("tar");
    let member = tar.into_inner().expect("tar");
    let toc_offset = reader.footer.toc_offset();
    let mut out = blob[..toc_offset as usize].to_vec();
    out.extend(gzip_stored(&member));
    out.extend(estargz::Footer::Estargz { toc_offset }.encode());
    (out, digest)
}

struct Env {
    rt: tokio::runtime::Runtime,
    reg: testenv::Registry,
    client: registry::Client,
    cache_dir: tempfile::TempDir,
}

impl Env {
    /// Pushes `bytes` and returns a fetcher and descriptor for it.
    fn layer(
        &self,
        repo: &str,
        bytes: &[u8],
        toc_digest: &str,
    ) -> (Arc<RegistryFetcher>, LayerDesc) {
        let digest = self
            .rt
            .block_on(testenv::push_blob(&self.reg.base_url(), repo, bytes));
        let reference = registry::Reference::parse(&format!("{}/{repo}:latest", self.reg.host()))
            .expect("reference");
        let reader = self.client.blob_reader(
            &reference,
            registry::Digest::parse(&digest).expect("digest"),
            Some(bytes.len() as u64),
        );
        let fetcher = Arc::new(RegistryFetcher::with_size(
            reader,
            self.rt.handle().clone(),
            bytes.len() as u64,
        ));
        let desc = LayerDesc {
            digest,
            size: bytes.len() as u64,
            toc_digest: Some(toc_digest.to_string()),
            toc_tail: None,
        };
        (fetcher, desc)
    }

    fn mount(
        &self,
        fetcher: Arc<RegistryFetcher>,
        desc: LayerDesc,
        at: &std::path::Path,
    ) -> fs::Result<fs::MountHandle> {
        let cfg = Config::default();
        let cache = fs::ChunkCache::from_config(&cfg, self.cache_dir.path(), None).expect("cache");
        let layer = Arc::new(fs::Layer::open(fetcher, desc, &cfg, cache)?);
        let pool = fs::FetchPool::shared()?;
        let opts = fs::MountOptions {
            cfg: &cfg,
            metrics: None,
            pool: &pool,
        };
        fs::mount(layer, at, &opts)
    }
}

#[test]
fn hostile_layers_fail_alone_while_a_good_layer_keeps_serving() {
    if !fuse_ready("hostile_layers_fail_alone_while_a_good_layer_keeps_serving") {
        return;
    }
    init_tracing();
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let env = Env {
        rt: tokio::runtime::Runtime::new().expect("runtime"),
        reg,
        client: registry::Client::new(
            registry::RegistryConfig::default(),
            Arc::new(registry::Anonymous),
        )
        .expect("client"),
        cache_dir: tempfile::tempdir().expect("tempdir"),
    };
    let entries = vec![
        Entry::new("data", Kind::Dir),
        Entry::new("data/f1", Kind::Reg(pseudo_random(200_000, 1))),
        Entry::new("data/f2", Kind::Reg(pseudo_random(150_000, 2))),
        Entry::new("data/f3", Kind::Reg(b"small and fine".to_vec())),
    ];
    let blob = make_blob(&entries, 64 << 10, &[]);
    let want = |i: usize| match &entries[i].kind {
        Kind::Reg(d) => d.clone(),
        _ => unreachable!(),
    };

    // The good layer.
    let good_bytes = std::fs::read(&blob.path).expect("blob");
    let good_toc = blob.desc.toc_digest.clone().expect("toc digest");
    let (f, d) = env.layer("hostile/good", &good_bytes, &good_toc);
    let good_mnt = tempfile::tempdir().expect("tempdir");
    let _g1 = MountGuard(good_mnt.path().to_path_buf());
    let good = env.mount(f, d, good_mnt.path()).expect("good layer mounts");
    assert_eq!(
        std::fs::read(good_mnt.path().join("data/f1")).expect("read"),
        want(1)
    );

    // An innerOffset bomb: refused when mounting, with the reason.
    let (bomb, bomb_toc) = retoc(&blob.path, |t| {
        for e in t.entries.iter_mut().filter(|e| e.name == "data/f1") {
            e.inner_offset = 1 << 36;
        }
    });
    let (f, d) = env.layer("hostile/bomb", &bomb, &bomb_toc);
    let bomb_mnt = tempfile::tempdir().expect("tempdir");
    let _g2 = MountGuard(bomb_mnt.path().to_path_buf());
    let err = env
        .mount(f, d, bomb_mnt.path())
        .err()
        .expect("a bomb layer must not mount");
    assert!(err.to_string().contains("inner offset"), "{err}");

    // A chunk that does not match its chunkDigest: EIO for that file only.
    let (bad, bad_toc) = retoc(&blob.path, |t| {
        let e = t
            .entries
            .iter_mut()
            .find(|e| e.name == "data/f2")
            .expect("f2");
        e.chunk_digest = format!("sha256:{}", hex::encode(Sha256::digest(b"other bytes")));
    });
    let (f, d) = env.layer("hostile/bad", &bad, &bad_toc);
    let bad_mnt = tempfile::tempdir().expect("tempdir");
    let _g3 = MountGuard(bad_mnt.path().to_path_buf());
    let bad_handle = env
        .mount(f, d, bad_mnt.path())
        .expect("the TOC itself is fine");
    let err = std::fs::read(bad_mnt.path().join("data/f2")).expect_err("corrupt chunk");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(
        std::fs::read(bad_mnt.path().join("data/f3")).expect("other files still read"),
        want(3)
    );

    // The good layer, in the same process, is unaffected.
    for (i, e) in entries.iter().enumerate().skip(1) {
        assert_eq!(
            std::fs::read(good_mnt.path().join(&e.path)).expect("good read"),
            want(i)
        );
    }
    good.check().expect("good layer alive");
    bad_handle.check().expect("bad layer's mount alive");
    bad_handle.unmount().expect("unmount");
    good.unmount().expect("unmount");
}
