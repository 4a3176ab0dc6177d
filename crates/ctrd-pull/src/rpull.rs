//! Pulling an image into containerd through its gRPC API (`containerd-client`)
//! so a remote snapshotter can mount eStargz layers lazily: manifest and config
//! go into the content store, each layer's snapshot is prepared with the labels
//! the stargz snapshotter reads, and layers it refuses are fetched and unpacked.

use std::collections::HashMap;
use std::path::Path;

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, Image, InfoRequest, UpdateImageRequest, WriteAction,
    WriteContentRequest,
};
use containerd_client::services::v1::{
    CreateRequest as LeaseCreateRequest, DeleteRequest as LeaseDeleteRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request};
use containerd_client::types::Descriptor as CDescriptor;
use futures::StreamExt;
use registry::{Client, Descriptor, Platform, Reference};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt;

use convert::Store;

use crate::error::{Error, Result};

/// Labels the stargz snapshotter reads to fetch a layer itself.
pub use remote_layer::label::STARGZ_DIGEST as STARGZ_DIGEST_LABEL;
pub use remote_layer::label::STARGZ_LAYERS as STARGZ_LAYERS_LABEL;
pub use remote_layer::label::STARGZ_REFERENCE as STARGZ_REFERENCE_LABEL;
pub use remote_layer::label::STARGZ_SKIP_VERIFY as STARGZ_SKIP_VERIFY_LABEL;
/// Label naming the snapshot a prepared one becomes once committed.
pub use remote_layer::label::TARGET_SNAPSHOT_REF as SNAPSHOT_REF_LABEL;

/// containerd rejects labels larger than this (key plus value).
const MAX_LABEL_SIZE: usize = 4096;
const WRITE_CHUNK: usize = 1 << 20;

/// How to pull.
#[derive(Clone, Debug)]
pub struct RpullOptions {
    /// containerd's socket.
    pub address: String,
    pub namespace: String,
    pub snapshotter: String,
    pub platform: Platform,
    /// Ask the snapshotter not to verify layer contents.
    pub skip_content_verify: bool,
}

/// What a pull did.
#[derive(Clone, Debug)]
pub struct RpullReport {
    /// The image manifest pulled.
    pub manifest: oci_digest::Digest,
    /// Layers the snapshotter mounts remotely.
    pub remote: usize,
    /// Layers fetched and unpacked here.
    pub unpacked: usize,
    /// Layers whose snapshot already existed.
    pub existing: usize,
    /// The top snapshot.
    pub chain_id: String,
}

fn rpc(what: &str, s: containerd_client::tonic::Status) -> Error {
    Error::Containerd(format!("{what}: {}", s.message()))
}

struct Ctd {
    channel: Channel,
    namespace: String,
    /// The lease every request of the pull is made under, so containerd's garbage
    /// collector keeps its content and snapshots until the image record names them.
    lease: Option<String>,
}

