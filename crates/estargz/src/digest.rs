//! `sha256:<hex>` digests: computing, parsing and comparing them.

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Parses `sha256:<64 lowercase hex>` into raw bytes.
pub fn parse_sha256(d: &str) -> Result<[u8; 32]> {
    let hexpart = d
        .strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        })
        .ok_or_else(|| Error::BadDigest(d.to_string()))?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hexpart, &mut out).map_err(|_| Error::BadDigest(d.to_string()))?;
    Ok(out)
}

/// Formats raw sha256 bytes as a digest string.
pub fn format_sha256(raw: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(raw))
}
