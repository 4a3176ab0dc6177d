//! A layer's tail (footer and TOC) asked for at its Prepare, before the image manifest
//! says how large the blob is: one suffix-range request (`Range: bytes=-N`) instead of
//! waiting a round trip for the manifest first, and the fetcher that serves the open's
//! tail read from it.

use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use tracing::debug;

/// Blob size and last bytes, once the suffix read is in (`None`: it failed; the open
/// then reads as usual, and meets the error again if it was real).
pub type Pending = Shared<BoxFuture<'static, Option<(u64, Bytes)>>>;

/// A tail read under way.
#[derive(Clone)]
pub struct EarlyTail {
    /// Bytes asked for (fewer come from a shorter blob).
    pub len: u64,
    pub pending: Pending,
}

impl EarlyTail {
    /// Starts reading the last `len` bytes of `reader`'s blob on a blocking thread (the
    /// registry client's futures are not Send).
    pub fn start(reader: Arc<registry::BlobReader>, len: u64) -> EarlyTail {
        let handle = tokio::runtime::Handle::current();
        let task = tokio::task::spawn_blocking(move || {
            handle
                .block_on(reader.read_suffix(len))
                .map_err(|e| debug!(blob = %reader.digest(), error = %e, "early tail read failed"))
                .ok()
        });
        let pending = async move { task.await.ok().flatten() }.boxed().shared();
        EarlyTail { len, pending }
    }

    /// The blob's size and tail, waiting for them.
    pub fn wait(&self, handle: &tokio::runtime::Handle) -> Option<(u64, Bytes)> {
        handle.block_on(self.pending.clone())
    }
}

/// A fetcher that answers reads inside the blob's last bytes from an [`EarlyTail`]
/// (waiting for it if it is still on the link) and everything else from `inner`, until
/// [`TailFilled::release`] lets the bytes go.
pub struct TailFilled<F> {
    inner: F,
    tail: Mutex<Option<EarlyTail>>,
    handle: tokio::runtime::Handle,
}

impl<F: fs::Fetcher> TailFilled<F> {
    pub fn new(inner: F, tail: EarlyTail, handle: tokio::runtime::Handle) -> Self {
        TailFilled {
            inner,
            tail: Mutex::new(Some(tail)),
            handle,
        }
    }

    /// Drops the early tail (the open has read what it needed): later reads go to
    /// `inner`, and the bytes are not kept for the layer's life.
    pub fn release(&self) {
        self.tail.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// The bytes of `ranges` when all of them lie in the early tail and it came whole.
    fn served_by_tail(&self, ranges: &[Range<u64>]) -> Option<Vec<Bytes>> {
        let tail = self
            .tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let size = self.inner.size();
        let start = size.saturating_sub(tail.len);
        if ranges.is_empty() || !ranges.iter().all(|r| r.start >= start && r.end <= size) {
            return None;
        }
        let (total, bytes) = tail.wait(&self.handle)?;
        if total != size || bytes.len() as u64 != size - start {
            return None;
        }
        ranges
            .iter()
            .map(|r| {
                let (a, b) = ((r.start - start) as usize, (r.end - start) as usize);
                (a <= b).then(|| bytes.slice(a..b))
            })
            .collect()
    }
}

impl<F: fs::Fetcher> fs::Fetcher for TailFilled<F> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_ranges(&self, ranges: &[Range<u64>]) -> io::Result<Vec<Bytes>> {
        match self.served_by_tail(ranges) {
            Some(parts) => Ok(parts),
            None => self.inner.read_ranges(ranges),
        }
    }

    fn read_ranges_streaming(
        &self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        match self.served_by_tail(ranges) {
            Some(parts) => {
                for (r, p) in ranges.iter().zip(&parts) {
                    sink(r.start, p)?;
                }
                Ok(())
            }
            None => self.inner.read_ranges_streaming(ranges, sink),
        }
    }
}
