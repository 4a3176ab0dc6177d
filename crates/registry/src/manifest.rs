//! Manifest and index documents (OCI and Docker media types), platforms,
//! and the client operations that fetch and push them.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use futures::FutureExt;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::Method;
use serde::{Deserialize, Serialize};

use crate::client::{Client, Scope, Spec, Subject};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::reference::Reference;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest v2 schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// OCI gzip layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Docker gzip layer.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// A content descriptor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
}

impl Descriptor {
    /// A descriptor for `data` with the given media type.
    pub fn for_bytes(media_type: &str, data: &[u8]) -> Self {
        Descriptor {
            media_type: media_type.to_string(),
            digest: Digest::sha256(data),
            size: data.len() as u64,
            urls: None,
            annotations: None,
            platform: None,
            artifact_type: None,
        }
    }
}

/// An image manifest (OCI or Docker v2 schema 2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
}

/// An image index / manifest list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// A platform (`os/architecture[/variant]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    #[serde(
        rename = "os.features",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_features: Option<Vec<String>>,
}

impl Platform {
    /// `os/arch[/variant]`, e.g. `linux/arm64/v8`.
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() < 2 || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(Error::Config(format!(
                "platform {s:?} is not os/arch[/variant]"
            )));
        }
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
            os_version: None,
            os_features: None,
        })
    }

    /// The platform this program runs on, in OCI terms.
    pub fn host() -> Self {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            "powerpc64" => ("ppc64le", None),
            "s390x" => ("s390x", None),
            "riscv64" => ("riscv64", None),
            other => (other, None),
        };
        Platform {
            os: std::env::consts::OS.to_string(),
            architecture: arch.to_string(),
            variant: variant.map(str::to_string),
            os_version: None,
            os_features: None,
        }
    }

    /// Whether `self` (wanted) accepts `other` (offered). A missing variant on
    /// either side matches, and arm64 treats `v8` as the default.
    pub fn matches(&self, other: &Platform) -> bool {
        if self.os != other.os || self.architecture != other.architecture {
            return false;
        }
        let norm = |v: &Option<String>| match (self.architecture.as_str(), v.as_deref()) {
            ("arm64", Some("v8")) | ("arm64", None) => None,
            (_, v) => v.map(str::to_string),
        };
        match (norm(&self.variant), norm(&other.variant)) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A manifest as fetched: the exact bytes, their digest and media type.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub digest: Digest,
    pub media_type: String,
}

/// A fetched manifest, decoded.
#[derive(Clone, Debug)]
pub enum Manifest {
    Image(Box<ImageManifest>),
    Index(ImageIndex),
}

impl FetchedManifest {
    /// Decodes by media type (falling back to the document's own `mediaType`).
    pub fn parse(&self) -> Result<Manifest> {
        let bad = |e: serde_json::Error| Error::Protocol {
            host: String::new(),
            detail: format!("manifest {}: {e}", self.digest),
        };
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
        }
        let mt = match self.media_type.as_str() {
            OCI_INDEX | DOCKER_MANIFEST_LIST | OCI_MANIFEST | DOCKER_MANIFEST => {
                self.media_type.clone()
            }
            _ => {
                let p: Probe = serde_json::from_slice(&self.bytes).map_err(bad)?;
                match (p.media_type, p.manifests) {
                    (Some(m), _) => m,
                    (None, Some(_)) => OCI_INDEX.to_string(),
                    (None, None) => OCI_MANIFEST.to_string(),
                }
            }
        };
        match mt.as_str() {
            OCI_INDEX | DOCKER_MANIFEST_LIST => Ok(Manifest::Index(
                serde_json::from_slice(&self.bytes).map_err(bad)?,
            )),
            OCI_MANIFEST | DOCKER_MANIFEST => Ok(Manifest::Image(
                serde_json::from_slice(&self.bytes).map_err(bad)?,
            )),
            other => Err(Error::Protocol {
                host: String::new(),
                detail: format!("unsupported manifest media type {other:?}"),
            }),
        }
    }
}

