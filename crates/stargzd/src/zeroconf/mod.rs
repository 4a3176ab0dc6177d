//! Zero-config prefetch: for an image whose layers carry no prioritized files (no
//! prefetch landmark in any of them), the files its container opens at start are
//! worked out from the image itself and fetched before the container runs.
//!
//! Once the layers of an image are open (see `preopen`), the image config is fetched
//! (bounded, digest verified) and its Entrypoint + Cmd resolved through the merged
//! view of the layers ([`view`]); then in rounds, each fetching the files known so far
//! in one batch per layer ([`fs::Layer::prefetch_files`], the layers in parallel), what
//! arrived is parsed for the next round's files ([`plan`]): a script's interpreter, an
//! ELF's loader and `DT_NEEDED` libraries found as glibc's loader finds them
//! ([`ldcache`], [`elf`]), the runtime files of [`runtime`], the headers of a C
//! compile ([`cinclude`]). Images with a recorded
//! list (an optimized image's landmark) are left to it. All of it runs on a blocking
//! thread after the Prepare that opened the layers: no mount waits for it.

mod cinclude;
mod elf;
mod goimport;
mod image_config;
mod ldcache;
mod named;
mod plan;
mod runtime;
mod shell;
mod view;

use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use estargz::NodeId;
use registry::Reference;
use remote_layer::MountError;
use tracing::{debug, info, warn};

use plan::{Files, Plan};
use view::{Found, MergedView};

/// Most batches of fetches (program, libraries, their libraries, ...), each one
/// request per layer.
pub const MAX_ROUNDS: usize = 64;
/// How often the files of running batches are looked at for what has arrived.
const POLL: Duration = Duration::from_millis(10);
/// How long an image is remembered as done, so the Prepares of its other layers and
/// its next containers do not work it out again.
const DONE_TTL: Duration = Duration::from_secs(600);
/// Most images remembered.
const MAX_DONE: usize = 1024;

/// Which images were taken care of; one per daemon.
#[derive(Default)]
pub struct ZeroConfig {
    done: Mutex<HashMap<String, Instant>>,
}

/// What one image's run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Files fetched (or found cached) in all rounds.
    pub files: usize,
    /// Compressed blob bytes fetched.
    pub bytes: u64,
    pub rounds: usize,
    /// Files left out by the byte bound.
    pub skipped: usize,
}

impl ZeroConfig {
    /// Starts the prefetch of `image` unless it is turned off, done lately, or its
    /// config is too large. `layers` are the image's eStargz layers being opened,
    /// bottom first; `learned_instead` settles whether a learned-prefetch record will
    /// fetch the image's start-up files instead (then nothing is done here). Returns at
    /// once.
    #[allow(
        clippy::too_many_arguments,
        reason = "one call site passing what preopen has"
    )]
    pub fn start<F>(
        &self,
        cfg: &fs::Config,
        client: &registry::Client,
        reference: &Reference,
        config: &registry::Descriptor,
        layers: Vec<F>,
        learned_instead: futures::future::BoxFuture<'static, bool>,
        metrics: &fs::FsMetrics,
    ) where
        F: Future<Output = Result<Arc<fs::Layer>, MountError>> + Send + 'static,
    {
        if !cfg.zero_config_prefetch || cfg.noprefetch || layers.is_empty() {
            return;
        }
        if config.size > image_config::MAX_CONFIG_BYTES {
            debug!(image = %reference, size = config.size, "image config too large for zero-config prefetch");
            return;
        }
        {
            let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            done.retain(|_, t| now.duration_since(*t) < DONE_TTL);
            let key = config.digest.to_string();
            if done.contains_key(&key) || done.len() >= MAX_DONE {
                return;
            }
            done.insert(key, now);
        }
        let max_bytes = cfg.zero_config_prefetch_max_mib.saturating_mul(1 << 20);
        let (client, reference, config) = (client.clone(), reference.clone(), config.clone());
        let metrics = metrics.clone();
        let handle = tokio::runtime::Handle::current();
        // The registry client's futures are not Send, and the work is blocking: its own
        // thread, detached.
        drop(tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let (config_bytes, opened) = handle.block_on(async {
                let reader =
                    client.blob_reader(&reference, config.digest.clone(), Some(config.size));
                futures::join!(reader.read_all(), futures::future::join_all(layers))
            });
            let layers: Vec<Arc<fs::Layer>> = opened.into_iter().filter_map(Result::ok).collect();
            // Settled by now: the record look-up runs beside the layers' opening.
            if handle.block_on(learned_instead) {
                debug!(image = %reference, "learned-prefetch record found; no zero-config prefetch");
                return;
            }
            if layers.iter().any(|l| l.index().prefetch_end.is_some()) {
                debug!(image = %reference, "image has prioritized files; no zero-config prefetch");
                return;
            }
            let process = match config_bytes {
                Ok(b) => image_config::parse(&b),
                Err(e) => {
                    warn!(image = %reference, error = %e, "image config not fetched; no zero-config prefetch");
                    return;
                }
            };
            let Some(process) = process.filter(|p| !p.argv.is_empty()) else {
                debug!(image = %reference, "image config names no process");
                return;
            };
            let s = run(&layers, process, max_bytes);
            metrics.zero_config_prefetched(s.files as u64, s.bytes);
            info!(image = %reference, files = s.files, bytes = s.bytes, rounds = s.rounds,
                skipped = s.skipped, elapsed_ms = started.elapsed().as_millis() as u64,
                "zero-config prefetch: start-up files fetched");
        }));
    }
}

