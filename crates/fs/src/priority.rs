//! Who gets the network first: the prioritized work of every layer in a process (opening
//! a layer, prefetch, reads a process waits for) before background fetch.
//!
//! Background fetch moves whole layers; on a link of a few MB/s it would delay every
//! read a starting container waits for. So it runs only once no prioritized work has
//! happened in any layer for a quiet period, and each background worker checks again
//! before every window it fetches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Quiet period before background fetch (re)starts, as the reference waits.
pub const DEFAULT_QUIET: Duration = Duration::from_secs(5);

struct State {
    busy: usize,
    last_busy: Instant,
}

/// Shared by every layer of a process (it travels with their [`crate::ChunkCache`]).
pub struct Priority {
    quiet: Duration,
    state: Mutex<State>,
    changed: Condvar,
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
            state: Mutex::new(State {
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

    /// Blocks a background worker until no prioritized work has run for the quiet
    /// period. Returns false if `stop` was set meanwhile.
    pub fn wait_quiet(&self, stop: &AtomicBool) -> bool {
        let mut st = self.lock();
        loop {
            if stop.load(Ordering::SeqCst) {
                return false;
            }
            let idle = st.last_busy.elapsed();
            if st.busy == 0 && idle >= self.quiet {
                return true;
            }
            // Wake at the end of the quiet period, on any change, and now and then to
            // notice `stop`.
            let wait = if st.busy == 0 {
                self.quiet.saturating_sub(idle)
            } else {
                self.quiet
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
    fn stop_ends_the_wait() {
        let p = Priority::new(Duration::from_secs(3600));
        let _busy = p.busy();
        let stop = AtomicBool::new(true);
        assert!(!p.wait_quiet(&stop));
    }
}
