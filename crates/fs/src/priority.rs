//! Who gets the network first: the prioritized work of every layer in a process (opening
//! a layer, prefetch, reads a process waits for) before background fetch.
//!
//! Background fetch moves whole layers; on a link of a few MB/s it would delay every
//! read a starting container waits for. So it runs only once no prioritized work has
//! happened in any layer for a quiet period, and each background worker checks again
//! before every window it fetches. At most `max_concurrency` windows are fetched at
//! once over all layers, as the reference bounds its background tasks.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Quiet period before background fetch (re)starts, as the reference waits.
pub const DEFAULT_QUIET: Duration = Duration::from_secs(5);

struct State {
    busy: usize,
    last_busy: Instant,
    /// Background windows being fetched.
    background: usize,
}

/// Shared by every layer of a process (it travels with their [`crate::ChunkCache`]).
pub struct Priority {
    quiet: Duration,
    /// Most background windows at once; 0 = no bound.
    background_limit: AtomicUsize,
    state: Mutex<State>,
    changed: Condvar,
}

/// One background window in flight until dropped.
pub struct BackgroundSlot {
    priority: Arc<Priority>,
}

impl Drop for BackgroundSlot {
    fn drop(&mut self) {
        let mut st = self.priority.lock();
        st.background = st.background.saturating_sub(1);
        self.priority.changed.notify_all();
    }
}

/// Marks prioritized work in progress until dropped.
pub struct Busy {
    priority: Arc<Priority>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut st = self.priority.lock();
        st.busy = st.busy.saturating_sub(1);
        st.last_busy = Instant::now();
        self.priority.changed.notify_all();
    }
}

impl Priority {
    /// A gate that lets background work run after `quiet` without prioritized work.
    pub fn new(quiet: Duration) -> Arc<Priority> {
        Arc::new(Priority {
            quiet,
            background_limit: AtomicUsize::new(0),
            state: Mutex::new(State {
                background: 0,
                busy: 0,
                // A process starts quiet: nothing has asked for anything yet.
                last_busy: Instant::now()
                    .checked_sub(quiet)
                    .unwrap_or_else(Instant::now),
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Prioritized work starts; background work holds off until the guard is dropped
    /// and the quiet period has passed.
    pub fn busy(self: &Arc<Self>) -> Busy {
        let mut st = self.lock();
        st.busy += 1;
        st.last_busy = Instant::now();
        Busy {
            priority: self.clone(),
        }
    }

    /// Whether background work may run now.
    pub fn is_quiet(&self) -> bool {
        let st = self.lock();
        st.busy == 0 && st.last_busy.elapsed() >= self.quiet
    }

    /// Bounds the background windows fetched at once (0: no bound).
    pub fn set_background_limit(&self, limit: usize) {
        self.background_limit.store(limit, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Blocks a background worker until no prioritized work has run for the quiet
    /// period. Returns false if `stop` was set meanwhile.
    pub fn wait_quiet(&self, stop: &AtomicBool) -> bool {
        self.wait(stop, false)
    }

    /// [`Priority::wait_quiet`], then also for a free background slot, held until
    /// the returned guard is dropped. `None` if `stop` was set meanwhile.
    pub fn background_slot(self: &Arc<Self>, stop: &AtomicBool) -> Option<BackgroundSlot> {
        self.wait(stop, true).then(|| BackgroundSlot {
            priority: self.clone(),
        })
    }

    fn wait(&self, stop: &AtomicBool, slot: bool) -> bool {
        let mut st = self.lock();
        loop {
            if stop.load(Ordering::SeqCst) {
                return false;
            }
            let idle = st.last_busy.elapsed();
            let limit = self.background_limit.load(Ordering::SeqCst);
            let free = !slot || limit == 0 || st.background < limit;
            if st.busy == 0 && idle >= self.quiet && free {
                if slot {
                    st.background += 1;
                }
                return true;
            }
            // Wake at the end of the quiet period, on any change (a slot freed), and
            // now and then to notice `stop`.
            let wait = if st.busy == 0 && idle < self.quiet {
                self.quiet - idle
            } else {
                Duration::from_millis(200)
            }
            .min(Duration::from_millis(200))
            .max(Duration::from_millis(1));
            st = self
                .changed
                .wait_timeout(st, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_waits_for_quiet_after_busy() {
        let p = Priority::new(Duration::from_millis(150));
        assert!(p.is_quiet(), "a new gate is quiet");
        let stop = AtomicBool::new(false);
        let guard = p.busy();
        assert!(!p.is_quiet());
        let p2 = p.clone();
        let waiter = std::thread::spawn(move || {
            let stop = AtomicBool::new(false);
            let t = Instant::now();
            assert!(p2.wait_quiet(&stop));
            t.elapsed()
        });
        std::thread::sleep(Duration::from_millis(100));
        let released = Instant::now();
        drop(guard);
        let waited = waiter.join().expect("waiter");
        assert!(
            waited >= Duration::from_millis(100),
            "ran while busy: {waited:?}"
        );
        assert!(
            released.elapsed() >= Duration::from_millis(150),
            "quiet period skipped"
        );
        assert!(p.wait_quiet(&stop));
    }

    #[test]
    fn background_slots_are_bounded() {
        let p = Priority::new(Duration::ZERO);
        p.set_background_limit(2);
        let stop = AtomicBool::new(false);
        let a = p.background_slot(&stop).expect("first");
        let _b = p.background_slot(&stop).expect("second");
        let p2 = p.clone();
        let third = std::thread::spawn(move || {
            let stop = AtomicBool::new(false);
            let t = Instant::now();
            let slot = p2.background_slot(&stop);
            (slot.is_some(), t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(150));
        drop(a);
        let (got, waited) = third.join().expect("third");
        assert!(got);
        assert!(waited >= Duration::from_millis(140), "{waited:?}");
        // A stopped worker gives up instead of waiting for a slot.
        assert!(p.background_slot(&AtomicBool::new(true)).is_none());
    }

    #[test]
    fn stop_ends_the_wait() {
        let p = Priority::new(Duration::from_secs(3600));
        let _busy = p.busy();
        let stop = AtomicBool::new(true);
        assert!(!p.wait_quiet(&stop));
    }
}
