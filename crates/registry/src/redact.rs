//! Redaction of URLs for errors and logs: no message shows a query string (signed
//! redirect targets carry their signature there) or userinfo.

use url::Url;

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
