//! Quick raw-HTTP image push into an anonymous registry, for test setup.

use sha2::{Digest as _, Sha256};

/// What [`push_image`] stored.
pub struct PushedImage {
    pub manifest_digest: String,
    pub manifest: Vec<u8>,
    pub config_digest: String,
    pub layer_digests: Vec<String>,
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Uploads one blob with POST + PUT (no auth); returns its digest.
pub async fn push_blob(base_url: &str, repo: &str, data: &[u8]) -> String {
    let c = reqwest::Client::new();
    let d = sha(data);
    let r = c
        .post(format!("{base_url}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .expect("start upload");
    assert_eq!(r.status().as_u16(), 202, "start upload");
    let loc = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("location")
        .to_string();
    let mut url = url::Url::parse(base_url)
        .expect("base")
        .join(&loc)
        .expect("join");
    url.query_pairs_mut().append_pair("digest", &d);
    let r = c
        .put(url)
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .expect("put");
    assert_eq!(r.status().as_u16(), 201, "finish upload");
    d
}

/// Pushes layers, a config and an OCI manifest under `tag`.
pub async fn push_image(base_url: &str, repo: &str, tag: &str, layers: &[Vec<u8>]) -> PushedImage {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let config_digest = push_blob(base_url, repo, &config).await;
    let mut layer_digests = Vec::new();
    let mut descs = Vec::new();
    for l in layers {
        let d = push_blob(base_url, repo, l).await;
        descs.push(serde_json::json!({"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":d,"size":l.len()}));
        layer_digests.push(d);
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType":"application/vnd.oci.image.config.v1+json","digest":config_digest,"size":config.len()},
        "layers": descs,
    }))
    .expect("json");
    let r = reqwest::Client::new()
        .put(format!("{base_url}/v2/{repo}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .expect("put manifest");
    assert_eq!(r.status().as_u16(), 201, "put manifest");
    PushedImage {
        manifest_digest: sha(&manifest),
        manifest,
        config_digest,
        layer_digests,
    }
}

/// Deterministic pseudo-random bytes (xorshift), so blobs differ per seed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}
