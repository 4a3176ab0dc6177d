//! Recording which regular files a mount's workload reads first: the files opened or
//! read during a window that starts at the mount's first such access, in order of
//! first access and bounded in number, and for large files the byte ranges read. What
//! was recorded lets a later mount of the same layer fetch those files (or those parts
//! of them) in one batch before the workload asks for them.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use estargz::NodeId;

/// Most files recorded per mount (as many as one prefetch batch takes).
pub const MAX_RECORDED_FILES: usize = crate::layer::MAX_BATCH_FILES;
/// Files at least this large have the ranges read from them recorded, so a workload
/// that maps a big file and touches a few pages of it (a JVM's module image, an ML
/// model) has those pages fetched ahead, not the whole file.
pub const RANGED_FILE_MIN: u64 = 1 << 20;
/// Most separate ranges kept per file; past it the file counts as read whole.
pub const MAX_RANGES_PER_FILE: usize = 1024;

/// The files one mount's workload touched first. Shared between the FUSE threads that
/// note accesses and whoever collects the result; every method takes `&self`.
pub struct AccessLog {
    window: Duration,
    max: usize,
    /// Set once the window is over: later accesses cost one atomic load.
    closed: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    started: Option<Instant>,
    seen: HashSet<NodeId>,
    order: Vec<NodeId>,
    /// Read ranges of large files (sorted, disjoint, not touching); `None` once a file
    /// had too many to keep.
    ranges: HashMap<NodeId, Option<Vec<Range<u64>>>>,
}

/// Adds `r` to sorted, disjoint `spans`, merging what it overlaps or touches.
fn add_span(spans: &mut Vec<Range<u64>>, r: Range<u64>) {
    let first = spans.partition_point(|s| s.end < r.start);
    let mut last = first;
    let mut merged = r;
    while let Some(s) = spans.get(last) {
        if s.start > merged.end {
            break;
        }
        merged = merged.start.min(s.start)..merged.end.max(s.end);
        last += 1;
    }
    spans.splice(first..last, std::iter::once(merged));
}

impl AccessLog {
    /// Records for `window` after the first access, at most `max` files (capped at
    /// [`MAX_RECORDED_FILES`]).
    pub fn new(window: Duration, max: usize) -> AccessLog {
        AccessLog {
            window,
            max: max.min(MAX_RECORDED_FILES),
            closed: AtomicBool::new(false),
            inner: Mutex::default(),
        }
    }

    /// Notes an open or read of regular file `id` now.
    pub fn note(&self, id: NodeId) {
        // Once closed, every open pays one load, not a clock read and a lock.
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        self.note_at(id, Instant::now());
    }

