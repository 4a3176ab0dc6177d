//! Full pulls of layers that cannot be mounted lazily (`full_pull = true`): the daemon
//! downloads such a blob itself with ranged GETs over a few connections, checks its
//! digest as the bytes arrive, and unpacks it (gzip, zstd or plain tar) into a staging
//! directory while it downloads. At the first Prepare of an image, every plain layer
//! it lists starts at once; each layer's Prepare then moves its finished staging
//! directory into the snapshot's directory. Any failure leaves nothing behind and the
//! Prepare falls back to containerd's own pull.

mod unpack;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;
use registry::{Descriptor, Digest, Reference};
use remote_layer::{annotation, MountError, RemoteLayer};
use sha2::Digest as _;
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn};

pub use unpack::{Limits, UnpackError};

/// Bytes of one ranged GET.
const CHUNK: u64 = 8 << 20;
/// Ranged GETs in flight for one layer.
const RANGES_PER_LAYER: usize = 4;
/// Ranged GETs in flight for all full pulls together.
const RANGES_TOTAL: usize = 8;
/// Layers downloaded and unpacked at once.
const LAYERS_AT_ONCE: usize = 4;
/// Chunks downloaded ahead of the unpacker, per layer.
const QUEUED_CHUNKS: usize = 2;
/// Largest blob fully pulled.
const MAX_BLOB: u64 = 64 << 30;
/// How long a Prepare waits for its layer's full pull.
const WAIT: Duration = Duration::from_secs(30 * 60);
/// How long a layer pulled ahead waits for its Prepare before it is dropped.
const UNCLAIMED_TTL: Duration = Duration::from_secs(10 * 60);
/// How long one manifest lookup serves the Prepares of the same image.
const MANIFEST_TTL: Duration = Duration::from_secs(60);

/// A layer unpacked into `dir/root`; the whole `dir` goes when this is dropped, so a
/// pull nobody claims (or one that failed half-way) leaves nothing behind.
struct Staged {
    dir: PathBuf,
}

impl Staged {
    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(path = %self.dir.display(), error = %e, "removing a staging directory failed")
            }
        }
    }
}

type Pull = Shared<BoxFuture<'static, Result<Arc<Staged>, MountError>>>;
type Resolving = Shared<BoxFuture<'static, Result<Arc<Vec<Descriptor>>, MountError>>>;

/// Which layers a Prepare could mount lazily, as the filesystem's settings decide.
#[derive(Clone, Copy, Debug)]
pub struct Verification {
    /// `disable_verification`: layers without a TOC digest are served anyway.
    pub disabled: bool,
    /// `allow_no_verification`: so are those whose Prepare says `skipverify`.
    pub allow_none: bool,
}

impl Verification {
    /// Whether a layer without a TOC digest would be refused lazily.
    pub fn refuses_without_toc(&self, layer: &RemoteLayer) -> bool {
        !(self.disabled || (self.allow_none && layer.skip_verify))
    }
}

/// The full pulls of the daemon.
pub struct FullPull {
    client: registry::Client,
    staging: PathBuf,
    verification: Verification,
    layers: Arc<Semaphore>,
    ranges: Arc<Semaphore>,
    pulls: Mutex<HashMap<String, (Instant, Pull)>>,
    manifests: Mutex<HashMap<String, (Instant, Resolving)>>,
    /// Images whose layers were started ahead, and when: once per image, or the
    /// layers already claimed would be pulled again by each later Prepare.
    ahead: Mutex<HashMap<String, Instant>>,
    /// Blobs a Prepare has claimed (or is pulling itself), and when: never started
    /// ahead again while the image's Prepares go on.
    claimed: Mutex<HashMap<String, Instant>>,
    seq: AtomicU64,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn failed(e: impl std::fmt::Display) -> MountError {
    MountError::FullPull(e.to_string())
}

/// Whether a manifest entry is a layer this module can unpack.
fn unpackable(media_type: &str) -> bool {
    [
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ]
    .contains(&media_type)
}

impl FullPull {
    /// Full pulls staged under `staging` (emptied first: what a previous process left
    /// there is never claimed).
    pub fn new(
        client: registry::Client,
        staging: &Path,
        verification: Verification,
    ) -> std::io::Result<FullPull> {
        match std::fs::remove_dir_all(staging) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir_all(staging)?;
        Ok(FullPull {
            client,
            staging: staging.to_path_buf(),
            verification,
            layers: Arc::new(Semaphore::new(LAYERS_AT_ONCE)),
            ranges: Arc::new(Semaphore::new(RANGES_TOTAL)),
            pulls: Mutex::default(),
            manifests: Mutex::default(),
            ahead: Mutex::default(),
            claimed: Mutex::default(),
            seq: AtomicU64::new(0),
        })
    }

