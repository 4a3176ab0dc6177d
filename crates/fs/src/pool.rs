//! The process-wide fetch pool: a fixed set of plain threads, shared by every mount,
//! that runs every piece of work which may wait on the network (reads that missed the
//! cache, read-ahead, prefetch, background windows, whole-file copies).
//!
//! FUSE request threads are synchronous and the registry client lives on the process's
//! one tokio runtime, so fs needs no runtime of its own: a miss is handed here once and
//! the pool thread waits on the registry's reply. Threads are created once, up front;
//! nothing is spawned per request. A panic in a job is caught and logged and the thread
//! goes on with the next job, so one broken layer cannot take the pool down.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tracing::error;

use crate::error::{Error, Result};

/// Threads of the process-wide pool: reads that miss spend their time waiting on the
/// network, so this is sized for concurrent fetches, not for cores.
pub const DEFAULT_THREADS: usize = 32;
/// Jobs that may wait in the queue of the process-wide pool before submitters block.
pub const DEFAULT_QUEUE: usize = 1024;

/// How urgently a job is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Reads, read-ahead, prefetch: taken first.
    Urgent,
    /// Background windows: taken only when no urgent job waits, and by at most half of
    /// the threads at once, so urgent work always finds a free thread.
    Background,
}

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Queues {
    urgent: VecDeque<Job>,
    background: VecDeque<Job>,
    background_running: usize,
}

struct Inner {
    threads: usize,
    queue_cap: usize,
    background_cap: usize,
    state: Mutex<Queues>,
    /// Signalled when a job is queued or a background slot frees up.
    work: Condvar,
    /// Signalled when the urgent queue shrinks.
    space: Condvar,
}

thread_local! {
    static IN_POOL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A bounded pool of fetch threads. Clones share the same threads; hand one to every
/// mount of a process. The threads live as long as the process.
#[derive(Clone)]
pub struct FetchPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FetchPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchPool")
            .field("threads", &self.inner.threads)
            .field("queue", &self.inner.queue_cap)
            .finish()
    }
}

impl FetchPool {
    /// A pool of `threads` threads (at least 1) whose urgent queue holds up to `queue`
    /// jobs (at least 1) before submitters from outside the pool wait for room.
    pub fn new(threads: usize, queue: usize) -> Result<FetchPool> {
        let threads = threads.max(1);
        let inner = Arc::new(Inner {
            threads,
            queue_cap: queue.max(1),
            background_cap: (threads / 2).max(1),
            state: Mutex::new(Queues {
                urgent: VecDeque::new(),
                background: VecDeque::new(),
                background_running: 0,
            }),
            work: Condvar::new(),
            space: Condvar::new(),
        });
        for i in 0..threads {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("stargz-fetch-{i}"))
                .spawn(move || worker(&inner))
                .map_err(Error::Pool)?;
        }
        Ok(FetchPool { inner })
    }

    /// The process-wide pool ([`DEFAULT_THREADS`] threads, [`DEFAULT_QUEUE`] queued
    /// jobs), created on first use. Every caller gets the same threads.
    pub fn shared() -> Result<FetchPool> {
        static SHARED: Mutex<Option<FetchPool>> = Mutex::new(None);
        let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = shared.as_ref() {
            return Ok(p.clone());
        }
        let pool = FetchPool::new(DEFAULT_THREADS, DEFAULT_QUEUE)?;
        *shared = Some(pool.clone());
        Ok(pool)
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.inner.threads
    }

    /// Urgent jobs waiting for a thread.
    pub fn queued(&self) -> usize {
        self.lock().urgent.len()
    }

    /// Runs `job` on a pool thread, waiting for room in the queue when it is full.
    /// A panic in `job` is logged and goes no further.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        self.submit(Class::Urgent, Box::new(job), true);
    }

    /// Runs `job` on a pool thread if the queue has room; returns false (dropping the
    /// job) if it has not. For work that may be skipped, like read-ahead.
    pub fn try_spawn(&self, job: impl FnOnce() + Send + 'static) -> bool {
        self.submit(Class::Urgent, Box::new(job), false)
    }

    pub(crate) fn spawn_background(&self, job: impl FnOnce() + Send + 'static) {
        self.submit(Class::Background, Box::new(job), true);
    }

    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn submit(&self, class: Class, job: Job, wait: bool) -> bool {
        let mut q = self.lock();
        match class {
            // Background jobs are few (a handful per layer) and chain themselves, so
            // they need no bound of their own.
            Class::Background => q.background.push_back(job),
            Class::Urgent => {
                // A pool thread must never wait for room: if every thread did, no one
                // would be left to make it.
                let in_pool = IN_POOL.with(|c| c.get());
                while q.urgent.len() >= self.inner.queue_cap && !in_pool {
                    if !wait {
                        return false;
                    }
                    q = self.inner.space.wait(q).unwrap_or_else(|p| p.into_inner());
                }
                q.urgent.push_back(job);
            }
        }
        drop(q);
        self.inner.work.notify_one();
        true
    }
}