    /// Notes an access of `id` at `now`: the first access starts the window, accesses
    /// after it closed and files past the bound are dropped.
    pub fn note_at(&self, id: NodeId, now: Instant) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        let Some(mut inner) = self.open_window(now) else {
            return;
        };
        if inner.order.len() < self.max && inner.seen.insert(id) {
            inner.order.push(id);
        }
    }

    /// The log, locked, if its window is still open at `now` (the first access opens
    /// it); `None` once it closed.
    fn open_window(&self, now: Instant) -> Option<std::sync::MutexGuard<'_, Inner>> {
        let mut inner = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let started = *inner.started.get_or_insert(now);
        if now.saturating_duration_since(started) >= self.window {
            self.closed.store(true, Ordering::Relaxed);
            return None;
        }
        Some(inner)
    }

    /// Notes a read of `len` bytes at `offset` of regular file `id` (a large one: see
    /// [`RANGED_FILE_MIN`]) now.
    pub fn note_read(&self, id: NodeId, offset: u64, len: u64) {
        if self.closed.load(Ordering::Relaxed) || len == 0 {
            return;
        }
        self.note_read_at(id, offset..offset.saturating_add(len), Instant::now());
    }

    /// Notes a read of `range` of `id` at `now`, as [`AccessLog::note_at`] notes opens.
    pub fn note_read_at(&self, id: NodeId, range: Range<u64>, now: Instant) {
        if self.closed.load(Ordering::Relaxed) || range.is_empty() {
            return;
        }
        let Some(mut inner) = self.open_window(now) else {
            return;
        };
        if !inner.seen.contains(&id) {
            if inner.order.len() >= self.max {
                return;
            }
            inner.seen.insert(id);
            inner.order.push(id);
        }
        let entry = inner.ranges.entry(id).or_insert_with(|| Some(Vec::new()));
        if let Some(spans) = entry {
            add_span(spans, range);
            if spans.len() > MAX_RANGES_PER_FILE {
                *entry = None;
            }
        }
    }

    /// The files recorded so far, in order of first access, each with the ranges read
    /// from it when it is a large file whose reads were noted (`None`: the whole file).
    pub fn files_with_ranges(&self) -> Vec<(NodeId, Option<Vec<Range<u64>>>)> {
        let Ok(g) = self.inner.lock() else {
            return Vec::new();
        };
        g.order
            .iter()
            .map(|&id| (id, g.ranges.get(&id).cloned().flatten()))
            .collect()
    }

    /// When the first access came, if one did.
    pub fn started(&self) -> Option<Instant> {
        self.inner.lock().ok().and_then(|g| g.started)
    }

    /// Whether the window is over at `now` (it never is before the first access).
    pub fn closed_at(&self, now: Instant) -> bool {
        self.closed.load(Ordering::Relaxed)
            || self
                .started()
                .is_some_and(|s| now.saturating_duration_since(s) >= self.window)
    }

    /// The files recorded so far, in order of first access.
    pub fn files(&self) -> Vec<NodeId> {
        self.inner
            .lock()
            .map(|g| g.order.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_starts_at_the_first_access_and_keeps_first_access_order() {
        let log = AccessLog::new(Duration::from_secs(10), 100);
        let t0 = Instant::now() + Duration::from_secs(1000);
        assert!(
            !log.closed_at(t0),
            "no access yet: the window has not started"
        );
        log.note_at(7, t0);
        log.note_at(3, t0 + Duration::from_secs(1));
        log.note_at(7, t0 + Duration::from_secs(2));
        log.note_at(5, t0 + Duration::from_millis(9_999));
        assert!(!log.closed_at(t0 + Duration::from_secs(9)));
        assert!(log.closed_at(t0 + Duration::from_secs(10)));
        // Past the window: dropped, and the log stays closed.
        log.note_at(9, t0 + Duration::from_secs(10));
        log.note_at(11, t0 + Duration::from_secs(1));
        assert_eq!(log.files(), vec![7, 3, 5]);
        assert_eq!(log.started(), Some(t0));
    }

    #[test]
    fn bounded_in_files() {
        let log = AccessLog::new(Duration::from_secs(60), 4);
        let t0 = Instant::now();
        for id in 0..100 {
            log.note_at(id, t0);
        }
        assert_eq!(log.files(), vec![0, 1, 2, 3]);
        let capped = AccessLog::new(Duration::from_secs(60), usize::MAX);
        for id in 0..(MAX_RECORDED_FILES as NodeId + 10) {
            capped.note_at(id, t0);
        }
        assert_eq!(capped.files().len(), MAX_RECORDED_FILES);
    }

    #[test]
    fn read_ranges_of_large_files_are_merged_and_bounded() {
        let log = AccessLog::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        log.note_at(1, t0);
        log.note_read_at(2, 100..200, t0);
        log.note_read_at(2, 0..50, t0);
        log.note_read_at(2, 150..300, t0);
        log.note_read_at(2, 50..60, t0);
        log.note_read_at(2, 1000..1100, t0);
        log.note_read_at(1, 0..10, t0);
        let got = log.files_with_ranges();
        assert_eq!(
            got,
            vec![
                (1, Some(std::iter::once(0..10).collect())),
                (2, Some(vec![0..60, 100..300, 1000..1100]))
            ]
        );
        // Past the bound of ranges a file counts as read whole.
        for i in 0..(MAX_RANGES_PER_FILE as u64 + 1) {
            log.note_read_at(3, i * 10..i * 10 + 1, t0);
        }
        assert_eq!(log.files_with_ranges()[2], (3, None));
        // Reads after the window are dropped.
        log.note_read_at(4, 0..1, t0 + Duration::from_secs(10));
        assert_eq!(log.files().len(), 3);
    }

    #[test]
    fn spans_merge() {
        let mut v = vec![10..20, 30..40, 50..60];
        add_span(&mut v, 20..30);
        assert_eq!(v, vec![10..40, 50..60]);
        add_span(&mut v, 0..5);
        add_span(&mut v, 70..80);
        add_span(&mut v, 35..75);
        assert_eq!(v, vec![0..5, 10..80]);
    }

    #[test]
    fn zero_window_records_nothing() {
        let log = AccessLog::new(Duration::ZERO, 10);
        log.note_at(1, Instant::now());
        assert!(log.files().is_empty());
        assert!(log.closed_at(Instant::now()));
    }
}
