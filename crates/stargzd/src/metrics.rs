//! The daemon's Prometheus endpoint: one registry holding the `fs` and `registry`
//! metrics handles, the daemon's own fallback counter and the process's own figures
//! (the `process_*` metrics the reference's Go client exposes), served as text on
//! `GET /metrics` at `metrics_address`.

use std::convert::Infallible;
use std::sync::Arc;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use remote_layer::MountError;

use crate::manager::client::ManagerClient;

/// The handles the daemon's libraries record into.
#[derive(Clone, Default)]
pub struct DaemonMetrics {
    pub fs: fs::FsMetrics,
    pub registry: registry::RegistryMetrics,
    /// Counted where the snapshotter runs (the daemon), never in a FUSE manager.
    pub fallbacks: FallbackMetrics,
    /// Learned prefetch, counted where layers are mounted.
    pub learned: crate::learned::LearnedMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

/// `stargz_layer_fallbacks_total{reason}`: layers a Prepare asked to mount lazily
/// that were downloaded in full instead, by the [`MountError::kind`] that made them.
#[derive(Clone, Default)]
pub struct FallbackMetrics {
    total: Family<Reason, Counter>,
}

impl FallbackMetrics {
    /// One more layer fell back for `reason`.
    pub fn record(&self, reason: &MountError) {
        self.total
            .get_or_create(&Reason {
                reason: reason.kind().to_string(),
            })
            .inc();
    }

    /// Layers counted for `reason` (a [`MountError::kind`]) so far.
    pub fn count(&self, reason: &str) -> u64 {
        self.total
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .get()
    }

    fn register(&self, registry: &mut Registry) {
        registry.sub_registry_with_prefix("stargz_layer").register(
            "fallbacks",
            "Layers downloaded in full instead of mounted lazily, by reason",
            self.total.clone(),
        );
    }

    /// The counter alone in Prometheus text form, without the closing `# EOF`.
    fn encode(&self) -> String {
        let mut reg = Registry::default();
        self.register(&mut reg);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &reg);
        out
    }
}

/// Where a scrape's text comes from: this process, or the FUSE manager process that
/// holds the layers (their mounts, fetches and cache are counted there) with this
/// process's fallback counter.
#[derive(Clone)]
pub enum Source {
    Local(DaemonMetrics),
    Manager(Arc<ManagerClient>, FallbackMetrics),
}

impl Source {
    async fn text(&self) -> Result<String> {
        match self {
            Source::Local(m) => Ok(m.encode()),
            Source::Manager(c, fallbacks) => {
                let text = c.metrics_text().await?;
                let body = text.strip_suffix("# EOF\n").unwrap_or(&text);
                Ok(format!("{body}{}# EOF\n", fallbacks.encode()))
            }
        }
    }
}

impl DaemonMetrics {
    /// Every metric of this process in Prometheus text form.
    pub fn encode(&self) -> String {
        self.encode_with(true)
    }

    /// The layer metrics (FUSE, cache, registry) alone: what a FUSE manager serves,
    /// the daemon adding its fallback counter.
    pub fn encode_layers(&self) -> String {
        self.encode_with(false)
    }

    fn encode_with(&self, fallbacks: bool) -> String {
        let mut reg = Registry::default();
        self.fs.register(&mut reg);
        self.registry.register(&mut reg);
        self.learned.register(&mut reg);
        if fallbacks {
            self.fallbacks.register(&mut reg);
        }
        reg.register_collector(Box::new(ProcessCollector));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
        out
    }
}

/// Binds `address` (host:port) and serves the metrics until the runtime ends.
pub async fn serve(address: &str, metrics: Source) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("metrics_address {address:?}: binding"))?;
    tracing::info!(address = %listener.local_addr()?, "serving metrics on /metrics");
    let metrics = Arc::new(metrics);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(answer(&req, &metrics).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection ended");
                }
            });
        }
    });
    Ok(())
}

