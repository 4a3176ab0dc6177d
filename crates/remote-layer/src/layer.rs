//! [`RemoteLayer`]: the layer a Prepare asks for, read once from the snapshot's labels.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::label;

/// Why a Prepare's labels do not describe a remote layer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// Neither the stargz label nor its CRI counterpart carries a value.
    #[error("no {what}: neither {label:?} nor {alternative:?} is set")]
    Missing {
        what: &'static str,
        label: &'static str,
        alternative: &'static str,
    },
    /// The layer digest label is not a digest.
    #[error("{label:?} is not a digest: {source}")]
    InvalidDigest {
        label: &'static str,
        #[source]
        source: oci_digest::ParseDigestError,
    },
}

/// The remote layer a Prepare asks for: what the daemon needs to fetch, check and
/// mount it. Carried as is in the FUSE manager's mount requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// Image reference (`host/repo:tag` or `host/repo@digest`).
    pub image_ref: String,
    /// Digest of the compressed layer blob.
    pub digest: oci_digest::Digest,
    /// Digests of the image's layers (to open ahead of their own Prepare); empty when
    /// unknown, which means every layer of the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
    /// The TOC digest the layer is checked against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toc_digest: Option<String>,
    /// Uncompressed digest (diff id) of the layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncompressed_digest: Option<String>,
    /// Size of the decompressed layer in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncompressed_size: Option<u64>,
    /// The client asked to skip content verification.
    #[serde(default)]
    pub skip_verify: bool,
    /// Bytes of the layer the client asked to prefetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_size: Option<u64>,
    /// Bytes at the blob's end holding TOC and footer, from the layer's
    /// [`crate::annotation::TOC_TAIL`] annotation (which containerd passes on as a
    /// label): the first read of the layer can be exactly that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toc_tail: Option<u64>,
}