/// An image resolved to one platform.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// Digest of the platform manifest.
    pub digest: Digest,
    pub manifest: ImageManifest,
    /// The raw manifest bytes.
    pub raw: Bytes,
    /// The index it was picked from, if the reference named one.
    pub index: Option<(Digest, ImageIndex)>,
}

/// What a blob push did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// HEAD said the registry already had it.
    AlreadyExists,
    /// Mounted from another repository of the same registry.
    Mounted,
    /// Uploaded in one PUT.
    Uploaded,
    /// Uploaded in this many PATCH chunks.
    UploadedChunked(usize),
}

/// Options for [`Client::push_blob`].
#[derive(Clone, Debug, Default)]
pub struct PushBlobOptions {
    /// Upload in PATCH chunks of this size instead of one PUT.
    pub chunk_size: Option<usize>,
    /// Try a cross-repository mount from this repository (same registry) first.
    pub mount_from: Option<String>,
}

fn accept_manifests() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        ACCEPT,
        HeaderValue::from_static(
            "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json",
        ),
    );
    h
}

impl Client {
    /// Fetches a manifest or index by tag or digest. Content fetched by digest
    /// is verified; content fetched by tag is verified against the
    /// `Docker-Content-Digest` header when present.
    pub async fn get_manifest(&self, r: &Reference) -> Result<FetchedManifest> {
        self.fetch_manifest(r, &[])
            .await?
            .ok_or_else(|| Error::ManifestNotFound {
                reference: r.to_string(),
            })
    }

    /// [`Client::get_manifest`] of a manifest that may well not exist (an optional
    /// companion such as a tag named after another manifest's digest): a 404 is `None`,
    /// an answer and not a failed request (it is not counted as a registry error), and
    /// ends the look-up at the first endpoint that gives it.
    pub async fn get_manifest_if_exists(&self, r: &Reference) -> Result<Option<FetchedManifest>> {
        self.fetch_manifest(r, &[404]).await
    }

    async fn fetch_manifest(
        &self,
        r: &Reference,
        pass: &'static [u16],
    ) -> Result<Option<FetchedManifest>> {
        let scope = Scope::pull(r.repository());
        let mref = r.manifest_ref();
        self.with_endpoints(r.registry(), |ep| {
            let scope = &scope;
            let mref = mref.clone();
            async move {
                let url = ep
                    .base
                    .join(&format!("{}/manifests/{}", r.repository(), mref))
                    .map_err(|e| Error::Config(e.to_string()))?;
                let spec = Spec {
                    method: Method::GET,
                    url,
                    headers: accept_manifests(),
                    body: None,
                    subject: Subject::Manifest(r.to_string()),
                    scope,
                    attempt_timeout: None,
                    deadline: self.deadline(),
                    redirect_cache: None,
                    pass_status: pass,
                };
                let host = ep.host.clone();
                let read = move |resp: reqwest::Response| {
                    let host = host.clone();
                    async move {
                        if resp.status().as_u16() == 404 {
                            return Ok(None);
                        }
                        let mt = resp
                            .headers()
                            .get(CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .split(';')
                            .next()
                            .unwrap_or("")
                            .trim()
                            .to_string();
                        let hdr_digest = resp
                            .headers()
                            .get("docker-content-digest")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|s| Digest::parse(s).ok());
                        // Bounded by the bytes received: a chunked body has no length to check.
                        let bytes = crate::body::read_limited(
                            resp,
                            &host,
                            crate::body::MAX_MANIFEST_BYTES,
                            "manifest",
                        )
                        .await?;
                        Ok(Some((bytes, mt, hdr_digest)))
                    }
                    .boxed()
                };
                let Some((bytes, media_type, hdr_digest)) = self.execute(&ep, &spec, &read).await?
                else {
                    return Ok(None);
                };
                let digest = match (r.digest(), hdr_digest) {
                    (Some(d), _) => {
                        crate::digest::verify_digest(d, &format!("manifest {r}"), &bytes)?;
                        d.clone()
                    }
                    (None, Some(d)) => {
                        crate::digest::verify_digest(&d, &format!("manifest {r}"), &bytes)?;
                        d
                    }
                    (None, None) => Digest::sha256(&bytes),
                };
                Ok(Some(FetchedManifest {
                    bytes,
                    digest,
                    media_type,
                }))
            }
        })
        .await
    }

