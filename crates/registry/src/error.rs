//! Error type of the crate: one variant per situation a user can act on.

use std::time::Duration;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to a registry.
///
/// Messages name hosts, repositories, digests and credential *sources*, never
/// credential values.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The image reference could not be parsed.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },

    /// The host configuration is unusable (bad CA file, bad header, ...).
    #[error("invalid registry configuration: {0}")]
    Config(String),

    /// DNS lookup of the host failed.
    #[error("cannot resolve host {host}: {detail}")]
    UnknownHost { host: String, detail: String },

    /// Nothing listens on the host's port.
    #[error("connection refused by {host}")]
    ConnectionRefused { host: String },

    /// The TLS handshake failed: untrusted certificate, wrong name, plain HTTP server...
    #[error("TLS failure talking to {host}: {detail} (configure a CA file for it, or mark it insecure if it speaks plain HTTP)")]
    Tls { host: String, detail: String },

    /// Any other connection-level failure (reset, body cut short, ...).
    #[error("connection to {host} failed: {detail}")]
    Connection { host: String, detail: String },

    /// A request or a read did not complete in time.
    #[error("request to {host} timed out after {after:?}")]
    Timeout { host: String, after: Duration },

    /// The registry refused the credentials (or their absence).
    #[error("authentication to {host} failed (401) with credentials from {credentials_source}")]
    Unauthorized {
        host: String,
        credentials_source: String,
    },

    /// The registry asks for authentication and no source had credentials for it.
    #[error("authentication to {host} required (401) and no credentials for it from {credentials_source}")]
    NoCredentials {
        host: String,
        credentials_source: String,
    },

    /// The credentials were accepted but do not grant access.
    #[error("access to {what} on {host} denied (403)")]
    Forbidden { host: String, what: String },

    /// The manifest (tag or digest) does not exist in the repository.
    #[error("manifest {reference} not found")]
    ManifestNotFound { reference: String },

    /// The blob does not exist in the repository.
    #[error("blob {digest} not found in {host}/{repository}")]
    BlobNotFound {
        host: String,
        repository: String,
        digest: String,
    },

    /// The registry keeps answering 429.
    #[error("rate limited by {host} (429){}", retry_after.map(|d| format!(", retry after {d:?}")).unwrap_or_default())]
    RateLimited {
        host: String,
        retry_after: Option<Duration>,
    },

    /// Content did not hash to the digest it was fetched by.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },

    /// A digest string is malformed or uses an unsupported algorithm.
    #[error("invalid digest {0:?}")]
    InvalidDigest(String),

    /// No manifest in an index matches the wanted platform.
    #[error("no manifest for platform {platform} in index {reference}")]
    PlatformNotFound { reference: String, platform: String },

    /// An unexpected HTTP status.
    #[error("{method} {url} answered {status}: {body}")]
    Status {
        method: String,
        url: String,
        status: u16,
        body: String,
    },

    /// The registry answered something that does not follow the protocol.
    #[error("protocol error from {host}: {detail}")]
    Protocol { host: String, detail: String },

    /// A credential source failed (helper crashed, config unreadable...).
    #[error("credentials from {source_name}: {detail}")]
    Credentials { source_name: String, detail: String },

    /// Local I/O (reading a config or CA file).
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl Error {
    /// Whether retrying the same request may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Connection { .. }
                | Error::Timeout { .. }
                | Error::RateLimited { .. }
                | Error::ConnectionRefused { .. }
        ) || matches!(self, Error::Status { status, .. } if *status >= 500)
    }

    pub(crate) fn protocol(host: &str, detail: impl Into<String>) -> Self {
        Error::Protocol {
            host: host.to_string(),
            detail: detail.into(),
        }
    }

    /// Classifies a reqwest transport error into an actionable variant.
    pub(crate) fn from_reqwest(host: &str, timeout: Duration, e: &reqwest::Error) -> Self {
        let chain = error_chain(e);
        let lower = chain.to_ascii_lowercase();
        if e.is_timeout() || lower.contains("timed out") {
            return Error::Timeout {
                host: host.to_string(),
                after: timeout,
            };
        }
        if lower.contains("dns error")
            || lower.contains("failed to lookup address")
            || lower.contains("name or service not known")
        {
            return Error::UnknownHost {
                host: host.to_string(),
                detail: chain,
            };
        }
        if lower.contains("connection refused") {
            return Error::ConnectionRefused {
                host: host.to_string(),
            };
        }
        if lower.contains("certificate")
            || lower.contains("tls")
            || lower.contains("handshake")
            || lower.contains("invalidcontenttype")
            || lower.contains("corrupt message")
        {
            return Error::Tls {
                host: host.to_string(),
                detail: chain,
            };
        }
        Error::Connection {
            host: host.to_string(),
            detail: chain,
        }
    }
}

/// Joins an error with its sources, because reqwest's top-level message
/// ("error sending request") hides the useful part.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let m = src.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = src.source();
    }
    // The HTTP stack names the URL it was fetching; signed URLs must not leak.
    crate::redact::redact_text(&s)
}
