//! The speculative head of a blob: its first bytes (where prioritized files live),
//! fetched in parallel with the footer and TOC instead of after them, held until the
//! prefetch decodes them, and handed out by a [`Fetcher`] wrapper to reads of that range.
//!
//! The bytes are trusted no more than any fetched bytes: the chunks cut from them are
//! checked against the TOC's digests like every other chunk.

use std::io;
use std::ops::Range;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bytes::Bytes;
use tracing::debug;

use crate::fetcher::Fetcher;

/// Largest head fetched ahead of the TOC: held in memory until the prefetch decodes it.
pub const MAX_SPECULATIVE_HEAD: u64 = 32 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not asked for yet: starts with the layer's first network read.
    Pending,
    Fetching,
    Done,
    /// Failed, or no longer wanted: readers go to the network.
    Gone,
}

struct State {
    phase: Phase,
    /// Blob bytes `0..data.len()` that have arrived.
    data: Vec<u8>,
}

/// Bytes `0..len` of a blob, arriving or arrived.
pub(crate) struct Head {
    len: u64,
    state: Mutex<State>,
    arrived: Condvar,
}

impl Head {
    pub(crate) fn new(len: u64) -> Arc<Head> {
        Arc::new(Head {
            len,
            state: Mutex::new(State {
                phase: Phase::Pending,
                data: Vec::new(),
            }),
            arrived: Condvar::new(),
        })
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the head is (being) fetched and not yet let go.
    pub(crate) fn in_use(&self) -> bool {
        matches!(self.lock().phase, Phase::Fetching | Phase::Done)
    }

    /// Lets the head go if nothing has started its fetch (the footer and TOC came from
    /// the cache, so the layer was opened before and needs no speculation).
    pub(crate) fn drop_if_unstarted(&self) {
        let mut st = self.lock();
        if st.phase == Phase::Pending {
            st.phase = Phase::Gone;
        }
    }

    /// Lets the bytes go; later reads of the range go to the network, and a fetch
    /// still running stops at its next piece.
    pub(crate) fn release(&self) {
        let mut st = self.lock();
        st.phase = Phase::Gone;
        st.data = Vec::new();
        drop(st);
        self.arrived.notify_all();
    }

    /// Starts fetching `0..len` through `inner` on its own thread, once.
    fn start(self: &Arc<Self>, inner: &Arc<dyn Fetcher>) {
        {
            let mut st = self.lock();
            if st.phase != Phase::Pending {
                return;
            }
            st.phase = Phase::Fetching;
            st.data = Vec::with_capacity(self.len as usize);
        }
        let (head, inner) = (self.clone(), inner.clone());
        let spawned = std::thread::Builder::new()
            .name("stargz-head".into())
            .spawn(move || head.fetch(inner.as_ref()));
        if let Err(e) = spawned {
            debug!(error = %e, "no thread for the speculative head");
            self.release();
        }
    }

    fn fetch(&self, inner: &dyn Fetcher) {
        let all = 0..self.len;
        let res = inner.read_ranges_streaming(std::slice::from_ref(&all), &mut |off, piece| {
            let mut st = self.lock();
            if st.phase != Phase::Fetching {
                return Err(io::Error::other("speculative head no longer wanted"));
            }
            let have = st.data.len() as u64;
            let end = off.saturating_add(piece.len() as u64).min(self.len);
            // Pieces come in order; after a retry they may repeat bytes we have.
            if off > have {
                return Err(io::Error::other("gap in the speculative head"));
            }
            if end > have {
                st.data
                    .extend_from_slice(&piece[(have - off) as usize..(end - off) as usize]);
                drop(st);
                self.arrived.notify_all();
            }
            Ok(())
        });
        let mut st = self.lock();
        if st.phase == Phase::Fetching {
            if res.is_ok() && st.data.len() as u64 == self.len {
                st.phase = Phase::Done;
            } else {
                if let Err(e) = &res {
                    debug!(error = %e, "speculative head fetch failed; reads will fetch");
                }
                st.phase = Phase::Gone;
                st.data = Vec::new();
            }
        }
        drop(st);
        self.arrived.notify_all();
    }

    /// Hands `range` (inside the head) to `sink` piece by piece as it arrives. Returns
    /// where it stopped: `range.end`, or earlier when the head went away, in which case
    /// the caller fetches the rest.
    fn serve(
        &self,
        range: Range<u64>,
        sink: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<u64> {
        let mut pos = range.start;
        while pos < range.end {
            let piece = {
                let mut st = self.lock();
                while st.phase == Phase::Fetching && (st.data.len() as u64) <= pos {
                    st = self.arrived.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                let have = st.data.len() as u64;
                if st.phase == Phase::Gone || have <= pos {
                    return Ok(pos);
                }
                let end = have.min(range.end);
                st.data[pos as usize..end as usize].to_vec()
            };
            sink(pos, &piece)?;
            pos += piece.len() as u64;
        }
        Ok(pos)
    }
}

/// A [`Fetcher`] whose reads of the blob's head are answered from a [`Head`]. The
/// first read that goes through it (the footer and TOC) starts the head's fetch.
pub(crate) struct HeadFetcher {
    inner: Arc<dyn Fetcher>,
    head: Arc<Head>,
}

impl HeadFetcher {
    pub(crate) fn new(inner: Arc<dyn Fetcher>, head: Arc<Head>) -> HeadFetcher {
        HeadFetcher { inner, head }
    }

    /// The parts of `ranges` inside the head and after it.
    fn split(&self, ranges: &[Range<u64>]) -> (Vec<Range<u64>>, Vec<Range<u64>>) {
        let len = self.head.len;
        let mut inside = Vec::new();
        let mut after = Vec::new();
        for r in ranges {
            if r.start < len {
                inside.push(r.start..r.end.min(len));
            }
            if r.end > len {
                after.push(r.start.max(len)..r.end);
            }
        }
        (inside, after)
    }

    /// Serves `inside` from the head, going to the network from wherever the head
    /// went away.
    fn serve_inside(
        &self,
        inside: &[Range<u64>],
        sink: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        for (i, r) in inside.iter().enumerate() {
            let stopped = self.head.serve(r.clone(), sink)?;
            if stopped < r.end {
                let mut rest = Vec::with_capacity(inside.len() - i);
                rest.push(stopped..r.end);
                rest.extend_from_slice(&inside[i + 1..]);
                return self.inner.read_ranges_streaming(&rest, sink);
            }
        }
        Ok(())
    }
}

impl Fetcher for HeadFetcher {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_ranges(&self, ranges: &[Range<u64>]) -> io::Result<Vec<Bytes>> {
        self.head.start(&self.inner);
        if !self.head.in_use() || ranges.iter().all(|r| r.start >= self.head.len) {
            return self.inner.read_ranges(ranges);
        }
        let mut out: Vec<Vec<u8>> = ranges
            .iter()
            .map(|r| Vec::with_capacity(r.end.saturating_sub(r.start).min(8 << 20) as usize))
            .collect();
        self.read_ranges_streaming(ranges, &mut |off, piece| {
            let pend = off.saturating_add(piece.len() as u64);
            for (r, buf) in ranges.iter().zip(out.iter_mut()) {
                // Each range fills in order; a piece may repeat bytes after a retry.
                let have = r.start + buf.len() as u64;
                let to = r.end.min(pend);
                if off <= have && have < to {
                    buf.extend_from_slice(&piece[(have - off) as usize..(to - off) as usize]);
                }
            }
            Ok(())
        })?;
        for (r, buf) in ranges.iter().zip(&out) {
            if buf.len() as u64 != r.end.saturating_sub(r.start) {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "short read of the blob",
                ));
            }
        }
        Ok(out.into_iter().map(Bytes::from).collect())
    }

    fn read_ranges_streaming(
        &self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.head.start(&self.inner);
        let (inside, after) = self.split(ranges);
        if inside.is_empty() || !self.head.in_use() {
            return self.inner.read_ranges_streaming(ranges, sink);
        }
        if after.is_empty() {
            return self.serve_inside(&inside, sink);
        }
        // The part after the head is fetched meanwhile and handed on once the head's
        // part is through, so the sink still sees the blob in order.
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<(u64, Vec<u8>)>();
            let inner = self.inner.as_ref();
            let after = &after;
            let fetch = s.spawn(move || {
                inner.read_ranges_streaming(after, &mut |off, piece| {
                    tx.send((off, piece.to_vec()))
                        .map_err(|_| io::Error::other("reader went away"))
                })
            });
            let res = self.serve_inside(&inside, sink).and_then(|()| {
                for (off, piece) in rx.iter() {
                    sink(off, &piece)?;
                }
                Ok(())
            });
            // On an error the receiver goes here, which stops the fetch at its next piece.
            drop(rx);
            let fetched = fetch
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("fetch thread panicked")));
            res.and(fetched)
        })
    }
}
