//! Where compressed layer bytes come from: the [`Fetcher`] trait, a local-file fetcher,
//! and an adapter over a registry [`registry::BlobReader`].

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Positioned, possibly multi-range reads of one blob. Implementations do their own
/// retries and timeouts; an error returned here is final for that request.
///
/// Calls are blocking and may come from many threads at once.
pub trait Fetcher: Send + Sync + 'static {
    /// Size of the blob in bytes.
    fn size(&self) -> u64;
    /// The bytes of each range, in order; each must be exactly as long as its range.
    fn read_ranges(&self, ranges: &[Range<u64>]) -> io::Result<Vec<Bytes>>;

    /// Reads `ranges` (sorted, disjoint) in one go, handing their bytes to `sink` in
    /// blob order as they arrive, each piece with its blob offset, so the front of a
    /// large read can be used before the rest has come. The fetcher may merge ranges
    /// with the gaps between them (that is transport policy, not the caller's): a piece
    /// may then carry bytes between the ranges asked for, never outside their span.
    /// After a retry a piece may repeat earlier offsets. An error from `sink` stops the
    /// read. The default reads every range whole with one [`Fetcher::read_ranges`].
    fn read_ranges_streaming(
        &self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let parts = self.read_ranges(ranges)?;
        if parts.len() != ranges.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the fetcher returned fewer ranges than asked",
            ));
        }
        for (r, p) in ranges.iter().zip(&parts) {
            sink(r.start, p)?;
        }
        Ok(())
    }
}

impl<F: Fetcher + ?Sized> Fetcher for Arc<F> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_ranges(&self, ranges: &[Range<u64>]) -> io::Result<Vec<Bytes>> {
        (**self).read_ranges(ranges)
    }
    fn read_ranges_streaming(
        &self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        (**self).read_ranges_streaming(ranges, sink)
    }
}

/// A blob in a local file.
pub struct FileFetcher {
    file: File,
    size: u64,
}

impl FileFetcher {
    pub fn open(path: impl AsRef<Path>) -> io::Result<FileFetcher> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(FileFetcher { file, size })
    }
}

impl Fetcher for FileFetcher {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_ranges(&self, ranges: &[Range<u64>]) -> io::Result<Vec<Bytes>> {
        ranges
            .iter()
            .map(|r| {
                let len = usize::try_from(r.end.saturating_sub(r.start))
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "range too large"))?;
                let mut buf = vec![0u8; len];
                self.file.read_exact_at(&mut buf, r.start)?;
                Ok(Bytes::from(buf))
            })
            .collect()
    }
}

/// A registry blob, read through the registry client on the process's tokio runtime.
///
/// A read hands its future to the runtime's [`tokio::runtime::Handle`] and waits for the
/// bytes on a channel: no thread and no runtime is created per read. The registry merges
/// neighbouring ranges into as few requests as its policy allows. Call it from plain
/// threads (the fetch pool, `spawn_blocking`), never from an async task: waiting there
/// would hold up the runtime the read needs (for good, on a current-thread runtime).
pub struct RegistryFetcher {
    reader: Arc<registry::BlobReader>,
    handle: tokio::runtime::Handle,
    size: u64,
}

impl RegistryFetcher {
    /// Wraps a reader shared with others (one whose endpoint look-up may already be on
    /// its way) of a blob of `size` bytes.
    pub fn shared(
        reader: Arc<registry::BlobReader>,
        handle: tokio::runtime::Handle,
        size: u64,
    ) -> RegistryFetcher {
        RegistryFetcher {
            reader,
            handle,
            size,
        }
    }

    /// Wraps `reader` whose size is already known (from the layer descriptor).
    pub fn with_size(
        reader: registry::BlobReader,
        handle: tokio::runtime::Handle,
        size: u64,
    ) -> RegistryFetcher {
        Self::shared(Arc::new(reader), handle, size)
    }
}

/// What the runtime sends back to the thread waiting on a read.
enum Reply {
    Piece(u64, Bytes),
    Done(io::Result<()>),
}

impl Fetcher for RegistryFetcher {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_ranges_streaming(
        &self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel::<Reply>();
        let pieces = tx.clone();
        let forward: registry::RangeSink = Arc::new(move |off, piece| {
            let _ = pieces.send(Reply::Piece(off, piece));
        });
        let (reader, ranges) = (self.reader.clone(), ranges.to_vec());
        let task = self.handle.spawn(async move {
            let res = reader
                .read_ranges_streaming(&ranges, forward)
                .await
                .map_err(io::Error::other);
            let _ = tx.send(Reply::Done(res));
        });
        // `sink` runs here, on the caller's thread, as pieces arrive.
        loop {
            match rx.recv() {
                Ok(Reply::Piece(off, piece)) => {
                    if let Err(e) = sink(off, &piece) {
                        task.abort();
                        return Err(e);
                    }
                }
                Ok(Reply::Done(res)) => return res,
                Err(_) => return Err(io::Error::other("the registry read ended without a reply")),
            }
        }
    }
    fn read_ranges(&self, ranges: &[Range<u64>]) -> io::Result<Vec<Bytes>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (reader, ranges) = (self.reader.clone(), ranges.to_vec());
        self.handle.spawn(async move {
            let res = reader.read_ranges(&ranges).await.map_err(io::Error::other);
            let _ = tx.send(res);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::other("the registry read ended without a reply")))
    }
}

/// Presents a [`Fetcher`] as an [`estargz::BlobSource`] for reading footer and TOC, and
/// remembers which ranges it read so they count as fetched.
pub(crate) struct SourceAdapter<'a> {
    pub fetcher: &'a dyn Fetcher,
    pub read: Mutex<Vec<Range<u64>>>,
    /// Where footer and TOC bytes are kept across restarts, and the blob they belong to.
    pub cache: Option<(&'a crate::cache::ChunkCache, &'a str)>,
    /// When the first read (the footer's) and the last one (the TOC's end) finished.
    pub finished: Mutex<Option<(std::time::Instant, std::time::Instant)>>,
}

impl<'a> SourceAdapter<'a> {
    pub fn new(
        fetcher: &'a dyn Fetcher,
        cache: Option<(&'a crate::cache::ChunkCache, &'a str)>,
    ) -> SourceAdapter<'a> {
        SourceAdapter {
            fetcher,
            read: Mutex::new(Vec::new()),
            cache,
            finished: Mutex::new(None),
        }
    }
}

impl estargz::BlobSource for SourceAdapter<'_> {
    fn size(&self) -> u64 {
        self.fetcher.size()
    }
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let range = offset..offset.saturating_add(len as u64);
        let cached = self
            .cache
            .and_then(|(cache, blob)| cache.get_range(blob, offset, len));
        let data = match cached {
            Some(d) => d,
            None => {
                let mut parts = self.fetcher.read_ranges(std::slice::from_ref(&range))?;
                let part = parts
                    .pop()
                    .filter(|p| p.len() == len)
                    .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "short read"))?;
                if let Some((cache, blob)) = self.cache {
                    if let Err(e) = cache.put_range(blob, offset, &part) {
                        tracing::warn!(error = %e, "could not cache the TOC");
                    }
                }
                part.to_vec()
            }
        };
        if let Ok(mut read) = self.read.lock() {
            read.push(range);
        }
        if let Ok(mut f) = self.finished.lock() {
            let now = std::time::Instant::now();
            *f = Some(f.map_or((now, now), |(first, _)| (first, now)));
        }
        Ok(data)
    }
}
