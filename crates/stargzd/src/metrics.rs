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

/// The handles the daemon's libraries record into.
#[derive(Clone, Default)]
pub struct DaemonMetrics {
    pub fs: fs::FsMetrics,
    pub registry: registry::RegistryMetrics,
}

impl DaemonMetrics {
    fn encode(&self) -> String {
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
pub async fn serve(address: &str, metrics: DaemonMetrics) -> Result<()> {
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
                    async move { Ok::<_, Infallible>(answer(&req, &metrics)) }
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

fn answer(req: &Request<Incoming>, metrics: &DaemonMetrics) -> Response<Full<Bytes>> {
    let mut resp = if req.uri().path() != "/metrics" {
        Response::new(Full::new(Bytes::from_static(b"not found\n")))
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        Response::new(Full::new(Bytes::from_static(b"method not allowed\n")))
    } else {
        let mut r = Response::new(Full::new(Bytes::from(metrics.encode())));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        return r;
    };
    *resp.status_mut() = if req.uri().path() != "/metrics" {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::METHOD_NOT_ALLOWED
    };
    resp
}
