//! Metadata benchmark helper (run by bench/fs/metadata.sh as root; needs `/dev/fuse`).
//! See docs/benchmarks/fs.md, "Metadata".
//!
//! Subcommands:
//! - `prepare WORK` writes `WORK/tree.tar`, a synthetic tree shaped like a compiler
//!   image (headers in nested include directories, shared objects with version
//!   symlinks, documentation, manual pages, binaries; about 9,400 entries), and
//!   `WORK/layer.blob`, its eStargz form, with `WORK/layer.json` (its descriptor).
//! - `serve WORK MNT ATTR_SEC ENTRY_SEC STOP` mounts `layer.blob` at MNT with those
//!   FUSE timeouts, waits until every chunk is local, prints `ready`, and unmounts
//!   once the file STOP exists.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark code: a panic is a failed run"
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fs::{ChunkCache, Config, FetchPool, FileFetcher, Layer, LayerDesc};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("prepare") if args.len() == 2 => prepare(Path::new(&args[1])),
        Some("serve") if args.len() == 6 => match (args[3].parse(), args[4].parse()) {
            (Ok(attr), Ok(entry)) => serve(
                Path::new(&args[1]),
                Path::new(&args[2]),
                attr,
                entry,
                Path::new(&args[5]),
            ),
            _ => Err("timeouts are whole seconds".into()),
        },
        _ => Err("usage: bench_meta prepare WORK | serve WORK MNT ATTR_SEC ENTRY_SEC STOP".into()),
    };
    if let Err(e) = res {
        eprintln!("bench_meta: {e}");
        std::process::exit(1);
    }
}

/// A small deterministic generator, so every run builds the same tree.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

enum Node {
    Dir,
    File { size: u64, mode: u32 },
    Link(String),
}

/// The tree as (path, node), parents before children.
fn tree() -> Vec<(String, Node)> {
    let mut r = Rng(0x5eed);
    let mut out: Vec<(String, Node)> = Vec::new();
    let dir = |out: &mut Vec<(String, Node)>, p: &str| out.push((p.to_string(), Node::Dir));
    let file = |out: &mut Vec<(String, Node)>, r: &mut Rng, p: String, max: u64, mode: u32| {
        let size = 64 + r.below(max);
        out.push((p, Node::File { size, mode }));
    };
    for d in [
        "etc",
        "usr",
        "usr/bin",
        "usr/include",
        "usr/lib",
        "usr/lib/gcc",
        "usr/lib/gcc/x86_64-linux-gnu",
        "usr/lib/gcc/x86_64-linux-gnu/12",
        "usr/lib/gcc/x86_64-linux-gnu/12/include",
        "usr/lib/gcc/x86_64-linux-gnu/12/plugin",
        "usr/lib/gcc/x86_64-linux-gnu/12/plugin/include",
        "usr/lib/x86_64-linux-gnu",
        "usr/libexec",
        "usr/share",
        "usr/share/doc",
        "usr/share/man",
        "usr/include/c++",
        "usr/include/c++/12",
    ] {
        dir(&mut out, d);
    }
    // /etc: a few dozen small configuration files in subdirectories.
    for d in 0..25 {
        let p = format!("etc/conf{d}.d");
        dir(&mut out, &p);
        for f in 0..6 {
            file(
                &mut out,
                &mut r,
                format!("{p}/{f:02}-setting"),
                2_000,
                0o644,
            );
        }
    }
    // /usr/include: ~2,700 headers, some nested two levels down.
    for d in 0..70 {
        let p = format!("usr/include/pkg{d}");
        dir(&mut out, &p);
        for f in 0..34 {
            file(&mut out, &mut r, format!("{p}/header{f}.h"), 16_000, 0o644);
        }
        if d % 3 == 0 {
            for s in 0..3 {
                let q = format!("{p}/sub{s}");
                dir(&mut out, &q);
                for f in 0..9 {
                    file(&mut out, &mut r, format!("{q}/part{f}.h"), 8_000, 0o644);
                }
            }
        }
    }
    // libstdc++ headers: files without extensions in a few deep directories.
    for d in [
        "bits",
        "ext",
        "tr1",
        "debug",
        "parallel",
        "pstl",
        "experimental",
    ] {
        let p = format!("usr/include/c++/12/{d}");
        dir(&mut out, &p);
        for f in 0..110 {
            file(&mut out, &mut r, format!("{p}/hdr_{f}"), 40_000, 0o644);
        }
    }
    // gcc's own headers and the plugin headers (~1,300 in ~40 directories).
    for f in 0..120 {
        file(
            &mut out,
            &mut r,
            format!("usr/lib/gcc/x86_64-linux-gnu/12/include/intrin{f}.h"),
            60_000,
            0o644,
        );
    }
    for d in 0..40 {
        let p = format!("usr/lib/gcc/x86_64-linux-gnu/12/plugin/include/m{d}");
        dir(&mut out, &p);
        for f in 0..30 {
            file(&mut out, &mut r, format!("{p}/tree-{f}.h"), 12_000, 0o644);
        }
    }
    for f in ["cc1", "cc1plus", "collect2", "lto1", "lto-wrapper"] {
        file(
            &mut out,
            &mut r,
            format!("usr/lib/gcc/x86_64-linux-gnu/12/{f}"),
            2_000_000,
            0o755,
        );
    }
    // Shared objects, each with its soname symlink.
    for l in 0..380 {
        let real = format!("libpkg{l}.so.{}.{}.0", 1 + l % 5, l % 11);
        file(
            &mut out,
            &mut r,
            format!("usr/lib/x86_64-linux-gnu/{real}"),
            300_000,
            0o644,
        );
        out.push((
            format!("usr/lib/x86_64-linux-gnu/libpkg{l}.so.{}", 1 + l % 5),
            Node::Link(real),
        ));
    }
    // Documentation: one directory per package.
    for d in 0..420 {
        let p = format!("usr/share/doc/package{d}");
        dir(&mut out, &p);
        file(&mut out, &mut r, format!("{p}/copyright"), 6_000, 0o644);
        file(
            &mut out,
            &mut r,
            format!("{p}/changelog.Debian.gz"),
            4_000,
            0o644,
        );
        if d % 2 == 0 {
            file(&mut out, &mut r, format!("{p}/README"), 3_000, 0o644);
        }
    }
    for s in ["man1", "man3", "man5", "man7", "man8"] {
        let p = format!("usr/share/man/{s}");
        dir(&mut out, &p);
        for f in 0..230 {
            file(
                &mut out,
                &mut r,
                format!("{p}/page{f}.{}.gz", &s[3..]),
                5_000,
                0o644,
            );
        }
    }
    // Binaries and their alternatives symlinks.
    for b in 0..330 {
        file(&mut out, &mut r, format!("usr/bin/tool{b}"), 120_000, 0o755);
        if b % 3 == 0 {
            out.push((format!("usr/bin/alias{b}"), Node::Link(format!("tool{b}"))));
        }
    }
    for b in 0..40 {
        file(
            &mut out,
            &mut r,
            format!("usr/libexec/helper{b}"),
            50_000,
            0o755,
        );
    }
    out
}