/// How long a pull's lease outlives a crashed `rpull`, as `ctr` does.
const LEASE_EXPIRY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl Ctd {
    fn req<T>(&self, t: T) -> Request<T> {
        let mut r = Request::new(t);
        if let Ok(v) = self.namespace.parse() {
            r.metadata_mut().insert("containerd-namespace", v);
        }
        if let Some(Ok(v)) = self.lease.as_ref().map(|l| l.parse()) {
            r.metadata_mut().insert("containerd-lease", v);
        }
        r
    }

    /// Creates the pull's lease (expiring by itself should the pull never end it).
    async fn start_lease(&mut self) -> Result<()> {
        let now = std::time::SystemTime::now();
        let id = format!(
            "rpull-{}",
            now.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let mut labels = HashMap::new();
        labels.insert(
            "containerd.io/gc.expire".to_string(),
            rfc3339_utc(now + LEASE_EXPIRY),
        );
        LeasesClient::new(self.channel.clone())
            .create(self.req(LeaseCreateRequest {
                id: id.clone(),
                labels,
            }))
            .await
            .map_err(|s| rpc("lease create", s))?;
        self.lease = Some(id);
        Ok(())
    }

    /// Ends the lease: from now on the image record keeps what the pull made.
    async fn end_lease(&mut self) {
        let Some(id) = self.lease.take() else {
            return;
        };
        let res = LeasesClient::new(self.channel.clone())
            .delete(self.req(LeaseDeleteRequest {
                id: id.clone(),
                sync: false,
            }))
            .await;
        if let Err(s) = res {
            tracing::warn!(lease = %id, error = %s.message(), "could not end the pull's lease; it expires by itself");
        }
    }

    async fn has_content(&self, digest: &str) -> Result<bool> {
        let mut c = ContentClient::new(self.channel.clone());
        match c
            .info(self.req(InfoRequest {
                digest: digest.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(rpc("content info", s)),
        }
    }

    /// Writes `data` (or the file at `path`) into the content store under `digest`.
    async fn write_content(
        &self,
        digest: &str,
        size: u64,
        source: ContentSource<'_>,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        if self.has_content(digest).await? && labels.is_empty() {
            return Ok(());
        }
        let reference = format!("rpull-{digest}");
        let mut reqs: Vec<WriteContentRequest> = Vec::new();
        let base = WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: reference.clone(),
            total: size as i64,
            expected: digest.to_string(),
            offset: 0,
            data: Vec::new(),
            labels: HashMap::new(),
        };
        // Files are streamed a chunk at a time; small documents go in one message.
        let stream: futures::stream::BoxStream<'static, WriteContentRequest> = match source {
            ContentSource::Bytes(b) => {
                reqs.push(WriteContentRequest {
                    action: WriteAction::Commit as i32,
                    data: b.to_vec(),
                    labels,
                    ..base
                });
                futures::stream::iter(reqs).boxed()
            }
            ContentSource::File(p) => {
                let f = tokio::fs::File::open(p)
                    .await
                    .map_err(|e| Error::io(format!("opening {}", p.display()), e))?;
                let state = (Some(f), 0u64, Some(labels));
                futures::stream::unfold(state, move |(f, off, labels)| {
                    let base = base.clone();
                    async move {
                        let mut f = f?;
                        let mut buf = vec![0u8; WRITE_CHUNK];
                        let n = f.read(&mut buf).await.ok()?;
                        if n == 0 {
                            let labels = labels?;
                            let commit = WriteContentRequest {
                                action: WriteAction::Commit as i32,
                                offset: off as i64,
                                labels,
                                ..base
                            };
                            return Some((commit, (None, off, None)));
                        }
                        buf.truncate(n);
                        let w = WriteContentRequest {
                            offset: off as i64,
                            data: buf,
                            ..base
                        };
                        Some((w, (Some(f), off + n as u64, labels)))
                    }
                })
                .boxed()
            }
        };
        let mut c = ContentClient::new(self.channel.clone());
        let resp = c.write(self.req(stream)).await;
        match resp {
            Ok(r) => {
                let mut s = r.into_inner();
                while let Some(m) = s.next().await {
                    match m {
                        Ok(_) => {}
                        Err(st) if st.code() == Code::AlreadyExists => break,
                        Err(st) => return Err(rpc("content write", st)),
                    }
                }
                Ok(())
            }
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => Err(rpc("content write", s)),
        }
    }
}

enum ContentSource<'a> {
    Bytes(&'a [u8]),
    File(&'a Path),
}

fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(p) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{p} {d}").as_bytes()))
            ),
        };
        out.push(next);
    }
    out
}

/// Digests of this layer and the ones after it, cut to fit in a label.
fn layers_label(layers: &[Descriptor]) -> String {
    let mut s = String::new();
    for l in layers {
        let d = l.digest.to_string();
        let extra = if s.is_empty() { d.len() } else { d.len() + 1 };
        if STARGZ_LAYERS_LABEL.len() + s.len() + extra > MAX_LABEL_SIZE {
            break;
        }
        if !s.is_empty() {
            s.push(',');
        }
        s.push_str(&d);
    }
    s
}

fn cdesc(d: &Descriptor) -> CDescriptor {
    CDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.to_string(),
        size: d.size as i64,
        annotations: d
            .annotations
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
    }
}