    /// Fetches the manifest for `platform`, descending through an index if the
    /// reference names one.
    pub async fn resolve_image(&self, r: &Reference, platform: &Platform) -> Result<ResolvedImage> {
        let top = self.get_manifest(r).await?;
        match top.parse()? {
            Manifest::Image(m) => Ok(ResolvedImage {
                digest: top.digest,
                manifest: *m,
                raw: top.bytes,
                index: None,
            }),
            Manifest::Index(idx) => {
                let d = select_platform(&idx, platform).ok_or_else(|| Error::PlatformNotFound {
                    reference: r.to_string(),
                    platform: platform.to_string(),
                })?;
                let child = self.get_manifest(&r.at_digest(d.digest.clone())).await?;
                match child.parse()? {
                    Manifest::Image(m) => Ok(ResolvedImage {
                        digest: child.digest,
                        manifest: *m,
                        raw: child.bytes,
                        index: Some((top.digest, idx)),
                    }),
                    Manifest::Index(_) => Err(Error::Protocol {
                        host: r.registry().into(),
                        detail: "nested index".into(),
                    }),
                }
            }
        }
    }

    /// Fetches a (small) blob such as an image config whole, verifying its digest.
    pub async fn get_blob(&self, r: &Reference, digest: &Digest) -> Result<Bytes> {
        self.blob_reader(r, digest.clone(), None).read_all().await
    }

