//! The daemon's Prometheus endpoint: one registry holding the `fs` and `registry`
//! metrics handles, served as text on `GET /metrics` at `metrics_address`.

use std::convert::Infallible;
use std::sync::Arc;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;

use crate::manager::client::ManagerClient;

/// The handles the daemon's libraries record into.
#[derive(Clone, Default)]
pub struct DaemonMetrics {
    pub fs: fs::FsMetrics,
    pub registry: registry::RegistryMetrics,
}

/// Where a scrape's text comes from: this process, or the FUSE manager process that
/// holds the layers (their mounts, fetches and cache are counted there).
#[derive(Clone)]
pub enum Source {
    Local(DaemonMetrics),
    Manager(Arc<ManagerClient>),
}

impl Source {
    async fn text(&self) -> Result<String> {
        match self {
            Source::Local(m) => Ok(m.encode()),
            Source::Manager(c) => c.metrics_text().await,
        }
    }
}

impl DaemonMetrics {
    /// Every metric in Prometheus text form.
    pub fn encode(&self) -> String {
        let mut reg = Registry::default();
        self.fs.register(&mut reg);
        self.registry.register(&mut reg);
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
