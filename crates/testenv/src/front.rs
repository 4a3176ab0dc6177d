//! Fault-injecting HTTP fronts placed in front of a real registry: redirects
//! (with expiring targets), refused HEAD, refused multi-range, ignored
//! Range, bodies cut mid-way, 503 bursts, and a server that never answers; and
//! hostile replies: chunked bodies without Content-Length that go on and on,
//! 206 bodies longer than the range, multipart floods, huge `Retry-After`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response};

use crate::http::{respond, serve, Body, BoxError, Handler};

/// What the front does. Counters (`fail_503`, `drop_mid_body`) count down.
#[derive(Clone, Default)]
pub struct FrontOpts {
    /// `http://127.0.0.1:PORT` of the registry.
    pub upstream: String,
    /// Demand these basic credentials on every request (then strip them).
    pub require_basic: Option<(String, String)>,
    /// Answer 403 to requests with these basic credentials (accepted, without
    /// access: a credential that lost its rights).
    pub forbid_basic: Option<(String, String)>,
    /// Answer blob GETs with 307 to this base URL (+ path + `?sig=N`).
    pub redirect_blobs_to: Option<String>,
    /// As a redirect target: each `sig` serves this many requests, then 403.
    pub target_uses_per_sig: Option<usize>,
    /// Answer HEAD with 405.
    pub refuse_head: bool,
    /// Answer multi-range GETs with 400.
    pub reject_multi_range: bool,
    /// Drop Range headers so the registry sends whole blobs with 200.
    pub ignore_range: bool,
    /// Cut this many blob bodies half-way.
    pub drop_mid_body: usize,
    /// Answer this many blob requests with 503 (`Retry-After: 1` on the first).
    pub fail_503: usize,
    /// Accept connections and never answer.
    pub never_answer: bool,
    /// `Retry-After` value sent with every 503 (instead of `1` on the first).
    pub retry_after: Option<String>,
    /// Answer manifest GETs with 200 and a chunked body (no Content-Length) of
    /// this many bytes.
    pub chunked_manifest_bytes: Option<usize>,
    /// Answer 400 to requests that lack any of these header values (a name may
    /// appear more than once: each value must be among the request's).
    pub require_headers: Vec<(String, String)>,
    /// Answer error replies (503 and 404) with a chunked body of this many bytes.
    pub error_body_bytes: Option<usize>,
    /// Send this many extra bytes after a single-range 206 body, chunked so no
    /// Content-Length bounds it.
    pub oversize_range_body: usize,
    /// Answer multi-range GETs with a `multipart/byteranges` reply whose first part
    /// is followed by this many bytes of junk, chunked.
    pub multipart_flood_bytes: Option<usize>,
    /// Flip the last byte of every single-range 206 blob body (a registry, or a proxy,
    /// that alters data); whole-blob GETs pass untouched.
    pub corrupt_ranged_blobs: bool,
    /// Hold every blob request this many milliseconds before answering it, as a slow
    /// link would, so that requests in flight at the same time can be seen in `log`.
    pub blob_delay_ms: u64,
    /// Hold every manifest request this many milliseconds before answering it.
    pub manifest_delay_ms: u64,
    /// Send a `multipart/byteranges` reply's first part, then wait this many
    /// milliseconds before the rest, so a client that reads parts as they arrive can be
    /// told from one that waits for the whole reply.
    pub multipart_pause_ms: u64,
}

/// One request the front answered, with when it came and when its answer was ready.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    pub received: std::time::Instant,
    pub answered: std::time::Instant,
    /// The client's address and port: one per TCP connection.
    pub peer: Option<SocketAddr>,
}

impl Logged {
    /// First byte of a `bytes=A-B` or `bytes=-N` range (with `size`, the blob's size).
    pub fn range_start(&self, size: u64) -> Option<u64> {
        let r = self.range.as_deref()?.strip_prefix("bytes=")?;
        let first = r.split(',').next()?;
        match first.strip_prefix('-') {
            Some(n) => Some(size.saturating_sub(n.parse().ok()?)),
            None => first.split('-').next()?.parse().ok(),
        }
    }
}

