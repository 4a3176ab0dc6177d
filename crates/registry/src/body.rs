//! Bounded reading of response bodies: every body is limited by the bytes actually
//! received (a chunked body has no Content-Length to check).

use bytes::{Bytes, BytesMut};
use reqwest::Response;

use crate::error::{Error, Result};

/// Largest manifest or index accepted.
pub(crate) const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest token endpoint reply accepted.
pub(crate) const MAX_TOKEN_BYTES: u64 = 1 << 20;
/// Bytes of an error body kept for a message.
pub(crate) const ERROR_SNIPPET_BYTES: usize = 512;
/// Headers and delimiters a `multipart/byteranges` reply may add per part.
pub(crate) const MULTIPART_PART_OVERHEAD: u64 = 1 << 10;
/// Most bytes reserved up front for a body, whatever its announced length.
const MAX_PREALLOC: u64 = 4 << 20;

/// Reads a whole body, failing as soon as more than `max` bytes have arrived. `what`
/// names the body in the error.
pub(crate) async fn read_limited(
    mut resp: Response,
    host: &str,
    max: u64,
    what: &str,
) -> Result<Bytes> {
    if let Some(l) = resp.content_length() {
        if l > max {
            return Err(too_large(host, what, max));
        }
    }
    let reserve = resp
        .content_length()
        .unwrap_or(0)
        .min(max)
        .min(MAX_PREALLOC);
    let mut buf = BytesMut::with_capacity(reserve as usize);
    while let Some(c) = resp.chunk().await.map_err(|e| Error::Connection {
        host: host.to_string(),
        detail: crate::error::error_chain(&e),
    })? {
        if buf.len() as u64 + c.len() as u64 > max {
            return Err(too_large(host, what, max));
        }
        buf.extend_from_slice(&c);
    }
    Ok(buf.freeze())
}

fn too_large(host: &str, what: &str, max: u64) -> Error {
    Error::protocol(
        host,
        format!("{what} is larger than the limit of {max} bytes"),
    )
}

/// Reads at most `max` bytes of a body and drops the rest (closing the connection).
pub(crate) async fn read_prefix(mut resp: Response, max: u64) -> Bytes {
    let mut buf = BytesMut::new();
    while let Ok(Some(c)) = resp.chunk().await {
        let room = (max as usize).saturating_sub(buf.len());
        buf.extend_from_slice(&c[..c.len().min(room)]);
        if buf.len() as u64 >= max {
            break;
        }
    }
    buf.freeze()
}
