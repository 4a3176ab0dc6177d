//! Pulling an image into containerd through its gRPC API (`containerd-client`)
//! so a remote snapshotter can mount eStargz layers lazily: manifest and config
//! go into the content store, each layer's snapshot is prepared with the labels
//! the stargz snapshotter reads, and layers it refuses are fetched and unpacked.

use std::collections::HashMap;
use std::path::Path;

use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{ApplyRequest, Image};
use containerd_client::tonic::Code;
use containerd_client::types::Descriptor as CDescriptor;
use registry::{Client, Descriptor, Platform, Reference};
use sha2::{Digest as _, Sha256};

use convert::Store;

use crate::ctd::{rpc, ContentSource, Ctd};
use crate::error::{Error, Result};

/// Labels the stargz snapshotter reads to fetch a layer itself.
pub use remote_layer::label::STARGZ_DIGEST as STARGZ_DIGEST_LABEL;
pub use remote_layer::label::STARGZ_LAYERS as STARGZ_LAYERS_LABEL;
pub use remote_layer::label::STARGZ_REFERENCE as STARGZ_REFERENCE_LABEL;
pub use remote_layer::label::STARGZ_SKIP_VERIFY as STARGZ_SKIP_VERIFY_LABEL;
/// Label naming the snapshot a prepared one becomes once committed.
pub use remote_layer::label::TARGET_SNAPSHOT_REF as SNAPSHOT_REF_LABEL;
use remote_layer::label::{
    CRI_IMAGE_LAYERS as CRI_IMAGE_LAYERS_LABEL, CRI_IMAGE_REF as CRI_IMAGE_REF_LABEL,
    CRI_LAYER_DIGEST as CRI_LAYER_DIGEST_LABEL, STARGZ_PREFETCH as STARGZ_PREFETCH_LABEL,
};

/// containerd rejects labels larger than this (key plus value).
const MAX_LABEL_SIZE: usize = 4096;
/// The prefetch size the reference's `rpull` asks for on every layer, which a
/// snapshotter uses for layers without a prefetch landmark.
pub const DEFAULT_PREFETCH_SIZE: u64 = 10 << 20;
/// containerd's own labels (`--use-containerd-labels`): the manifest digest.
const CRI_MANIFEST_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.manifest-digest";

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
    /// Describe layers with containerd's CRI labels (`containerd.io/snapshot/cri.*`)
    /// instead of the stargz ones, as `--use-containerd-labels` does.
    pub containerd_labels: bool,
    /// Labels of the image record.
    pub image_labels: HashMap<String, String>,
    /// Bytes to prefetch, asked of the snapshotter on every layer (the reference
    /// asks [`DEFAULT_PREFETCH_SIZE`]); 0 asks nothing.
    pub prefetch_size: u64,
}