/// Pulls `reference` into containerd, letting the snapshotter mount layers remotely.
pub async fn rpull(
    client: &Client,
    reference: &Reference,
    opts: &RpullOptions,
    workdir: &Path,
) -> Result<RpullReport> {
    let channel = containerd_client::connect(&opts.address)
        .await
        .map_err(|e| Error::Containerd(format!("connecting to {}: {e}", opts.address)))?;
    let mut ctd = Ctd {
        channel,
        namespace: opts.namespace.clone(),
        lease: None,
    };
    ctd.start_lease().await?;
    let res = pull_leased(client, reference, opts, workdir, &ctd).await;
    ctd.end_lease().await;
    res
}

async fn pull_leased(
    client: &Client,
    reference: &Reference,
    opts: &RpullOptions,
    workdir: &Path,
    ctd: &Ctd,
) -> Result<RpullReport> {
    let img = client.resolve_image(reference, &opts.platform).await?;
    let m = &img.manifest;
    let config_bytes = client.get_blob(reference, &m.config.digest).await?;
    let config: serde_json::Value = serde_json::from_slice(&config_bytes)
        .map_err(|e| Error::bad(format!("config {}", m.config.digest), e.to_string()))?;
    let diff_ids: Vec<String> = config
        .pointer("/rootfs/diff_ids")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if diff_ids.len() != m.layers.len() {
        return Err(Error::bad(
            format!("config {}", m.config.digest),
            format!("{} diff_ids for {} layers", diff_ids.len(), m.layers.len()),
        ));
    }
    let chains = chain_ids(&diff_ids);
    let top = chains.last().cloned().unwrap_or_default();

    // Content first: the labels make containerd's GC keep what the image needs.
    let mut config_labels = HashMap::new();
    if !top.is_empty() {
        config_labels.insert(
            format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter),
            top.clone(),
        );
    }
    ctd.write_content(
        &m.config.digest.to_string(),
        m.config.size,
        ContentSource::Bytes(&config_bytes),
        config_labels,
    )
    .await?;
    let mut manifest_labels = HashMap::new();
    manifest_labels.insert(
        "containerd.io/gc.ref.content.config".to_string(),
        m.config.digest.to_string(),
    );
    ctd.write_content(
        &img.digest.to_string(),
        img.raw.len() as u64,
        ContentSource::Bytes(&img.raw),
        manifest_labels,
    )
    .await?;

    let store = Store::registry(client.clone(), reference.clone());
    let mut snaps = SnapshotsClient::new(ctd.channel.clone());
    let mut report = RpullReport {
        manifest: img
            .digest
            .to_string()
            .parse()
            .map_err(|e: oci_digest::ParseDigestError| Error::bad("manifest", e.to_string()))?,
        remote: 0,
        unpacked: 0,
        existing: 0,
        chain_id: top.clone(),
    };
    for (i, layer) in m.layers.iter().enumerate() {
        let chain = &chains[i];
        let parent = if i == 0 {
            String::new()
        } else {
            chains[i - 1].clone()
        };
        let exists = snaps
            .stat(ctd.req(StatSnapshotRequest {
                snapshotter: opts.snapshotter.clone(),
                key: chain.clone(),
            }))
            .await;
        match exists {
            Ok(_) => {
                report.existing += 1;
                continue;
            }
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(rpc("snapshot stat", s)),
        }
        let mut labels = HashMap::new();
        labels.insert(SNAPSHOT_REF_LABEL.to_string(), chain.clone());
        labels.insert(STARGZ_REFERENCE_LABEL.to_string(), reference.to_string());
        labels.insert(STARGZ_DIGEST_LABEL.to_string(), layer.digest.to_string());
        labels.insert(
            STARGZ_LAYERS_LABEL.to_string(),
            layers_label(&m.layers[i..]),
        );
        if let Some(toc) = layer
            .annotations
            .as_ref()
            .and_then(|a| a.get(estargz::TOC_DIGEST_ANNOTATION))
        {
            labels.insert(estargz::TOC_DIGEST_ANNOTATION.to_string(), toc.clone());
        }
        if opts.skip_content_verify {
            labels.insert(STARGZ_SKIP_VERIFY_LABEL.to_string(), "true".into());
        }
        let key = format!(
            "extract-{}-{chain}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let prepared = snaps
            .prepare(ctd.req(PrepareSnapshotRequest {
                snapshotter: opts.snapshotter.clone(),
                key: key.clone(),
                parent,
                labels,
            }))
            .await;
        let mounts = match prepared {
            // The remote snapshotter made the layer itself.
            Err(s) if s.code() == Code::AlreadyExists => {
                report.remote += 1;
                tracing::info!(layer = %layer.digest, chain = %chain, "mounted remotely");
                continue;
            }
            Err(s) => return Err(rpc("snapshot prepare", s)),
            Ok(r) => r.into_inner().mounts,
        };
        // Refused: fetch the layer and unpack it into the prepared snapshot.
        let unpacked = async {
            let local = store.fetch_blob(layer, workdir).await?;
            let mut labels = HashMap::new();
            labels.insert(
                "containerd.io/uncompressed".to_string(),
                diff_ids[i].clone(),
            );
            ctd.write_content(
                &layer.digest.to_string(),
                layer.size,
                ContentSource::File(local.path()),
                labels,
            )
            .await?;
            let mut diff = DiffClient::new(ctd.channel.clone());
            diff.apply(ctd.req(ApplyRequest {
                diff: Some(cdesc(layer)),
                mounts,
                payloads: HashMap::new(),
                sync_fs: false,
            }))
            .await
            .map_err(|s| rpc("diff apply", s))?;
            snaps
                .clone()
                .commit(ctd.req(CommitSnapshotRequest {
                    snapshotter: opts.snapshotter.clone(),
                    name: chain.clone(),
                    key: key.clone(),
                    labels: HashMap::new(),
                }))
                .await
                .map_err(|s| rpc("snapshot commit", s))?;
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = unpacked {
            let _ = snaps
                .remove(ctd.req(RemoveSnapshotRequest {
                    snapshotter: opts.snapshotter.clone(),
                    key: key.clone(),
                }))
                .await;
            return Err(e);
        }
        report.unpacked += 1;
        tracing::info!(layer = %layer.digest, chain = %chain, "fetched and unpacked");
    }

    // The manifest names its layers for GC once they are in the store.
    let mut images = ImagesClient::new(ctd.channel.clone());
    let image = Image {
        name: reference.to_string(),
        labels: HashMap::new(),
        target: Some(CDescriptor {
            media_type: img
                .manifest
                .media_type
                .clone()
                .unwrap_or_else(|| registry::OCI_MANIFEST.to_string()),
            digest: img.digest.to_string(),
            size: img.raw.len() as i64,
            annotations: HashMap::new(),
        }),
        created_at: None,
        updated_at: None,
    };
    match images
        .create(ctd.req(CreateImageRequest {
            image: Some(image.clone()),
            source_date_epoch: None,
        }))
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == Code::AlreadyExists => {
            images
                .update(ctd.req(UpdateImageRequest {
                    image: Some(image),
                    update_mask: None,
                    source_date_epoch: None,
                }))
                .await
                .map_err(|s| rpc("image update", s))?;
        }
        Err(s) => return Err(rpc("image create", s)),
    }
    Ok(report)
}

/// `t` as RFC 3339 in UTC (`2006-01-02T15:04:05Z`), the form containerd's lease
/// expiry label takes.
fn rfc3339_utc(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_expiry_is_rfc3339_utc() {
        let at = |s: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s);
        assert_eq!(rfc3339_utc(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(at(1_795_462_574)), "2026-11-23T19:36:14Z");
    }

    #[test]
    fn chain_ids_follow_the_spec() {
        let a = "sha256:aaaa".to_string();
        let b = "sha256:bbbb".to_string();
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        assert_eq!(
            c[1],
            format!(
                "sha256:{}",
                hex::encode(Sha256::digest(b"sha256:aaaa sha256:bbbb"))
            )
        );
    }
}