/// Compressible bytes that look a little like source text.
fn content(size: u64, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    let words: [&[u8]; 8] = [
        b"static ",
        b"inline ",
        b"int ",
        b"struct ",
        b"return ",
        b"#define ",
        b"__attribute__ ",
        b";\n",
    ];
    let mut v = Vec::with_capacity(size as usize);
    while (v.len() as u64) < size {
        v.extend_from_slice(words[r.below(8) as usize]);
        v.extend_from_slice(format!("x{}", r.below(1000)).as_bytes());
    }
    v.truncate(size as usize);
    v
}

fn prepare(work: &Path) -> Res<()> {
    std::fs::create_dir_all(work)?;
    let t = Instant::now();
    let nodes = tree();
    let tar_path = work.join("tree.tar");
    {
        let f = std::io::BufWriter::new(std::fs::File::create(&tar_path)?);
        let mut b = tar::Builder::new(f);
        let mtime = 1_700_000_000;
        for (i, (path, node)) in nodes.iter().enumerate() {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(mtime);
            h.set_uid(0);
            h.set_gid(0);
            match node {
                Node::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{path}/"), std::io::empty())?;
                }
                Node::File { size, mode } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(*size);
                    b.append_data(&mut h, path, content(*size, i as u64).as_slice())?;
                }
                Node::Link(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, path, target)?;
                }
            }
        }
        b.into_inner()?.flush()?;
    }
    let tar = std::fs::File::open(&tar_path)?;
    let out = estargz::build_from_file(
        &tar,
        std::io::BufWriter::new(std::fs::File::create(work.join("layer.blob"))?),
        &estargz::BuildOptions::default(),
    )?;
    let v = serde_json::json!({
        "digest": out.blob_digest,
        "size": out.blob_size,
        "toc_digest": out.toc_digest,
    });
    std::fs::write(work.join("layer.json"), serde_json::to_vec(&v)?)?;
    println!(
        "tree: {} entries (+ root), tar {:.1} MiB, blob {:.1} MiB, built in {:.1} s",
        nodes.len(),
        std::fs::metadata(&tar_path)?.len() as f64 / 1048576.0,
        out.blob_size as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn serve(work: &Path, mnt: &Path, attr: u64, entry: u64, stop: &Path) -> Res<()> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(work.join("layer.json"))?)?;
    let desc = LayerDesc {
        digest: v["digest"].as_str().ok_or("digest")?.to_string(),
        size: v["size"].as_u64().ok_or("size")?,
        toc_digest: v["toc_digest"].as_str().map(str::to_string),
        toc_tail: None,
    };
    let mut cfg = Config::default();
    cfg.fuse.attr_timeout = i64::try_from(attr)?;
    cfg.fuse.entry_timeout = i64::try_from(entry)?;
    cfg.background_fetch_quiet_msec = 0;
    std::fs::create_dir_all(mnt)?;
    let cache_dir: PathBuf = tempfile::tempdir_in(work)?.keep();
    let cache = ChunkCache::from_config(&cfg, &cache_dir, None)?;
    let layer = Layer::open(
        Arc::new(FileFetcher::open(work.join("layer.blob"))?),
        desc,
        &cfg,
        cache,
    )?;
    let pool = FetchPool::shared()?;
    let opts = fs::MountOptions {
        cfg: &cfg,
        metrics: None,
        pool: &pool,
    };
    let handle = fs::mount(Arc::new(layer), mnt, &opts)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !handle.layer().is_complete() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("ready");
    std::io::stdout().flush()?;
    while !stop.exists() {
        std::thread::sleep(Duration::from_millis(100));
    }
    handle.unmount()?;
    std::fs::remove_dir_all(&cache_dir)?;
    Ok(())
}