/// What a pull did.
#[derive(Clone, Debug)]
pub struct RpullReport {
    /// The image manifest pulled.
    pub manifest: oci_digest::Digest,
    /// Layers the snapshotter mounts remotely.
    pub remote: usize,
    /// Layers the snapshotter downloaded and unpacked itself (not eStargz, pulled in
    /// full): local snapshots, no remote mount.
    pub filled: usize,
    /// Layers fetched and unpacked here.
    pub unpacked: usize,
    /// Layers whose snapshot already existed.
    pub existing: usize,
    /// The top snapshot.
    pub chain_id: String,
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

/// Digests of this layer and the ones after it, cut to fit in label `key`.
/// As containerd's own unpacker does: a layer's annotations under
/// `containerd.io/snapshot/` (the TOC digest, our converter's hints), which go to the
/// snapshotter as labels of the layer's Prepare. Those that only the puller sets (the
/// reference, skipping verification, the CRI's) never come from the image, and one
/// that containerd would refuse as too large is left out.
fn inherited_labels(layer: &Descriptor) -> Vec<(String, String)> {
    layer
        .annotations
        .iter()
        .flatten()
        .filter(|(k, v)| {
            let client_only = k.starts_with(remote_layer::label::REMOTE)
                || k.starts_with("containerd.io/snapshot/cri.");
            k.starts_with(remote_layer::annotation::INHERITED_PREFIX)
                && !client_only
                && k.len() + v.len() <= MAX_LABEL_SIZE
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn layers_label(key: &str, layers: &[Descriptor]) -> String {
    let mut s = String::new();
    for l in layers {
        let d = l.digest.to_string();
        let extra = if s.is_empty() { d.len() } else { d.len() + 1 };
        if key.len() + s.len() + extra > MAX_LABEL_SIZE {
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
    let mut ctd = Ctd::connect(&opts.address, &opts.namespace).await?;
    ctd.start_lease("rpull").await?;
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
        ContentSource::Bytes(config_bytes.clone()),
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
        ContentSource::Bytes(img.raw.clone()),
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
        filled: 0,
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
        if opts.containerd_labels {
            labels.insert(CRI_IMAGE_REF_LABEL.to_string(), reference.to_string());
            labels.insert(
                CRI_MANIFEST_DIGEST_LABEL.to_string(),
                img.digest.to_string(),
            );
            labels.insert(CRI_LAYER_DIGEST_LABEL.to_string(), layer.digest.to_string());
            labels.insert(
                CRI_IMAGE_LAYERS_LABEL.to_string(),
                layers_label(CRI_IMAGE_LAYERS_LABEL, &m.layers[i..]),
            );
        } else {
            labels.insert(STARGZ_REFERENCE_LABEL.to_string(), reference.to_string());
            labels.insert(STARGZ_DIGEST_LABEL.to_string(), layer.digest.to_string());
            labels.insert(
                STARGZ_LAYERS_LABEL.to_string(),
                layers_label(STARGZ_LAYERS_LABEL, &m.layers[i..]),
            );
        }
        if opts.prefetch_size > 0 {
            labels.insert(
                STARGZ_PREFETCH_LABEL.to_string(),
                opts.prefetch_size.to_string(),
            );
        }
        for (k, v) in inherited_labels(layer) {
            labels.entry(k).or_insert(v);
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
                // Mounted remotely (the snapshot says so), or unpacked by the
                // snapshotter itself.
                let info = snaps
                    .stat(ctd.req(StatSnapshotRequest {
                        snapshotter: opts.snapshotter.clone(),
                        key: chain.clone(),
                    }))
                    .await;
                let remote = match info {
                    Ok(r) => r
                        .into_inner()
                        .info
                        .is_none_or(|i| i.labels.contains_key(remote_layer::label::REMOTE)),
                    Err(_) => true,
                };
                if remote {
                    report.remote += 1;
                    tracing::info!(layer = %layer.digest, chain = %chain, "mounted remotely");
                } else {
                    report.filled += 1;
                    tracing::info!(layer = %layer.digest, chain = %chain, "pulled in full by the snapshotter");
                }
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
                ContentSource::File(local.path().to_path_buf()),
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
    let image = Image {
        name: reference.to_string(),
        labels: opts.image_labels.clone(),
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
    ctd.put_image(image).await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The TOC digest and our converter's hints pass; the puller's own labels, other
    /// namespaces and oversized values do not.
    #[test]
    fn inherited_labels_are_the_layer_hints_only() {
        let mut layer =
            Descriptor::for_bytes("application/vnd.oci.image.layer.v1.tar+gzip", b"layer");
        layer.annotations = Some(
            [
                (estargz::TOC_DIGEST_ANNOTATION, "sha256:toc".to_string()),
                (remote_layer::annotation::TOC_TAIL, "4096".to_string()),
                (STARGZ_SKIP_VERIFY_LABEL, "true".to_string()),
                (STARGZ_REFERENCE_LABEL, "evil/img".to_string()),
                (CRI_IMAGE_REF_LABEL, "evil/img".to_string()),
                ("org.opencontainers.image.title", "x".to_string()),
                ("containerd.io/snapshot/big", "x".repeat(MAX_LABEL_SIZE)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        );
        let mut got = inherited_labels(&layer);
        got.sort();
        assert_eq!(
            got,
            vec![
                (
                    remote_layer::annotation::TOC_TAIL.to_string(),
                    "4096".to_string()
                ),
                (
                    estargz::TOC_DIGEST_ANNOTATION.to_string(),
                    "sha256:toc".to_string()
                ),
            ]
        );
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