    /// The filesystem's verification settings.
    pub fn verification(&self) -> Verification {
        self.verification
    }

    fn expire(&self) {
        let now = Instant::now();
        locked(&self.pulls).retain(|_, (t, _)| now.duration_since(*t) < UNCLAIMED_TTL);
        locked(&self.manifests).retain(|_, (t, _)| now.duration_since(*t) < MANIFEST_TTL);
        locked(&self.ahead).retain(|_, t| now.duration_since(*t) < UNCLAIMED_TTL);
        locked(&self.claimed).retain(|_, t| now.duration_since(*t) < UNCLAIMED_TTL);
    }

    /// Starts the full pulls of the image's layers that `layer`'s labels list and that
    /// cannot be mounted lazily (no TOC digest annotation), in the background.
    pub fn ahead(self: &Arc<Self>, layer: &RemoteLayer) {
        self.expire();
        let Ok(reference) = Reference::parse(&layer.image_ref) else {
            return;
        };
        if !self.verification.refuses_without_toc(layer) {
            // Layers without a TOC digest may be mounted lazily: only their Prepare tells.
            return;
        }
        if locked(&self.ahead)
            .insert(layer.image_ref.clone(), Instant::now())
            .is_some()
        {
            return;
        }
        let (this, layer) = (self.clone(), layer.clone());
        tokio::spawn(async move {
            let descs = match this.manifest(&layer.image_ref, &reference).await {
                Ok(d) => d,
                Err(e) => {
                    debug!(image = %layer.image_ref, error = %e, "no manifest; no layers pulled ahead");
                    return;
                }
            };
            for d in descs.iter() {
                let listed = layer.layers.is_empty()
                    || layer.layers.iter().any(|l| *l == d.digest.to_string());
                let toc = d
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(annotation::TOC_DIGEST));
                let claimed = locked(&this.claimed).contains_key(&d.digest.to_string());
                if listed && !toc && !claimed && unpackable(&d.media_type) {
                    drop(this.start(&reference, &d.digest, Some(d.size)));
                }
            }
        });
    }

    /// The layers of the image, for this host's platform; one lookup per image at a time.
    async fn manifest(
        &self,
        image_ref: &str,
        reference: &Reference,
    ) -> Result<Arc<Vec<Descriptor>>, MountError> {
        let resolving = {
            let mut map = locked(&self.manifests);
            match map.get(image_ref) {
                Some((_, r)) => r.clone(),
                None => {
                    let (client, reference) = (self.client.clone(), reference.clone());
                    let handle = tokio::runtime::Handle::current();
                    // The registry client's futures are not Send: driven on a thread of their own.
                    let task = tokio::task::spawn_blocking(move || {
                        handle
                            .block_on(client.resolve_image(&reference, &registry::Platform::host()))
                            .map(|img| Arc::new(img.manifest.layers))
                            .map_err(failed)
                    });
                    let r = async move { task.await.map_err(failed)? }.boxed().shared();
                    map.insert(image_ref.to_string(), (Instant::now(), r.clone()));
                    r
                }
            }
        };
        resolving.await
    }

    /// Starts the full pull of one blob unless it is on its way already.
    fn start(&self, reference: &Reference, digest: &Digest, size: Option<u64>) -> Pull {
        let key = digest.to_string();
        let mut map = locked(&self.pulls);
        if let Some((_, p)) = map.get(&key) {
            return p.clone();
        }
        let job = Job {
            reader: self.client.blob_reader(reference, digest.clone(), size),
            digest: digest.clone(),
            size,
            dir: self.staging.join(format!(
                "{}.{}",
                digest.hex(),
                self.seq.fetch_add(1, Ordering::Relaxed)
            )),
            layers: self.layers.clone(),
            ranges: self.ranges.clone(),
        };
        info!(layer = %digest, "full pull started");
        let task = tokio::spawn(job.run());
        let pull = async move { task.await.map_err(failed)? }.boxed().shared();
        map.insert(key, (Instant::now(), pull.clone()));
        pull
    }