/// What the front saw and did.
#[derive(Default, Debug)]
pub struct FrontStats {
    pub requests: AtomicUsize,
    pub with_authorization: AtomicUsize,
    pub blob_gets: AtomicUsize,
    pub multi_range_gets: AtomicUsize,
    pub redirects: AtomicUsize,
    pub forbidden: AtomicUsize,
    pub dropped: AtomicUsize,
    pub failed_503: AtomicUsize,
    pub head_refused: AtomicUsize,
    pub multi_rejected: AtomicUsize,
    /// Bytes of hostile (generated) bodies actually handed to the connection.
    pub hostile_bytes_sent: AtomicUsize,
    /// Requests refused for lacking a required header value.
    pub missing_header: AtomicUsize,
    /// Every request, in the order their answers were ready.
    pub log: Mutex<Vec<Logged>>,
}

impl FrontStats {
    pub fn get(c: &AtomicUsize) -> usize {
        c.load(Ordering::SeqCst)
    }
}

/// A running front; aborted on drop.
pub struct Front {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    pub stats: Arc<FrontStats>,
}

struct State {
    opts: FrontOpts,
    stats: Arc<FrontStats>,
    left_503: AtomicUsize,
    left_drop: AtomicUsize,
    sig_uses: Mutex<HashMap<String, usize>>,
    http: reqwest::Client,
}

