//! Mounting a layer: the FUSE session on its own threads, reads that must fetch handed
//! to the process's fetch pool, prefetch before the mount is reported ready, background
//! fetch after, and unmounting when the handle goes away.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use fuser::{MountOption, SessionACL};
use tracing::{info, warn};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::fusefs::{is_mounted, FuseLayer, FuseOpts};
use crate::layer::Layer;
use crate::learn::AccessLog;
use crate::metrics::{FsMetrics, LayerGauges, Op, NO_LAYER};
use crate::pool::FetchPool;

/// FUSE request threads per mount.
const FUSE_THREADS: usize = 4;
/// Longest `unmount` waits for the FUSE session to end.
const UNMOUNT_WAIT: Duration = Duration::from_secs(5);

/// How to mount a layer.
#[derive(Clone, Copy)]
pub struct MountOptions<'a> {
    /// FUSE timeouts and passthrough, prefetch and background fetch switches.
    pub cfg: &'a Config,
    /// Where the mount's FUSE latency and the layer's gauges are recorded until it is
    /// unmounted; none when `None`.
    pub metrics: Option<&'a FsMetrics>,
    /// The process's fetch pool: misses, read-ahead, prefetch and background windows of
    /// this mount run there, side by side with every other mount's.
    pub pool: &'a FetchPool,
}

/// Mounts the opened `layer` read-only at `mountpoint`. Returns once the mount answers
/// requests and prefetch finished (or `prefetch_timeout_sec` passed); background fetch
/// follows the prefetch unless switched off.
///
/// Blocking: call it from a plain thread or `spawn_blocking`.
pub fn mount(layer: Arc<Layer>, mountpoint: &Path, opts: &MountOptions<'_>) -> Result<MountHandle> {
    mount_recording(layer, mountpoint, opts, None)
}

/// [`mount`], noting in `log` (when given) the regular files the workload opens or
/// reads first (see [`AccessLog`]).
pub fn mount_recording(
    layer: Arc<Layer>,
    mountpoint: &Path,
    opts: &MountOptions<'_>,
    log: Option<Arc<AccessLog>>,
) -> Result<MountHandle> {
    let cfg = opts.cfg;
    // mountinfo lists canonical paths; `check` compares against this one.
    let mountpoint = &std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.into());
    let mount_err = |source: std::io::Error| Error::Mount {
        mountpoint: mountpoint.display().to_string(),
        source,
    };
    let fopts = FuseOpts {
        attr_ttl: cfg.fuse.attr_ttl(),
        entry_ttl: cfg.fuse.entry_ttl(),
        passthrough: cfg.fuse.passthrough,
    };
    let passthrough_opens = Arc::new(AtomicU64::new(0));
    let mut fs = FuseLayer::new(
        layer.clone(),
        fopts,
        opts.pool.clone(),
        passthrough_opens.clone(),
        opts.metrics.map(|m| m.fuse_ops(&layer.desc().digest)),
    );
    fs.record_into(log);
    let mut fcfg = fuser::Config::default();
    fcfg.mount_options = vec![
        MountOption::RO,
        MountOption::FSName("stargz".into()),
        MountOption::Subtype("stargz".into()),
        MountOption::DefaultPermissions,
        MountOption::Suid,
        MountOption::Dev,
    ];
    fcfg.acl = SessionACL::All;
    fcfg.n_threads = Some(FUSE_THREADS);
    fcfg.clone_fd = true;
    let session = fuser::Session::new(fs, mountpoint, &fcfg).map_err(mount_err)?;
    let session = session.spawn().map_err(mount_err)?;
    info!(layer = %layer.desc().digest, mountpoint = %mountpoint.display(), "mounted");
    if let Some(m) = opts.metrics {
        let gauges: Weak<dyn LayerGauges> = Arc::downgrade(&layer) as Weak<dyn LayerGauges>;
        m.layer_mounted(mountpoint, gauges);
        layer.observe_with(m);
    }

    let prefetch_end = layer.prefetch_end().filter(|_| !cfg.noprefetch);
    let prefetch = !cfg.noprefetch && layer.has_prefetch();
    if prefetch {
        // A no-op when the layer was opened ahead of its mount and its prefetch started.
        layer.start_prefetch(opts.pool);
    }
    if !cfg.no_background_fetch {
        layer.start_background(opts.pool, cfg.background_workers());
    }
    let mut handle = MountHandle {
        session: Some(session),
        layer,
        mountpoint: mountpoint.to_path_buf(),
        passthrough_opens,
        metrics: opts.metrics.cloned(),
        prefetch_waited: Duration::ZERO,
    };
    // `prefetch_async_size`: a prefetch larger than that goes on without holding up
    // the mount.
    let async_above = u64::try_from(cfg.prefetch_async_size).unwrap_or(0);
    let wait = prefetch && (async_above == 0 || prefetch_end.unwrap_or(0) <= async_above);
    if prefetch && !wait {
        info!(layer = %handle.layer.desc().digest, bytes = prefetch_end.unwrap_or(0),
            threshold = async_above, "prefetch continues in the background");
    }
    if wait {
        let started = Instant::now();
        if !handle.layer.wait_prefetch(cfg.prefetch_timeout()) {
            warn!(layer = %handle.layer.desc().digest, "prefetch still running; mount proceeds");
        }
        handle.prefetch_waited = started.elapsed();
        if let Some(m) = opts.metrics {
            m.observe_ms(Op::PrefetchesCompleted, NO_LAYER, handle.prefetch_waited);
        }
    }
    Ok(handle)
}

