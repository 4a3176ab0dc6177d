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

    /// Reads one range, handing its bytes to `sink` in order as they arrive, each piece
    /// with its blob offset, so the front of a large range can be used before the rest
    /// has come. After a retry a piece may repeat earlier offsets. An error from `sink`
    /// stops the read. The default reads the range whole.
    fn read_range_streaming(
        &self,
        range: Range<u64>,
        sink: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let parts = self.read_ranges(std::slice::from_ref(&range))?;
        match parts.first() {
            Some(p) => sink(range.start, p),
            None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no data")),
        }
    }
}

impl<F: Fetcher + ?Sized> Fetcher for Arc<F> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_ranges(&self, ranges: &[Range<u64>]) -> io::Result<Vec<Bytes>> {
        (**self).read_ranges(ranges)
    }
    fn read_range_streaming(
        &self,
        range: Range<u64>,
        sink: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        (**self).read_range_streaming(range, sink)
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

/// A registry blob, read through the registry client's multi-range reader on a tokio
/// runtime. Blocking callers wait on the runtime; callers already inside a runtime are
/// moved to a helper thread so the runtime is never blocked from within.
pub struct RegistryFetcher {
    reader: Arc<registry::BlobReader>,
    handle: tokio::runtime::Handle,
    size: u64,
}

impl RegistryFetcher {
    /// Wraps `reader`, asking the registry for the blob size when it is not known yet.
    pub async fn new(
        reader: registry::BlobReader,
        handle: tokio::runtime::Handle,
    ) -> io::Result<RegistryFetcher> {
        let size = reader.size().await.map_err(io::Error::other)?;
        Ok(RegistryFetcher {
            reader: Arc::new(reader),
            handle,
            size,
        })
    }

    /// Wraps `reader` whose size is already known (from the layer descriptor).
    pub fn with_size(
        reader: registry::BlobReader,
        handle: tokio::runtime::Handle,
        size: u64,
    ) -> RegistryFetcher {
        RegistryFetcher {
            reader: Arc::new(reader),
            handle,
            size,
        }
    }
}

impl Fetcher for RegistryFetcher {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_range_streaming(
        &self,
        range: Range<u64>,
        sink: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        // The read runs on a helper thread (never blocking a runtime from within); its
        // pieces come back over a channel so that `sink` runs here, as they arrive.
        let (tx, rx) = std::sync::mpsc::channel::<(u64, Bytes)>();
        std::thread::scope(|s| {
            let worker = s.spawn(move || {
                let forward: registry::RangeSink = Arc::new(move |off, piece| {
                    let _ = tx.send((off, piece));
                });
                self.handle
                    .block_on(self.reader.read_range_streaming(range, forward))
                    .map_err(io::Error::other)
            });
            // Ends when the read is over and its sender is gone. After a sink error the
            // rest of the read is drained unseen.
            let mut failed = None;
            for (off, piece) in rx {
                if failed.is_none() {
                    if let Err(e) = sink(off, &piece) {
                        failed = Some(e);
                    }
                }
            }
            let res = worker
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("registry fetch thread panicked")));
            match failed {
                Some(e) => Err(e),
                None => res,
            }
        })
    }
    fn read_ranges(&self, ranges: &[Range<u64>]) -> io::Result<Vec<Bytes>> {
        let run = || {
            self.handle
                .block_on(self.reader.read_ranges(ranges))
                .map_err(io::Error::other)
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(run)
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("registry fetch thread panicked")))
            })
        } else {
            run()
        }
    }
}

/// Presents a [`Fetcher`] as an [`estargz::BlobSource`] for reading footer and TOC, and
/// remembers which ranges it read so they count as fetched.
pub(crate) struct SourceAdapter<'a> {
    pub fetcher: &'a dyn Fetcher,
    pub read: Mutex<Vec<Range<u64>>>,
    /// Where footer and TOC bytes are kept across restarts, and the blob they belong to.
    pub cache: Option<(&'a crate::cache::ChunkCache, &'a str)>,
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
        Ok(data)
    }
}
