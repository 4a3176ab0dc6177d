//! Recording which regular files a mount's workload reads first: the files opened or
//! read during a window that starts at the mount's first such access, in order of
//! first access and bounded in number. What was recorded lets a later mount of the
//! same layer fetch those files in one batch before the workload asks for them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use estargz::NodeId;

/// Most files recorded per mount (as many as one prefetch batch takes).
pub const MAX_RECORDED_FILES: usize = crate::layer::MAX_BATCH_FILES;

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
        let mut inner = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let started = *inner.started.get_or_insert(now);
        if now.saturating_duration_since(started) >= self.window {
            self.closed.store(true, Ordering::Relaxed);
            return;
        }
        if inner.order.len() < self.max && inner.seen.insert(id) {
            inner.order.push(id);
        }
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
    fn zero_window_records_nothing() {
        let log = AccessLog::new(Duration::ZERO, 10);
        log.note_at(1, Instant::now());
        assert!(log.files().is_empty());
        assert!(log.closed_at(Instant::now()));
    }
}