    /// Fills `dest` (an empty directory) with the unpacked layer: the one pulled ahead,
    /// or one pulled now. On failure `dest` is left empty.
    pub async fn fill(&self, dest: &Path, layer: &RemoteLayer) -> Result<(), MountError> {
        let started = Instant::now();
        let reference = Reference::parse(&layer.image_ref)
            .map_err(|e| MountError::InvalidLabels(e.to_string()))?;
        let key = layer.digest.to_string();
        // Claimed: a later Prepare of the same blob pulls it again.
        locked(&self.claimed).insert(key.clone(), Instant::now());
        let pull = locked(&self.pulls).remove(&key).map(|(_, p)| p);
        let pull = match pull {
            Some(p) => p,
            None => {
                let size = match self.manifest(&layer.image_ref, &reference).await {
                    Ok(d) => d.iter().find(|d| d.digest == layer.digest).map(|d| d.size),
                    Err(_) => None,
                };
                let p = self.start(&reference, &layer.digest, size);
                locked(&self.pulls).remove(&key);
                p
            }
        };
        let staged = tokio::time::timeout(WAIT, pull).await.map_err(|_| {
            MountError::FullPull(format!("layer {key}: not done within {WAIT:?}"))
        })??;
        let (from, to) = (staged.root(), dest.to_path_buf());
        // An empty directory is replaced by the rename; same filesystem (the daemon's root).
        tokio::task::spawn_blocking(move || std::fs::rename(&from, &to))
            .await
            .map_err(failed)?
            .map_err(|e| failed(format!("moving layer {key} into {}: {e}", dest.display())))?;
        drop(staged);
        info!(layer = %key, took_ms = started.elapsed().as_millis() as u64, "layer filled by a full pull");
        Ok(())
    }
}

/// One blob's download and unpack.
struct Job {
    reader: registry::BlobReader,
    digest: Digest,
    size: Option<u64>,
    dir: PathBuf,
    layers: Arc<Semaphore>,
    ranges: Arc<Semaphore>,
}

/// What the download hands the unpacker.
enum Msg {
    Data(Bytes),
    /// Every byte was handed over and the digest matched.
    Verified,
    Failed(String),
}

impl Job {
    async fn run(self) -> Result<Arc<Staged>, MountError> {
        let started = Instant::now();
        let _slot = self.layers.clone().acquire_owned().await.map_err(failed)?;
        let digest = self.digest.clone();
        let res = self.pull().await;
        match &res {
            Ok(_) => {
                info!(layer = %digest, took_ms = started.elapsed().as_millis() as u64, "full pull done")
            }
            Err(e) => warn!(layer = %digest, error = %e, "full pull failed"),
        }
        res
    }

    async fn pull(self) -> Result<Arc<Staged>, MountError> {
        if self.digest.algorithm() != registry::Algorithm::Sha256 {
            return Err(failed(format!(
                "{}: only sha256 blobs are pulled",
                self.digest
            )));
        }
        std::fs::create_dir(&self.dir)
            .map_err(|e| failed(format!("{}: {e}", self.dir.display())))?;
        let staged = Staged {
            dir: self.dir.clone(),
        };
        std::fs::create_dir(staged.root())
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(staged.root(), std::fs::Permissions::from_mode(0o755))
            })
            .map_err(|e| failed(format!("{}: {e}", staged.root().display())))?;
        let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
        let root = staged.root();
        let unpacking = tokio::task::spawn_blocking(move || unpack_stream(Chan::new(rx), &root));
        let handle = tokio::runtime::Handle::current();
        let (reader, digest, size, ranges) =
            (self.reader, self.digest.clone(), self.size, self.ranges);
        // The registry client's futures are not Send: driven on a thread of their own.
        let downloading = tokio::task::spawn_blocking(move || {
            handle.block_on(download(reader, digest, size, ranges, tx))
        });
        let (down, unpacked) = futures::join!(downloading, unpacking);
        let down = down.map_err(failed)?;
        let unpacked = unpacked.map_err(failed)?;
        match (down, unpacked) {
            (Ok(bytes), Ok(stats)) => {
                debug!(layer = %self.digest, bytes, entries = stats.entries, unpacked = stats.bytes, "layer unpacked");
                Ok(Arc::new(staged))
            }
            // The download's reason first: the unpacker only saw the stream break.
            (Err(Down::Failed(e)), _) => Err(e),
            (_, Err(e)) => Err(failed(format!("layer {}: {e}", self.digest))),
            (Err(Down::UnpackerGone), Ok(_)) => Err(failed("unpacker stopped early")),
        }
    }
}

enum Down {
    Failed(MountError),
    /// The unpacker stopped reading (it failed; its error tells why).
    UnpackerGone,
}

