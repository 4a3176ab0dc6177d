//! The daemon's Prometheus endpoint: one registry holding the `fs` and `registry`
//! metrics handles and the daemon's own fallback counter, served as text on
//! `GET /metrics` at `metrics_address`.

use std::convert::Infallible;
use std::sync::Arc;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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
        if fallbacks {
            self.fallbacks.register(&mut reg);
        }
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