impl Front {
    pub async fn start(opts: FrontOpts) -> Front {
        let stats = Arc::new(FrontStats::default());
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let st = Arc::new(State {
            left_503: AtomicUsize::new(opts.fail_503),
            left_drop: AtomicUsize::new(opts.drop_mid_body),
            opts,
            stats: stats.clone(),
            sig_uses: Mutex::new(HashMap::new()),
            http,
        });
        let handler: Handler = Arc::new(move |req| {
            let st = st.clone();
            Box::pin(async move {
                let (method, path) = (req.method().to_string(), req.uri().path().to_string());
                let range = req
                    .headers()
                    .get("range")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let peer = req.extensions().get::<SocketAddr>().copied();
                let received = std::time::Instant::now();
                if st.opts.blob_delay_ms > 0 && path.contains("/blobs/sha256:") {
                    tokio::time::sleep(std::time::Duration::from_millis(st.opts.blob_delay_ms))
                        .await;
                }
                if st.opts.manifest_delay_ms > 0 && path.contains("/manifests/") {
                    tokio::time::sleep(std::time::Duration::from_millis(st.opts.manifest_delay_ms))
                        .await;
                }
                let r = handle(&st, req).await;
                let logged = Logged {
                    method,
                    path,
                    range,
                    received,
                    answered: std::time::Instant::now(),
                    peer,
                };
                st.stats
                    .log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(logged);
                r
            })
        });
        let (addr, task) = serve(handler).await;
        Front { addr, task, stats }
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn take(c: &AtomicUsize) -> bool {
    c.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

async fn handle(st: &State, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let s = &st.stats;
    s.requests.fetch_add(1, Ordering::SeqCst);
    if st.opts.never_answer {
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    }
    if req.headers().contains_key("authorization") {
        s.with_authorization.fetch_add(1, Ordering::SeqCst);
    }
    let lacks = |(name, value): &(String, String)| {
        !req.headers()
            .get_all(name.as_str())
            .iter()
            .any(|v| v.as_bytes() == value.as_bytes())
    };
    if st.opts.require_headers.iter().any(lacks) {
        s.missing_header.fetch_add(1, Ordering::SeqCst);
        return respond(400, "missing header");
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let is_blob = path.contains("/blobs/sha256:");
    if let Some(n) = st.opts.chunked_manifest_bytes {
        if path.contains("/manifests/") && req.method() == Method::GET {
            let mut r = Response::new(flood(
                st.stats.clone(),
                Bytes::from_static(b"{\"schemaVersion\":2,\"pad\":\""),
                n,
            ));
            r.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static(
                    "application/vnd.oci.image.manifest.v1+json",
                ),
            );
            return r;
        }
    }
    let range = req
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some((u, p)) = &st.opts.forbid_basic {
        let refused = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        );
        if req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some(refused.as_str())
        {
            s.forbidden.fetch_add(1, Ordering::SeqCst);
            return respond(403, r#"{"errors":[{"code":"DENIED"}]}"#);
        }
    }
    if let Some((u, p)) = &st.opts.require_basic {
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        );
        if req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            != Some(want.as_str())
        {
            let mut r = respond(401, "");
            r.headers_mut().insert(
                "www-authenticate",
                hyper::header::HeaderValue::from_static("Basic realm=\"front\""),
            );
            return r;
        }
    }
    if req.method() == Method::HEAD && st.opts.refuse_head {
        s.head_refused.fetch_add(1, Ordering::SeqCst);
        return respond(405, "");
    }
    if is_blob && req.method() == Method::GET {
        s.blob_gets.fetch_add(1, Ordering::SeqCst);
        if range.as_deref().is_some_and(|r| r.contains(',')) {
            s.multi_range_gets.fetch_add(1, Ordering::SeqCst);
            if st.opts.reject_multi_range {
                s.multi_rejected.fetch_add(1, Ordering::SeqCst);
                return respond(400, "multi-range not supported here");
            }
        }
        if let Some(base) = &st.opts.redirect_blobs_to {
            let n = s.redirects.fetch_add(1, Ordering::SeqCst);
            let mut r = respond(307, "");
            let loc = format!("{base}{path}?sig={n}");
            r.headers_mut().insert(
                "location",
                hyper::header::HeaderValue::from_str(&loc).expect("location"),
            );
            return r;
        }
        if let Some(max) = st.opts.target_uses_per_sig {
            let sig = query.clone().unwrap_or_default();
            let mut uses = st.sig_uses.lock().unwrap_or_else(|p| p.into_inner());
            let u = uses.entry(sig).or_insert(0);
            *u += 1;
            if *u > max {
                s.forbidden.fetch_add(1, Ordering::SeqCst);
                return respond(403, "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>");
            }
        }
    }
    if is_blob && take(&st.left_503) {
        let n = s.failed_503.fetch_add(1, Ordering::SeqCst);
        let mut r = match st.opts.error_body_bytes {
            Some(len) => {
                let mut r = Response::new(flood(st.stats.clone(), Bytes::new(), len));
                *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                r
            }
            None => respond(503, "busy"),
        };
        match &st.opts.retry_after {
            Some(v) => {
                if let Ok(v) = hyper::header::HeaderValue::from_str(v) {
                    r.headers_mut().insert("retry-after", v);
                }
            }
            None if n == 0 => {
                r.headers_mut()
                    .insert("retry-after", hyper::header::HeaderValue::from_static("1"));
            }
            None => {}
        }
        return r;
    }
    let multi = range.as_deref().is_some_and(|r| r.contains(','));
    if is_blob && multi && req.method() == Method::GET {
        if let Some(junk) = st.opts.multipart_flood_bytes {
            // One honest-looking part header, then junk where its data should end.
            let first = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.split(',').next())
                .unwrap_or("0-0")
                .to_string();
            let head = format!(
                "--B\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {first}/999999999999\r\n\r\n"
            );
            let mut r = Response::new(flood(st.stats.clone(), Bytes::from(head), junk));
            *r.status_mut() = hyper::StatusCode::PARTIAL_CONTENT;
            r.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("multipart/byteranges; boundary=B"),
            );
            return r;
        }
    }
    // Forward to the registry.
    let url = format!(
        "{}{}{}",
        st.opts.upstream,
        path,
        query
            .as_deref()
            .filter(|_| st.opts.target_uses_per_sig.is_none())
            .map(|q| format!("?{q}"))
            .unwrap_or_default()
    );
    let method = req.method().clone();
    let mut headers = req.headers().clone();
    headers.remove("host");
    if st.opts.require_basic.is_some() {
        headers.remove("authorization");
    }
    if st.opts.ignore_range {
        headers.remove("range");
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let up = match st
        .http
        .request(method.clone(), url)
        .headers(headers)
        .body(body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return respond(502, format!("upstream: {e}")),
    };
    let status = up.status().as_u16();
    let up_headers = up.headers().clone();
    let data = up.bytes().await.unwrap_or_default();
    let cut = is_blob
        && method == Method::GET
        && data.len() > 1
        && (status == 200 || status == 206)
        && take(&st.left_drop);
    let oversize = is_blob
        && method == Method::GET
        && status == 206
        && st.opts.oversize_range_body > 0
        && !up_headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("multipart/"));
    if oversize || (status == 404 && st.opts.error_body_bytes.is_some()) {
        let extra = if oversize {
            st.opts.oversize_range_body
        } else {
            st.opts.error_body_bytes.unwrap_or(0)
        };
        let mut r = Response::new(flood(st.stats.clone(), data, extra));
        *r.status_mut() =
            hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
        for (k, v) in up_headers.iter() {
            if k == "transfer-encoding" || k == "connection" || k == "content-length" {
                continue;
            }
            r.headers_mut().append(k.clone(), v.clone());
        }
        return r;
    }
    let corrupt = is_blob
        && method == Method::GET
        && status == 206
        && st.opts.corrupt_ranged_blobs
        && !data.is_empty()
        && !up_headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("multipart/"));
    let data = if corrupt {
        let mut v = data.to_vec();
        if let Some(last) = v.last_mut() {
            *last ^= 0x55;
        }
        Bytes::from(v)
    } else {
        data
    };
    let multipart_boundary = up_headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.starts_with("multipart/"))
        .and_then(|v| v.split("boundary=").nth(1))
        .map(|b| format!("--{}", b.trim_matches('"')));
    let pause_at = multipart_boundary
        .filter(|_| st.opts.multipart_pause_ms > 0 && status == 206)
        .and_then(|b| {
            let b = b.as_bytes();
            let first = data.windows(b.len()).position(|w| w == b)?;
            data[first + b.len()..]
                .windows(b.len())
                .position(|w| w == b)
                .map(|p| p + first + b.len())
        });
    let body: Body = if let Some(at) = pause_at {
        let pause = std::time::Duration::from_millis(st.opts.multipart_pause_ms);
        let (head, rest) = (data.slice(..at), data.slice(at..));
        let first = futures::stream::iter([Ok::<_, BoxError>(Frame::data(head))]);
        let later = futures::stream::once(async move {
            tokio::time::sleep(pause).await;
            Ok::<_, BoxError>(Frame::data(rest))
        });
        BodyExt::boxed(StreamBody::new(futures::StreamExt::chain(first, later)))
    } else if cut {
        s.dropped.fetch_add(1, Ordering::SeqCst);
        let half = data.slice(..data.len() / 2);
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> =
            vec![Ok(Frame::data(half)), Err("cut by front".into())];
        BodyExt::boxed(StreamBody::new(futures::stream::iter(chunks)))
    } else {
        crate::http::full(data)
    };
    let mut r = Response::new(body);
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
    for (k, v) in up_headers.iter() {
        if k == "transfer-encoding" || k == "connection" {
            continue;
        }
        r.headers_mut().append(k.clone(), v.clone());
    }
    r
}

/// A chunked body: `prefix`, then `junk` bytes of `x` generated as the connection
/// takes them (never held in memory), counted in `hostile_bytes_sent`.
fn flood(stats: Arc<FrontStats>, prefix: Bytes, junk: usize) -> Body {
    const PIECE: usize = 64 << 10;
    let piece = Bytes::from(vec![b'x'; PIECE]);
    let first = futures::stream::iter([Ok::<_, BoxError>(Frame::data(prefix))]);
    let rest = futures::stream::unfold(junk, move |left| {
        let piece = piece.clone();
        let stats = stats.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(PIECE);
            stats.hostile_bytes_sent.fetch_add(n, Ordering::SeqCst);
            Some((Ok::<_, BoxError>(Frame::data(piece.slice(..n))), left - n))
        }
    });
    BodyExt::boxed(StreamBody::new(futures::StreamExt::chain(first, rest)))
}