/// Works out and fetches the start-up files of `process` in `layers` (bottom first),
/// at most `max_bytes` of compressed blob data.
///
/// Fetching and parsing overlap: each batch (one request per layer) runs on a thread
/// of its own, and every [`POLL`] the files that are in by then are parsed and what
/// they name goes out as the next batch, so a program's libraries are on the link
/// while the rest of its batch still arrives.
pub fn run(layers: &[Arc<fs::Layer>], process: image_config::Process, max_bytes: u64) -> Summary {
    let view = MergedView::new(layers.iter().map(|l| l.index()).collect());
    let mut plan = Plan::new(&view, process);
    let files = LayerFiles { layers };
    let mut budget = max_bytes;
    let mut summary = Summary::default();
    let (done_tx, done_rx) =
        std::sync::mpsc::channel::<(String, Result<fs::FilesPrefetched, String>)>();
    std::thread::scope(|s| {
        let mut running = 0usize;
        loop {
            let round = plan.take_round();
            if !round.is_empty() && summary.rounds < MAX_ROUNDS {
                summary.rounds += 1;
                let mut batches: Vec<Vec<fs::PlannedFile>> = vec![Vec::new(); layers.len()];
                let mut bounds = vec![0u64; layers.len()];
                for f in round {
                    let (Some(layer), Some(b), Some(bound)) = (
                        layers.get(f.layer),
                        batches.get_mut(f.layer),
                        bounds.get_mut(f.layer),
                    ) else {
                        continue;
                    };
                    let planned = (f.node, plan.ranges(f).map(<[_]>::to_vec));
                    let cost = layer.planned_bytes(std::slice::from_ref(&planned));
                    if cost > budget {
                        summary.skipped += 1;
                        continue;
                    }
                    budget -= cost;
                    b.push(planned);
                    *bound += cost;
                }
                for ((layer, batch), bound) in layers.iter().zip(batches).zip(bounds) {
                    if batch.is_empty() {
                        continue;
                    }
                    let tx = done_tx.clone();
                    running += 1;
                    s.spawn(move || {
                        // A batch that panicked still reports, or the loop would
                        // wait for it for ever.
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            layer.prefetch_file_ranges(&batch, bound)
                        }))
                        .map_err(|_| "panicked".to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                        // The receiver outlives every sender thread (same scope).
                        let _ = tx.send((layer.desc().digest.clone(), r));
                    });
                }
            }
            if running == 0 {
                // Everything asked for is in (or failed): parse what is left; done when
                // that names nothing new.
                plan.advance(&files);
                if plan.settled() || summary.rounds >= MAX_ROUNDS {
                    break;
                }
                continue;
            }
            let mut finished = match done_rx.recv_timeout(POLL) {
                Ok(d) => vec![d],
                Err(_) => Vec::new(),
            };
            finished.extend(done_rx.try_iter());
            for (layer, result) in finished {
                running -= 1;
                match result {
                    Ok(done) => {
                        summary.files += done.files;
                        summary.bytes += done.bytes_fetched;
                        summary.skipped += done.skipped;
                    }
                    Err(e) => {
                        warn!(layer = %layer, error = %e, "zero-config prefetch of a layer failed")
                    }
                }
            }
            plan.advance_ready(&files);
        }
    });
    let paths: Vec<&str> = plan
        .wanted()
        .iter()
        .take(64)
        .filter_map(|f| Some(view.node(*f)?.path.as_str()))
        .collect();
    debug!(files = ?paths, "zero-config prefetch: files found");
    summary
}

/// The files of opened layers, read only from what is cached: parsing never fetches.
struct LayerFiles<'a> {
    layers: &'a [Arc<fs::Layer>],
}

impl Files for LayerFiles<'_> {
    fn head(&self, f: Found, len: u32) -> Option<Vec<u8>> {
        self.layers.get(f.layer)?.read_cached(f.node, 0, len)
    }

    fn whole(&self, f: Found, max: u64) -> Option<Vec<u8>> {
        let layer = self.layers.get(f.layer)?;
        let size = layer.index().get(f.node)?.size;
        if size > max {
            return None;
        }
        layer.read_cached(f.node, 0, u32::try_from(size).ok()?)
    }

    fn ready(&self, f: Found, ranges: Option<&[Range<u64>]>) -> bool {
        self.layers
            .get(f.layer)
            .is_some_and(|l| l.file_cached(f.node, ranges))
    }

    fn load_ranges(&self, f: Found) -> Option<Vec<Range<u64>>> {
        let layer = self.layers.get(f.layer)?;
        let size = layer.index().get(f.node)?.size;
        let file = LayerFile {
            layer,
            id: f.node,
            pos: 0,
            size,
        };
        elf::load_ranges(file, size)
    }

    fn elf(&self, f: Found) -> Option<elf::ElfDeps> {
        let layer = self.layers.get(f.layer)?;
        let size = layer.index().get(f.node)?.size;
        elf::parse(LayerFile {
            layer,
            id: f.node,
            pos: 0,
            size,
        })
    }
}

/// One cached file of a layer as a seekable reader.
struct LayerFile<'a> {
    layer: &'a fs::Layer,
    id: NodeId,
    pos: u64,
    size: u64,
}

/// Most bytes one read of a [`LayerFile`] asks the layer for.
const READ_PIECE: u64 = 1 << 20;

impl Read for LayerFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - self.pos).min(READ_PIECE) as u32;
        let data = self
            .layer
            .read_cached(self.id, self.pos, n)
            .ok_or_else(|| std::io::Error::other("file not fetched"))?;
        let k = data.len().min(buf.len());
        buf[..k].copy_from_slice(&data[..k]);
        self.pos += k as u64;
        Ok(k)
    }
}

impl Seek for LayerFile<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| std::io::Error::other("seek out of range"))?;
        Ok(self.pos)
    }
}
