//! Records which files are opened, read or executed through the workload's
//! rootfs with fanotify: a filesystem mark on the overlay's superblock sees
//! every access, whichever mount namespace it comes through.

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};

use crate::error::{Error, Result};

/// A running recorder; [`Recorder::stop`] returns the paths seen.
pub struct Recorder {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Recorder {
    /// Starts watching the filesystem mounted at `rootfs`.
    pub fn start(rootfs: &Path) -> Result<Recorder> {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_NOTIF | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
            EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC,
        )
        .map_err(|e| Error::Fanotify(format!("fanotify_init: {e}")))?;
        fan.mark(
            MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
            MaskFlags::FAN_OPEN | MaskFlags::FAN_ACCESS | MaskFlags::FAN_OPEN_EXEC,
            nix::fcntl::AT_FDCWD,
            Some(rootfs),
        )
        .map_err(|e| Error::Fanotify(format!("marking {}: {e}", rootfs.display())))?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let prefix = rootfs.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("fanotify".into())
            .spawn({
                let stop = stop.clone();
                let seen = seen.clone();
                move || watch(fan, &prefix, &stop, &seen)
            })
            .map_err(|e| Error::io("starting the recorder thread", e))?;
        Ok(Recorder {
            stop,
            seen,
            thread: Some(thread),
        })
    }

    /// Stops watching (after draining queued events) and returns the paths,
    /// relative to the rootfs, in first-access order.
    pub fn stop(mut self) -> Vec<String> {
        self.halt();
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.halt();
    }
}

fn watch(fan: Fanotify, rootfs: &Path, stop: &AtomicBool, seen: &Mutex<Vec<String>>) {
    let mut known = HashSet::new();
    loop {
        // Once asked to stop, one more pass picks up what is already queued.
        let last = stop.load(Ordering::SeqCst);
        let mut fds = [PollFd::new(fan.as_fd(), PollFlags::POLLIN)];
        let ready = match poll(
            &mut fds,
            PollTimeout::from(if last { 0u16 } else { 100u16 }),
        ) {
            Ok(n) => n > 0,
            Err(nix::errno::Errno::EINTR) => false,
            Err(e) => {
                tracing::warn!(error = %e, "polling fanotify");
                return;
            }
        };
        if ready {
            loop {
                let events = match fan.read_events() {
                    Ok(ev) => ev,
                    Err(nix::errno::Errno::EAGAIN) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading fanotify events");
                        return;
                    }
                };
                if events.is_empty() {
                    break;
                }
                for ev in &events {
                    let Some(fd) = ev.fd() else { continue };
                    let Some(rel) = accessed_path(fd.as_raw_fd(), rootfs) else {
                        continue;
                    };
                    if known.insert(rel.clone()) {
                        tracing::debug!(path = %rel, "accessed");
                        seen.lock().unwrap_or_else(|p| p.into_inner()).push(rel);
                    }
                }
            }
        }
        if last {
            return;
        }
    }
}

/// The rootfs-relative path of a regular file opened through the workload's
/// view, or `None` for anything else.
fn accessed_path(fd: i32, rootfs: &Path) -> Option<String> {
    let meta = std::fs::metadata(format!("/proc/self/fd/{fd}")).ok()?;
    if !meta.is_file() {
        return None;
    }
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    // Inside the container the rootfs is "/", so its files read as absolute
    // paths; accesses through the host's path to the rootfs are the runtime's
    // own set-up, not the workload's.
    if link.starts_with(rootfs) {
        return None;
    }
    let s = link.to_str()?;
    let rel = s.strip_prefix('/')?;
    (!rel.is_empty() && !rel.ends_with(" (deleted)")).then(|| rel.to_string())
}