fn worker(inner: &Inner) {
    IN_POOL.with(|c| c.set(true));
    loop {
        let (job, class) = {
            let mut q = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(j) = q.urgent.pop_front() {
                    inner.space.notify_one();
                    break (j, Class::Urgent);
                }
                if q.background_running < inner.background_cap {
                    if let Some(j) = q.background.pop_front() {
                        q.background_running += 1;
                        break (j, Class::Background);
                    }
                }
                q = inner.work.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        if let Err(panic) = catch_unwind(AssertUnwindSafe(job)) {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            error!(panic = %what, "a fetch job panicked; its request fails with EIO");
        }
        if class == Class::Background {
            let mut q = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            q.background_running = q.background_running.saturating_sub(1);
            drop(q);
            // The freed slot may be what a waiting thread needs for a queued window.
            inner.work.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    #[test]
    fn concurrency_is_bounded_by_the_threads() {
        let pool = FetchPool::new(3, 100).expect("pool");
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        for _ in 0..20 {
            let (running, peak, tx) = (running.clone(), peak.clone(), tx.clone());
            pool.spawn(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
                running.fetch_sub(1, Ordering::SeqCst);
                let _ = tx.send(());
            });
        }
        for _ in 0..20 {
            rx.recv_timeout(Duration::from_secs(10)).expect("job ran");
        }
        assert_eq!(peak.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_full_queue_refuses_optional_jobs_and_holds_back_others() {
        let pool = FetchPool::new(1, 2).expect("pool");
        let (block_tx, block_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel();
        pool.spawn(move || {
            let _ = started_tx.send(());
            let _ = block_rx.recv_timeout(Duration::from_secs(10));
        });
        started_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("first job runs");
        assert!(pool.try_spawn(|| {}));
        assert!(pool.try_spawn(|| {}));
        assert!(!pool.try_spawn(|| {}), "a third job exceeds the queue");
        assert_eq!(pool.queued(), 2);
        let (done_tx, done_rx) = mpsc::channel();
        let submitter = {
            let pool = pool.clone();
            std::thread::spawn(move || {
                pool.spawn(move || {
                    let _ = done_tx.send(());
                })
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!submitter.is_finished(), "spawn waits for room");
        drop(block_tx);
        submitter.join().expect("submitter");
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("held-back job ran");
    }

    #[test]
    fn a_panicking_job_leaves_the_thread_serving() {
        let pool = FetchPool::new(1, 10).expect("pool");
        pool.spawn(|| panic!("broken layer"));
        let (tx, rx) = mpsc::channel();
        pool.spawn(move || {
            let _ = tx.send(std::thread::current().id());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the thread survived the panic");
    }

    #[test]
    fn jobs_of_many_mounts_share_the_threads() {
        let pool = FetchPool::new(4, 1000).expect("pool");
        let ids = Arc::new(Mutex::new(HashSet::new()));
        let (tx, rx) = mpsc::channel();
        // Ten "mounts" each submitting from their own thread, as FUSE threads do.
        let submitters: Vec<_> = (0..10)
            .map(|_| {
                let (pool, ids, tx) = (pool.clone(), ids.clone(), tx.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let (ids, tx) = (ids.clone(), tx.clone());
                        pool.spawn(move || {
                            if let Ok(mut s) = ids.lock() {
                                s.insert(std::thread::current().id());
                            }
                            let _ = tx.send(());
                        });
                    }
                })
            })
            .collect();
        for s in submitters {
            s.join().expect("submitter");
        }
        for _ in 0..200 {
            rx.recv_timeout(Duration::from_secs(10)).expect("job ran");
        }
        let n = ids.lock().expect("ids").len();
        assert!((1..=4).contains(&n), "{n} threads ran the jobs");
    }

    #[test]
    fn background_jobs_leave_threads_for_urgent_ones() {
        let pool = FetchPool::new(2, 10).expect("pool");
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let bg_started = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let (rx, started) = (release_rx.clone(), bg_started.clone());
            pool.spawn_background(move || {
                started.fetch_add(1, Ordering::SeqCst);
                if let Ok(rx) = rx.lock() {
                    let _ = rx.recv_timeout(Duration::from_secs(10));
                }
            });
        }
        // The first background job holds its thread before the urgent one is queued.
        let deadline = Instant::now() + Duration::from_secs(10);
        while bg_started.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (tx, rx) = mpsc::channel();
        pool.spawn(move || {
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("an urgent job runs while background jobs block");
        assert_eq!(
            bg_started.load(Ordering::SeqCst),
            1,
            "one background slot of two threads"
        );
        for _ in 0..3 {
            let _ = release_tx.send(());
        }
    }

    #[test]
    fn the_shared_pool_is_one_pool() {
        let a = FetchPool::shared().expect("pool");
        let b = FetchPool::shared().expect("pool");
        assert!(Arc::ptr_eq(&a.inner, &b.inner));
        assert_eq!(a.threads(), DEFAULT_THREADS);
    }

    #[test]
    fn a_job_submitted_from_the_pool_never_waits_for_room() {
        let pool = FetchPool::new(1, 1).expect("pool");
        let (tx, rx) = mpsc::channel();
        let inner = pool.clone();
        pool.spawn(move || {
            for _ in 0..5 {
                let tx = tx.clone();
                inner.spawn(move || {
                    let _ = tx.send(());
                });
            }
        });
        for _ in 0..5 {
            rx.recv_timeout(Duration::from_secs(10))
                .expect("nested job ran");
        }
    }
}
