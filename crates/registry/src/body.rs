//! Bounded reading of response bodies and redaction of URLs for errors and logs: every
//! body is limited by the bytes actually received (a chunked body has no
//! Content-Length to check), and no message shows a query string or userinfo.

use bytes::{Bytes, BytesMut};
use reqwest::Response;
use url::Url;

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

/// A URL as it may appear in errors and logs: no userinfo, no query string (signed
/// redirect targets carry their signature there), no fragment.
pub fn redact_url(u: &Url) -> String {
    let mut r = u.clone();
    let had_query = r.query().is_some();
    let _ = r.set_username("");
    let _ = r.set_password(None);
    r.set_query(None);
    r.set_fragment(None);
    let mut s = r.to_string();
    if had_query {
        s.push_str("?[redacted]");
    }
    s
}

/// Redacts every URL found in free text (an error chain from the HTTP stack names the
/// URL it was fetching).
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        // The scheme: letters, digits, '+', '-', '.' just before "://".
        // Scheme characters are ASCII, so the char found may be multi-byte: step
        // over it by its length, not by one byte.
        let scheme_start = rest[..i]
            .char_indices()
            .rev()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map(|(p, c)| p + c.len_utf8())
            .unwrap_or(0);
        let end = rest[i..]
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '<' | '>'))
            .map(|p| p + i)
            .unwrap_or(rest.len());
        out.push_str(&rest[..scheme_start]);
        let candidate = &rest[scheme_start..end];
        match Url::parse(candidate) {
            Ok(u) if scheme_start < i => out.push_str(&redact_url(&u)),
            _ => out.push_str(&strip_sensitive(candidate)),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Fallback for text that looks like a URL but does not parse: drop everything from
/// the first `?` and any `user:pass@`.
fn strip_sensitive(s: &str) -> String {
    let s = match s.find('?') {
        Some(q) => &s[..q],
        None => s,
    };
    match (s.find("://"), s.rfind('@')) {
        (Some(p), Some(at)) if at > p => format!("{}://{}", &s[..p], &s[at + 1..]),
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_query_and_userinfo() {
        let u = Url::parse("https://user:pw@cdn.example/blobs/x?X-Amz-Signature=abc&b=1#f")
            .expect("url");
        let r = redact_url(&u);
        assert_eq!(r, "https://cdn.example/blobs/x?[redacted]");
        let t = redact_text(
            "error sending request for url (https://u:p@s3.example/a?sig=SECRET): reset",
        );
        assert!(!t.contains("SECRET") && !t.contains("u:p"), "{t}");
        assert!(t.contains("https://s3.example/a?[redacted]"), "{t}");
        assert_eq!(redact_text("no url here"), "no url here");
        let t = redact_text("x http://[bad?sig=1 y");
        assert!(!t.contains("sig=1"), "{t}");
        // A multi-byte character right before "://" (found by fuzzing).
        let t = redact_text("8[5\u{f8}://$x?sig=2 \u{e9}://h/?q=3");
        assert!(!t.contains("sig=2") && !t.contains("q=3"), "{t}");
    }
}