    /// Size of a blob if the repository has it, `None` if not.
    pub async fn blob_exists(&self, r: &Reference, digest: &Digest) -> Result<Option<u64>> {
        match self.blob_reader(r, digest.clone(), None).size().await {
            Ok(s) => Ok(Some(s)),
            Err(Error::BlobNotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Uploads a blob unless the repository already has it: tries a
    /// cross-repository mount, then a monolithic or chunked upload.
    pub async fn push_blob(
        &self,
        r: &Reference,
        data: Bytes,
        opts: &PushBlobOptions,
    ) -> Result<(Digest, PushOutcome)> {
        let digest = Digest::sha256(&data);
        if self.blob_exists(r, &digest).await?.is_some() {
            tracing::debug!(%digest, "blob already present, skipping upload");
            return Ok((digest, PushOutcome::AlreadyExists));
        }
        let mut scope = Scope::push(r.repository());
        if let Some(from) = &opts.mount_from {
            scope = scope.and_pull(from);
        }
        let ep = self
            .endpoints(r.registry())?
            .pop()
            .ok_or_else(|| Error::Config("no endpoint".into()))?;
        let repo = r.repository();

        let mut start = ep
            .base
            .join(&format!("{repo}/blobs/uploads/"))
            .map_err(|e| Error::Config(e.to_string()))?;
        if let Some(from) = &opts.mount_from {
            start
                .query_pairs_mut()
                .append_pair("mount", &digest.to_string())
                .append_pair("from", from);
        }
        let (status, location) = self
            .simple(
                &ep,
                &scope,
                Method::POST,
                start,
                HeaderMap::new(),
                Some(Bytes::new()),
                Subject::Other(format!("upload to {repo}")),
                &[],
            )
            .await?;
        if status == 201 {
            return Ok((digest, PushOutcome::Mounted));
        }
        let mut loc = location
            .ok_or_else(|| Error::protocol(&ep.host, "upload started without a Location"))?;
        let mut chunks = 0;
        if let Some(cs) = opts.chunk_size.filter(|c| *c > 0) {
            let mut off = 0usize;
            while off < data.len() {
                let end = (off + cs).min(data.len());
                let mut h = HeaderMap::new();
                h.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                let cr = HeaderValue::from_str(&format!("{}-{}", off, end - 1))
                    .map_err(|e| Error::Config(e.to_string()))?;
                h.insert("content-range", cr);
                let (_, l) = self
                    .simple(
                        &ep,
                        &scope,
                        Method::PATCH,
                        loc.clone(),
                        h,
                        Some(data.slice(off..end)),
                        Subject::Other(format!("upload chunk to {repo}")),
                        &[],
                    )
                    .await?;
                loc = l.ok_or_else(|| {
                    Error::protocol(&ep.host, "PATCH answered without a Location")
                })?;
                off = end;
                chunks += 1;
            }
        }
        loc.query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let body = if chunks > 0 {
            Bytes::new()
        } else {
            data.clone()
        };
        self.simple(
            &ep,
            &scope,
            Method::PUT,
            loc,
            h,
            Some(body),
            Subject::Other(format!("upload to {repo}")),
            &[],
        )
        .await?;
        Ok((
            digest,
            if chunks > 0 {
                PushOutcome::UploadedChunked(chunks)
            } else {
                PushOutcome::Uploaded
            },
        ))
    }

    /// Pushes a manifest under the reference's tag (or digest); returns its digest.
    pub async fn push_manifest(
        &self,
        r: &Reference,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest> {
        let digest = Digest::sha256(&bytes);
        if let Some(d) = r.digest() {
            crate::digest::verify_digest(d, "manifest to push", &bytes)?;
        }
        let scope = Scope::push(r.repository());
        let ep = self
            .endpoints(r.registry())?
            .pop()
            .ok_or_else(|| Error::Config("no endpoint".into()))?;
        let url = ep
            .base
            .join(&format!(
                "{}/manifests/{}",
                r.repository(),
                r.tag()
                    .map(str::to_string)
                    .unwrap_or_else(|| digest.to_string())
            ))
            .map_err(|e| Error::Config(e.to_string()))?;
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_str(media_type).map_err(|e| Error::Config(e.to_string()))?,
        );
        self.simple(
            &ep,
            &scope,
            Method::PUT,
            url,
            h,
            Some(bytes),
            Subject::Manifest(r.to_string()),
            &[],
        )
        .await?;
        Ok(digest)
    }

    /// Pushes a value as JSON manifest, returning the digest and the exact bytes.
    pub async fn push_manifest_json<T: Serialize>(
        &self,
        r: &Reference,
        media_type: &str,
        m: &T,
    ) -> Result<(Digest, Bytes)> {
        let bytes = Bytes::from(serde_json::to_vec(m).map_err(|e| Error::Config(e.to_string()))?);
        let d = self.push_manifest(r, media_type, bytes.clone()).await?;
        Ok((d, bytes))
    }

    /// A request whose answer matters only by status and `Location`.
    #[allow(clippy::too_many_arguments)]
    async fn simple(
        &self,
        ep: &crate::client::Endpoint,
        scope: &Scope,
        method: Method,
        url: url::Url,
        headers: HeaderMap,
        body: Option<Bytes>,
        subject: Subject,
        pass: &[u16],
    ) -> Result<(u16, Option<url::Url>)> {
        let spec = Spec {
            method,
            url: url.clone(),
            headers,
            body,
            subject,
            scope,
            attempt_timeout: None,
            deadline: self.deadline(),
            redirect_cache: None,
            pass_status: pass,
        };
        let read = move |resp: reqwest::Response| {
            let base = url.clone();
            async move {
                let loc = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|l| base.join(l).ok());
                Ok((resp.status().as_u16(), loc))
            }
            .boxed()
        };
        self.execute(ep, &spec, &read).await
    }
}

/// Picks the first index entry matching `want`.
pub fn select_platform<'a>(idx: &'a ImageIndex, want: &Platform) -> Option<&'a Descriptor> {
    idx.manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| want.matches(p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms() {
        let want = Platform::parse("linux/arm64").expect("p");
        assert!(want.matches(&Platform::parse("linux/arm64/v8").expect("p")));
        assert!(!want.matches(&Platform::parse("linux/amd64").expect("p")));
        let armv7 = Platform::parse("linux/arm/v7").expect("p");
        assert!(!armv7.matches(&Platform::parse("linux/arm/v6").expect("p")));
        assert!(Platform::parse("linux").is_err());
        assert_eq!(Platform::host().os, std::env::consts::OS);
    }
}