async fn answer(req: &Request<Incoming>, metrics: &Source) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "not found\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
    }
    match metrics.text().await {
        Ok(text) => {
            let mut r = reply(StatusCode::OK, text);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "metrics scrape failed");
            reply(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n"))
        }
    }
}

/// This process's CPU time, memory, file descriptors and start time from `/proc`,
/// under the names Prometheus' Go client gives them.
#[derive(Debug)]
struct ProcessCollector;

/// The figures of one scrape; a value `/proc` does not give is left out.
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    start_time_seconds: Option<f64>,
    virtual_bytes: Option<f64>,
    resident_bytes: Option<f64>,
    open_fds: Option<f64>,
    max_fds: Option<f64>,
    max_virtual_bytes: Option<f64>,
}

impl ProcessStats {
    fn read() -> ProcessStats {
        // SAFETY: sysconf only reads a system constant.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| boot_time(&s));
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let mut st = parse_stat(&stat, ticks as f64, page as f64, boot);
        st.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as f64);
        st.max_fds = soft_limit(&limits, "Max open files");
        st.max_virtual_bytes = soft_limit(&limits, "Max address space");
        st
    }
}

/// CPU seconds, start time, virtual and resident size from `/proc/self/stat`.
fn parse_stat(stat: &str, ticks: f64, page: f64, boot: Option<f64>) -> ProcessStats {
    // Fields after the command name, which may itself hold spaces and parentheses.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return ProcessStats::default();
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is f[n - 3].
    let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let ticks = if ticks > 0.0 { ticks } else { 100.0 };
    ProcessStats {
        cpu_seconds: num(14).zip(num(15)).map(|(u, s)| (u + s) / ticks),
        start_time_seconds: num(22).zip(boot).map(|(t, b)| b + t / ticks),
        virtual_bytes: num(23),
        resident_bytes: num(24).map(|p| p * page),
        ..ProcessStats::default()
    }
}

/// `btime` of `/proc/stat`: boot time in seconds since the epoch.
fn boot_time(stat: &str) -> Option<f64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit of a `/proc/self/limits` row; `unlimited` as the largest u64, as the
/// Go client reports it.
fn soft_limit(limits: &str, name: &str) -> Option<f64> {
    let row = limits.lines().find(|l| l.starts_with(name))?;
    let soft = row[name.len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        Some(u64::MAX as f64)
    } else {
        soft.parse().ok()
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let st = ProcessStats::read();
        if let Some(v) = st.cpu_seconds {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                c.metric_type(),
            )?)?;
        }
        let gauges = [
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                st.start_time_seconds,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                st.virtual_bytes,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                st.resident_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                st.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                st.max_fds,
            ),
            (
                "process_virtual_memory_max_bytes",
                "Maximum amount of virtual memory available in bytes.",
                st.max_virtual_bytes,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_figures() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 \
                    8 0 5000 123456789 300 18446744073709551615";
        let st = parse_stat(stat, 100.0, 4096.0, Some(1_700_000_000.0));
        assert_eq!(st.cpu_seconds, Some(4.0));
        assert_eq!(st.start_time_seconds, Some(1_700_000_050.0));
        assert_eq!(st.virtual_bytes, Some(123_456_789.0));
        assert_eq!(st.resident_bytes, Some(300.0 * 4096.0));
        assert_eq!(
            parse_stat("garbage", 100.0, 4096.0, None),
            ProcessStats::default()
        );
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000.0)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n\
                      Max address space         unlimited            unlimited            bytes\n";
        assert_eq!(soft_limit(limits, "Max open files"), Some(1024.0));
        assert_eq!(
            soft_limit(limits, "Max address space"),
            Some(u64::MAX as f64)
        );
        let live = ProcessStats::read();
        assert!(
            live.cpu_seconds.is_some() && live.open_fds.unwrap_or(0.0) > 0.0,
            "{live:?}"
        );
    }

    #[test]
    fn endpoint_text_has_process_metrics() {
        let text = DaemonMetrics::default().encode();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(text.lines().any(|l| l.starts_with(name)), "{name}: {text}");
        }
    }
}