/// Downloads the blob in order with up to [`RANGES_PER_LAYER`] ranged GETs in flight,
/// hashing it on the way; returns its size.
async fn download(
    reader: registry::BlobReader,
    digest: Digest,
    size: Option<u64>,
    ranges: Arc<Semaphore>,
    tx: mpsc::Sender<Msg>,
) -> Result<u64, Down> {
    let res = download_inner(&reader, &digest, size, &ranges, &tx).await;
    if let Err(Down::Failed(e)) = &res {
        let _ = tx.send(Msg::Failed(e.to_string())).await;
    }
    res
}

async fn download_inner(
    reader: &registry::BlobReader,
    digest: &Digest,
    size: Option<u64>,
    ranges: &Arc<Semaphore>,
    tx: &mpsc::Sender<Msg>,
) -> Result<u64, Down> {
    let fail = |e: String| Down::Failed(failed(format!("layer {digest}: {e}")));
    let size = match size {
        Some(s) => s,
        None => reader.size().await.map_err(|e| fail(e.to_string()))?,
    };
    if size > MAX_BLOB {
        return Err(fail(format!("{size} bytes, over {MAX_BLOB}")));
    }
    let chunks: Vec<Range<u64>> = (0..size.div_ceil(CHUNK))
        .map(|i| i * CHUNK..((i + 1) * CHUNK).min(size))
        .collect();
    let mut parts = futures::stream::iter(chunks)
        .map(|r| async move {
            let _permit = ranges.acquire().await.map_err(|e| e.to_string())?;
            let want = r.end - r.start;
            let b = reader
                .read_at(r.start, want)
                .await
                .map_err(|e| format!("bytes {}-{}: {e}", r.start, r.end))?;
            if b.len() as u64 != want {
                return Err(format!(
                    "bytes {}-{}: registry sent {} bytes",
                    r.start,
                    r.end,
                    b.len()
                ));
            }
            Ok(b)
        })
        .buffered(RANGES_PER_LAYER);
    let mut hash = sha2::Sha256::new();
    while let Some(part) = parts.next().await {
        let b = part.map_err(fail)?;
        hash.update(&b);
        if tx.send(Msg::Data(b)).await.is_err() {
            return Err(Down::UnpackerGone);
        }
    }
    let got = format!("{:x}", hash.finalize());
    if got != digest.hex() {
        return Err(fail(format!(
            "digest mismatch: the registry sent sha256:{got}"
        )));
    }
    if tx.send(Msg::Verified).await.is_err() {
        return Err(Down::UnpackerGone);
    }
    Ok(size)
}

/// The blob as a byte stream for the unpacker: ends only once the download says the
/// digest matched, fails when it fails.
struct Chan {
    rx: mpsc::Receiver<Msg>,
    cur: Bytes,
    done: bool,
}

impl Chan {
    fn new(rx: mpsc::Receiver<Msg>) -> Chan {
        Chan {
            rx,
            cur: Bytes::new(),
            done: false,
        }
    }
}

impl Read for Chan {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Msg::Data(b)) => self.cur = b,
                Some(Msg::Verified) => self.done = true,
                Some(Msg::Failed(e)) => return Err(std::io::Error::other(e)),
                None => return Err(std::io::Error::other("the download stopped")),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// Decompresses (gzip, zstd, or none, by the stream's first bytes) and unpacks.
fn unpack_stream(r: Chan, root: &Path) -> Result<unpack::Stats, UnpackError> {
    let limits = Limits::default();
    let mut br = BufReader::with_capacity(1 << 20, r);
    let head = br.fill_buf().map_err(UnpackError::Read)?.to_vec();
    let drain = |r: &mut dyn Read| {
        std::io::copy(r, &mut std::io::sink())
            .map(|_| ())
            .map_err(UnpackError::Read)
    };
    if head.starts_with(&[0x1f, 0x8b]) {
        let mut d = flate2::bufread::MultiGzDecoder::new(br);
        let stats = unpack::unpack(&mut d, root, &limits)?;
        drain(d.get_mut())?;
        Ok(stats)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let mut d = zstd::stream::read::Decoder::with_buffer(br).map_err(UnpackError::Read)?;
        let stats = unpack::unpack(&mut d, root, &limits)?;
        drain(d.get_mut())?;
        Ok(stats)
    } else {
        let stats = unpack::unpack(&mut br, root, &limits)?;
        drain(&mut br)?;
        Ok(stats)
    }
}