/// A mounted layer. Dropping it unmounts.
pub struct MountHandle {
    session: Option<fuser::BackgroundSession>,
    layer: Arc<Layer>,
    mountpoint: PathBuf,
    passthrough_opens: Arc<AtomicU64>,
    metrics: Option<FsMetrics>,
    prefetch_waited: Duration,
}

impl MountHandle {
    /// How long [`mount`] waited for the layer's prefetch.
    pub fn prefetch_waited(&self) -> Duration {
        self.prefetch_waited
    }

    pub fn layer(&self) -> &Arc<Layer> {
        &self.layer
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Ok while the session serves requests and the mount is in place.
    pub fn check(&self) -> Result<()> {
        let alive = self
            .session
            .as_ref()
            .is_some_and(|s| !s.guard.is_finished());
        if alive && is_mounted(&self.mountpoint) {
            Ok(())
        } else {
            Err(Error::Mount {
                mountpoint: self.mountpoint.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "the FUSE session is gone",
                ),
            })
        }
    }

    /// Blob bytes that are local.
    pub fn fetched_bytes(&self) -> u64 {
        self.layer.fetched_bytes()
    }

    /// Opens answered with FUSE passthrough to a cached file.
    pub fn passthrough_opens(&self) -> u64 {
        self.passthrough_opens.load(Ordering::Relaxed)
    }

    /// Unmounts (lazily, so busy files do not block it) and waits for the session.
    pub fn unmount(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(m) = self.metrics.take() {
            m.layer_unmounted(&self.mountpoint, &self.layer.desc().digest);
        }
        self.layer.stop();
        let res = match self.session.take() {
            Some(s) => {
                // A lazily detached mount with files still open keeps its session until
                // they close; wait a while, then let the session thread finish on its own.
                let (tx, rx) = mpsc::channel();
                let spawned = std::thread::Builder::new()
                    .name("stargz-umount".into())
                    .spawn(move || {
                        let _ = tx.send(s.umount_and_join());
                    });
                let res = match spawned {
                    Ok(_) => rx.recv_timeout(UNMOUNT_WAIT).unwrap_or_else(|_| {
                        warn!(mountpoint = %self.mountpoint.display(),
                            "FUSE session still busy after unmount; leaving it to finish");
                        Ok(())
                    }),
                    Err(e) => Err(e),
                };
                res.map_err(|source| Error::Mount {
                    mountpoint: self.mountpoint.display().to_string(),
                    source,
                })
            }
            None => Ok(()),
        };
        res
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            warn!(error = %e, "unmount failed");
        }
    }
}
