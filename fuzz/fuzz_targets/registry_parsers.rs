//! The registry client's parsers of registry-controlled bytes: manifests and indexes,
//! `multipart/byteranges` bodies, `Content-Range`, `WWW-Authenticate`, token replies,
//! `Retry-After`, and URL redaction. The first byte picks the parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry::fuzzing as f;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match mode % 8 {
        0 => {
            let _ = f::parse_manifest("", rest);
            let _ = f::parse_manifest("application/vnd.oci.image.index.v1+json", rest);
            let _ = f::parse_manifest("application/vnd.oci.image.manifest.v1+json", rest);
        }
        1 => {
            // boundary, size, body: "<boundary>\n<size>\n<body>"
            let mut parts = rest.splitn(3, |&b| b == b'\n');
            let boundary = String::from_utf8_lossy(parts.next().unwrap_or_default());
            let size = String::from_utf8_lossy(parts.next().unwrap_or_default())
                .trim()
                .parse()
                .unwrap_or(1 << 20);
            let body = parts.next().unwrap_or_default();
            let _ = f::parse_multipart(body, &boundary, size);
        }
        2 => {
            let _ = f::parse_content_range(&text);
        }
        3 => {
            let _ = f::parse_challenge(&text);
        }
        4 => {
            let _ = f::parse_token_response(rest);
        }
        5 => {
            if let Some(d) = f::parse_retry_after(&text) {
                assert!(d <= std::time::Duration::from_secs(3600));
            }
        }
        6 => {
            let _ = f::boundary_of(&text);
        }
        _ => {
            let _ = f::redact_text(&text);
        }
    }
});
