//! Prometheus counters of registry traffic: HTTP requests and failed requests by kind
//! (manifest, blob range, whole blob, token, other), behind one cloneable handle.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// What a request asked the registry for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RequestKind {
    Manifest,
    BlobRange,
    Blob,
    Token,
    Other,
}

impl RequestKind {
    fn label(self) -> &'static str {
        match self {
            RequestKind::Manifest => "manifest",
            RequestKind::BlobRange => "blob_range",
            RequestKind::Blob => "blob",
            RequestKind::Token => "token",
            RequestKind::Other => "other",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Request counters of every client built with this handle. Clones share the counts.
#[derive(Clone, Debug, Default)]
pub struct RegistryMetrics {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    requests: Family<KindLabels, Counter>,
    errors: Family<KindLabels, Counter>,
}

impl RegistryMetrics {
    /// Adds the counters to `registry` under the `stargz_registry_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let reg = registry.sub_registry_with_prefix("stargz_registry");
        reg.register(
            "requests",
            "HTTP requests sent to registries and token servers, by kind",
            self.inner.requests.clone(),
        );
        reg.register(
            "request_errors",
            "HTTP requests that failed (transport error or error status), by kind",
            self.inner.errors.clone(),
        );
    }

    /// Requests of `kind` so far.
    pub fn requests(&self, kind: &str) -> u64 {
        self.count(&self.inner.requests, kind)
    }

    /// Failed requests of `kind` so far.
    pub fn errors(&self, kind: &str) -> u64 {
        self.count(&self.inner.errors, kind)
    }

    fn count(&self, family: &Family<KindLabels, Counter>, kind: &str) -> u64 {
        [
            RequestKind::Manifest,
            RequestKind::BlobRange,
            RequestKind::Blob,
            RequestKind::Token,
            RequestKind::Other,
        ]
        .into_iter()
        .find(|k| k.label() == kind)
        .and_then(|k| family.get(&KindLabels { kind: k.label() }).map(|c| c.get()))
        .unwrap_or(0)
    }

    pub(crate) fn request(&self, kind: RequestKind) {
        self.inner
            .requests
            .get_or_create(&KindLabels { kind: kind.label() })
            .inc();
    }

    pub(crate) fn error(&self, kind: RequestKind) {
        self.inner
            .errors
            .get_or_create(&KindLabels { kind: kind.label() })
            .inc();
    }
}