impl RemoteLayer {
    /// The layer `labels` describe. The stargz labels win over the CRI ones; a present
    /// but empty preferred label counts as missing (the CRI one is not consulted then).
    /// The TOC and uncompressed digests are taken verbatim. The numeric hints (prefetch
    /// size, uncompressed size) are dropped when they are not decimal numbers, as the
    /// reference daemon does: a bad hint never keeps a layer from being mounted.
    /// `skipverify` counts when present with any value but `false`.
    pub fn from_labels(labels: &HashMap<String, String>) -> Result<RemoteLayer, LabelError> {
        let pick = |a: &'static str, b: &'static str| {
            labels
                .get(a)
                .or_else(|| labels.get(b))
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let required = |what, a, b| {
            pick(a, b).ok_or(LabelError::Missing {
                what,
                label: a,
                alternative: b,
            })
        };
        let image_ref = required(
            "image reference",
            label::STARGZ_REFERENCE,
            label::CRI_IMAGE_REF,
        )?;
        let digest_label = if labels
            .get(label::STARGZ_DIGEST)
            .is_some_and(|v| !v.is_empty())
        {
            label::STARGZ_DIGEST
        } else {
            label::CRI_LAYER_DIGEST
        };
        let digest = required(
            "layer digest",
            label::STARGZ_DIGEST,
            label::CRI_LAYER_DIGEST,
        )?;
        let digest =
            oci_digest::Digest::parse(&digest).map_err(|source| LabelError::InvalidDigest {
                label: digest_label,
                source,
            })?;
        let layers = pick(label::STARGZ_LAYERS, label::CRI_IMAGE_LAYERS)
            .map(|s| {
                s.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let number = |k: &str| labels.get(k).and_then(|v| v.trim().parse::<u64>().ok());
        Ok(RemoteLayer {
            image_ref,
            digest,
            layers,
            toc_digest: labels.get(label::TOC_DIGEST).cloned(),
            uncompressed_digest: labels.get(label::UNCOMPRESSED_DIGEST).cloned(),
            uncompressed_size: number(label::UNCOMPRESSED_SIZE),
            skip_verify: labels
                .get(label::STARGZ_SKIP_VERIFY)
                .is_some_and(|v| !v.trim().eq_ignore_ascii_case("false")),
            prefetch_size: number(label::STARGZ_PREFETCH),
            toc_tail: number(crate::annotation::TOC_TAIL).filter(|&n| n > 0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn cri_labels() {
        let l = RemoteLayer::from_labels(&labels(&[
            (label::TARGET_SNAPSHOT_REF, "chain"),
            (label::CRI_IMAGE_REF, "127.0.0.1:5000/img:1"),
            (label::CRI_LAYER_DIGEST, "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            (label::CRI_IMAGE_LAYERS, "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa,,sha256:bb"),
        ]))
        .unwrap();
        assert_eq!(
            l,
            RemoteLayer {
                image_ref: "127.0.0.1:5000/img:1".into(),
                digest: "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                    .parse()
                    .unwrap(),
                layers: vec![
                    "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                        .into(),
                    "sha256:bb".into()
                ],
                toc_digest: None,
                uncompressed_digest: None,
                uncompressed_size: None,
                skip_verify: false,
                prefetch_size: None,
                toc_tail: None,
            }
        );
    }

    #[test]
    fn stargz_labels_win_and_hints_are_read() {
        let l = RemoteLayer::from_labels(&labels(&[
            (label::CRI_IMAGE_REF, "cri/img:1"),
            (label::CRI_LAYER_DIGEST, "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"),
            (label::CRI_IMAGE_LAYERS, "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"),
            (label::STARGZ_REFERENCE, "stargz/img:1"),
            (label::STARGZ_DIGEST, "sha256:5555555555555555555555555555555555555555555555555555555555555555"),
            (label::STARGZ_LAYERS, "sha256:5555555555555555555555555555555555555555555555555555555555555555,sha256:next"),
            (label::TOC_DIGEST, "sha256:toc"),
            (label::UNCOMPRESSED_DIGEST, "sha256:diff"),
            (label::UNCOMPRESSED_SIZE, "4096"),
            (label::STARGZ_SKIP_VERIFY, "true"),
            (label::STARGZ_PREFETCH, " 1024 "),
            (crate::annotation::TOC_TAIL, "300000"),
        ]))
        .unwrap();
        assert_eq!(l.toc_tail, Some(300_000));
        assert_eq!(l.image_ref, "stargz/img:1");
        assert_eq!(
            l.digest.to_string(),
            "sha256:5555555555555555555555555555555555555555555555555555555555555555"
        );
        assert_eq!(
            l.layers,
            [
                "sha256:5555555555555555555555555555555555555555555555555555555555555555",
                "sha256:next"
            ]
        );
        assert_eq!(l.toc_digest.as_deref(), Some("sha256:toc"));
        assert_eq!(l.uncompressed_digest.as_deref(), Some("sha256:diff"));
        assert_eq!(l.uncompressed_size, Some(4096));
        assert!(l.skip_verify);
        assert_eq!(l.prefetch_size, Some(1024));
    }

    #[test]
    fn missing_and_bad_values() {
        let e = RemoteLayer::from_labels(&labels(&[(
            label::CRI_LAYER_DIGEST,
            "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        )]))
        .unwrap_err();
        assert!(matches!(
            e,
            LabelError::Missing {
                what: "image reference",
                ..
            }
        ));
        assert!(e.to_string().contains(label::CRI_IMAGE_REF), "{e}");
        // An empty preferred label hides the CRI one.
        let e = RemoteLayer::from_labels(&labels(&[
            (label::STARGZ_REFERENCE, "r"),
            (label::STARGZ_DIGEST, ""),
            (
                label::CRI_LAYER_DIGEST,
                "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            ),
        ]))
        .unwrap_err();
        assert!(matches!(
            e,
            LabelError::Missing {
                what: "layer digest",
                ..
            }
        ));
        let l = RemoteLayer::from_labels(&labels(&[
            (label::STARGZ_REFERENCE, "r"),
            (
                label::STARGZ_DIGEST,
                "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            ),
            (label::STARGZ_PREFETCH, "lots"),
            (label::UNCOMPRESSED_SIZE, "-1"),
            (label::STARGZ_SKIP_VERIFY, "false"),
            (crate::annotation::TOC_TAIL, "0"),
        ]))
        .unwrap();
        assert_eq!((l.prefetch_size, l.uncompressed_size), (None, None));
        assert_eq!(l.toc_tail, None);
        assert!(!l.skip_verify);
        assert!(l.layers.is_empty());
        // A layer digest that is not a digest names its label.
        let e = RemoteLayer::from_labels(&labels(&[
            (label::CRI_IMAGE_REF, "r"),
            (label::CRI_LAYER_DIGEST, "sha256:short"),
        ]))
        .unwrap_err();
        assert!(
            matches!(e, LabelError::InvalidDigest { label: l, .. } if l == label::CRI_LAYER_DIGEST),
            "{e}"
        );
        // ... and so does a bad one on the wire.
        assert!(
            serde_json::from_str::<RemoteLayer>(r#"{"image_ref":"r","digest":"md5:00"}"#).is_err()
        );
    }

    #[test]
    fn serde_round_trip_and_defaults() {
        let l = RemoteLayer::from_labels(&labels(&[
            (label::STARGZ_REFERENCE, "r"),
            (
                label::STARGZ_DIGEST,
                "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            ),
            (label::TOC_DIGEST, "sha256:toc"),
        ]))
        .unwrap();
        let text = serde_json::to_string(&l).unwrap();
        assert_eq!(
            text,
            r#"{"image_ref":"r","digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","toc_digest":"sha256:toc","skip_verify":false}"#
        );
        assert_eq!(serde_json::from_str::<RemoteLayer>(&text).unwrap(), l);
        let minimal: RemoteLayer =
            serde_json::from_str(r#"{"image_ref":"r","digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#).unwrap();
        assert_eq!(minimal.toc_digest, None);
        assert!(!minimal.skip_verify);
    }
}
