//! An OCI distribution client: references, host configuration, credentials,
//! token and basic authentication, manifests and indexes, pushes, and a blob
//! reader built for random access (multi-range requests, redirects, retries).
//!
//! It knows nothing of eStargz. Built on `reqwest` (rustls, HTTP/2 over TLS),
//! `tokio`, `serde`, `thiserror`, `tracing`, `docker_credential` and
//! `prometheus-client` ([`RegistryMetrics`], request counters).
//!
//! ```no_run
//! # async fn demo() -> registry::Result<()> {
//! use std::sync::Arc;
//! use registry::{Client, DockerConfigKeychain, Platform, Reference, RegistryConfig};
//! let client = Client::new(RegistryConfig::default(), Arc::new(DockerConfigKeychain::from_env()))?;
//! let r = Reference::parse("ghcr.io/org/app:1.0")?;
//! let img = client.resolve_image(&r, &Platform::host()).await?;
//! let layer = client.blob_reader(&r, img.manifest.layers[0].digest.clone(), Some(img.manifest.layers[0].size));
//! let head = layer.read_ranges(&[0..512, 4096..8192]).await?;
//! # let _ = head; Ok(()) }
//! ```

mod auth;
mod blob;
mod body;
mod client;
mod config;
mod credprovider;
mod crikeychain;
mod digest;
mod error;
mod hostsdir;
mod keychain;
mod kubeconfig;
mod manifest;
mod metrics;
mod multipart;
mod redact;
mod reference;

pub use blob::{coalesce, BlobReader, RangeSink};
pub use client::Client;
pub use config::{
    is_local_host, BlobConfig, CredentialProviderKeychainConfig, CriKeychainConfig, HostConfig,
    KubeconfigKeychainConfig, MirrorConfig, RegistryConfig, ResolverConfig, CRI_CREDENTIALS_FILE,
    DEFAULT_IMAGE_SERVICE_PATH, DEFAULT_REQUEST_TIMEOUT_SEC,
};
pub use config::{ClientTls, DEFAULT_HOST_KEY};
pub use credprovider::{
    image_matches, parse_go_duration, CredentialProvider, CredentialProviderConfig,
    CredentialProviderKeychain, CredentialProviderOptions, EnvVar,
};
pub use crikeychain::{
    CriKeychain, CriKeychainOptions, RecordedCredential, DEFAULT_CRI_CREDENTIAL_TTL,
    DEFAULT_CRI_MAX_ENTRIES,
};
pub use digest::{verify_digest, Algorithm, Digest, DigestHasher, ParseDigestError};
pub use error::{Error, Result};
pub use hostsdir::{load_hosts_dir, HostsDir};
pub use keychain::{
    Anonymous, CandidatesFuture, ChainKeychain, Credential, DockerConfigKeychain, Keychain,
    KeychainFuture, StaticKeychain,
};
pub use kubeconfig::{KubeApiTarget, KubeconfigKeychain, KubeconfigKeychainOptions};
pub use manifest::{
    select_platform, Descriptor, FetchedManifest, ImageIndex, ImageManifest, Manifest, Platform,
    PushBlobOptions, PushOutcome, ResolvedImage, DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST, OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST,
};
pub use metrics::RegistryMetrics;
pub use redact::{redact_text, redact_url};
pub use reference::{Reference, DOCKER_HUB};

/// Entry points for the fuzz targets: the parsers that see registry-controlled bytes.
#[doc(hidden)]
pub mod fuzzing {
    /// Parses a `WWW-Authenticate` value; true when it is a scheme we speak.
    pub fn parse_challenge(v: &str) -> bool {
        crate::auth::parse_challenge(v).is_some()
    }
    /// Parses a token endpoint reply and builds the cached token from it.
    pub fn parse_token_response(body: &[u8]) -> bool {
        match serde_json::from_slice::<crate::auth::TokenResponse>(body) {
            Ok(t) => {
                let _ = crate::auth::CachedToken::new(String::new(), t.expires_in);
                true
            }
            Err(_) => false,
        }
    }
    /// Parses a `multipart/byteranges` body for a blob of `size` bytes.
    pub fn parse_multipart(body: &[u8], boundary: &str, size: u64) -> usize {
        crate::multipart::parse_multipart(&bytes::Bytes::copy_from_slice(body), boundary, size)
            .map(|p| p.len())
            .unwrap_or(0)
    }
    /// Parses a `Content-Range` value.
    pub fn parse_content_range(v: &str) -> bool {
        crate::multipart::parse_content_range(v).is_some()
    }
    /// Parses a `Content-Type` boundary parameter.
    pub fn boundary_of(ct: &str) -> Option<String> {
        crate::multipart::boundary_of(ct)
    }
    /// Parses a `Retry-After` value.
    pub fn parse_retry_after(v: &str) -> Option<std::time::Duration> {
        crate::client::parse_retry_after(v)
    }
    /// Parses manifest or index JSON.
    pub fn parse_manifest(media_type: &str, body: &[u8]) -> bool {
        crate::manifest::FetchedManifest {
            bytes: bytes::Bytes::copy_from_slice(body),
            digest: crate::Digest::sha256(body),
            media_type: media_type.to_string(),
        }
        .parse()
        .is_ok()
    }
    /// Redacts URLs in free text.
    pub fn redact_text(s: &str) -> String {
        crate::redact::redact_text(s)
    }
}
