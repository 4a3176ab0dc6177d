//! Random access to one blob: size discovery, single and multi-range reads
//! with coalescing, fallbacks for registries that mishandle ranges, and
//! verified whole-blob reads.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use reqwest::{Method, Response};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::OnceCell;
use url::Url;

use crate::client::{Client, Endpoint, Scope, Spec, Subject};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::multipart::{boundary_of, parse_content_range, parse_multipart, MultipartStream};
use crate::reference::Reference;

/// Reads one blob of one repository. Cheap to share behind an `Arc`; all
/// methods take `&self` and may run concurrently.
pub struct BlobReader {
    client: Client,
    reference: Reference,
    digest: Digest,
    scope: Scope,
    size: OnceCell<u64>,
    endpoint: OnceCell<Endpoint>,
    redirect: Mutex<Option<(Url, Instant)>>,
}

impl Client {
    /// A reader for `digest` in the repository of `r` (its tag/digest are ignored).
    pub fn blob_reader(&self, r: &Reference, digest: Digest, size: Option<u64>) -> BlobReader {
        let cell = OnceCell::new();
        if let Some(s) = size {
            let _ = cell.set(s);
        }
        BlobReader {
            client: self.clone(),
            scope: Scope::pull(r.repository()),
            reference: r.clone(),
            digest,
            size: cell,
            endpoint: OnceCell::new(),
            redirect: Mutex::new(None),
        }
    }
}

/// What a ranged GET produced.
enum Parts {
    /// (offset, bytes) pieces of the blob.
    Got(Vec<(u64, Bytes)>, RangeSupport),
    /// The server refused a multi-range request (400/416).
    Refused,
}

/// What a streamed multi-range request passes to the reader that hands its bytes on.
enum Streamed {
    /// Blob bytes at an offset.
    Piece(u64, Bytes),
    /// The request is over: `Ok(Some(why))` if the host mishandled it.
    End(Result<Option<&'static str>>),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RangeSupport {
    Multi,
    SingleOnly,
    Ignored,
}

impl BlobReader {
    /// The blob's digest.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    async fn endpoint(&self) -> Result<&Endpoint> {
        self.endpoint
            .get_or_try_init(|| async {
                // The first endpoint that knows the blob serves all later reads.
                let mut last = None;
                let mut eps = self.client.endpoints(self.reference.registry())?;
                let n = eps.len();
                // With no mirror to choose from, a HEAD would only cost a round trip
                // before the first read: the read itself tells whether the registry has
                // the blob, and [`BlobReader::size`] asks for the size when it is needed
                // and not known (from the manifest, or a suffix read's reply).
                // A "mirror" with the registry's own host is the registry itself: the way
                // a plain-HTTP registry is configured (a mirror of itself with `insecure =
                // true`). It is asked as the registry is, with no probe.
                let own_first = eps
                    .first()
                    .is_some_and(|ep| ep.host == self.reference.registry());
                if (n == 1 || own_first) && !eps.is_empty() {
                    return Ok(eps.swap_remove(0));
                }
                for (i, ep) in eps.into_iter().enumerate() {
                    let mirror = i + 1 < n;
                    if mirror && self.mirror_range_support(&ep) == Some(false) {
                        continue;
                    }
                    // A mirror is asked with a one-byte ranged GET: one round trip tells
                    // whether it has the blob, its size, and whether it honours Range
                    // (a 200 would turn every small read into a whole-blob download).
                    // The registry itself is used as it is, so a HEAD will do.
                    let found = if mirror {
                        self.range_probe(&ep).await
                    } else {
                        self.head_size(&ep).await.map(|s| (s, true))
                    };
                    match found {
                        Ok((s, honours_range)) => {
                            if mirror && s > 0 {
                                self.note_mirror_range_support(&ep, honours_range);
                                if !honours_range {
                                    continue;
                                }
                            }
                            let _ = self.size.set(s);
                            return Ok(ep);
                        }
                        Err(e) => {
                            tracing::debug!(endpoint = %ep.host, error = %e, "endpoint cannot serve blob");
                            last = Some(e);
                        }
                    }
                }
                Err(last.unwrap_or_else(|| Error::Config("no endpoint".into())))
            })
            .await
    }

    /// Whether the mirror `ep` honoured Range when this client last asked it.
    fn mirror_range_support(&self, ep: &Endpoint) -> Option<bool> {
        self.client
            .inner
            .mirror_ranges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ep.host)
            .copied()
    }

    fn note_mirror_range_support(&self, ep: &Endpoint, honours: bool) {
        let before = self
            .client
            .inner
            .mirror_ranges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ep.host.clone(), honours);
        if !honours && before != Some(false) {
            tracing::warn!(mirror = %ep.host, "mirror ignores Range (answered a ranged GET with 200); skipping it for blob reads");
        }
    }

    fn url(&self, ep: &Endpoint) -> Result<Url> {
        ep.base
            .join(&format!(
                "{}/blobs/{}",
                self.reference.repository(),
                self.digest
            ))
            .map_err(|e| Error::Config(e.to_string()))
    }

    fn spec(
        &self,
        ep: &Endpoint,
        method: Method,
        headers: HeaderMap,
        pass: &'static [u16],
    ) -> Result<Spec<'_>> {
        let fetch = std::time::Duration::from_secs(self.client.inner.blob.fetching_timeout_sec);
        Ok(Spec {
            method,
            url: self.url(ep)?,
            headers,
            body: None,
            subject: Subject::Blob {
                repository: self.reference.repository().to_string(),
                digest: self.digest.to_string(),
            },
            scope: &self.scope,
            // Data transfers may legitimately take long; stalls are caught by the idle read timeout.
            attempt_timeout: Some(fetch),
            deadline: Instant::now() + fetch,
            redirect_cache: Some(&self.redirect),
            pass_status: pass,
        })
    }

    /// The blob's size: HEAD, or `GET Range: bytes=0-0` where HEAD is refused.
    pub async fn size(&self) -> Result<u64> {
        if let Some(s) = self.size.get() {
            return Ok(*s);
        }
        let ep = self.endpoint().await?;
        // One look-up however many callers ask at once (an early probe and the first
        // read of a layer, say).
        self.size
            .get_or_try_init(|| self.head_size(ep))
            .await
            .copied()
    }

    /// Tells the reader the blob's size (from the manifest), unless it knows it
    /// already: reads then need no look-up of their own.
    pub fn know_size(&self, size: u64) {
        let _ = self.size.set(size);
    }

    /// The last `len` bytes of the blob (all of it when it is shorter) and the blob's
    /// size, in one `Range: bytes=-LEN` request: nothing has to be known first, so the
    /// tail holding a layer's TOC can be the first request for it. The size the reply
    /// gives is kept (a different one than already known is an error).
    pub async fn read_suffix(&self, len: u64) -> Result<(u64, Bytes)> {
        let ep = self.endpoint().await?.clone();
        let len = len.max(1);
        let mut h = HeaderMap::new();
        h.insert(
            RANGE,
            HeaderValue::from_str(&format!("bytes=-{len}"))
                .map_err(|e| Error::Config(e.to_string()))?,
        );
        let spec = self.spec(&ep, Method::GET, h, &[])?;
        let host = ep.host.clone();
        let read = move |resp: Response| {
            let host = host.clone();
            async move {
                match resp.status().as_u16() {
                    206 => {
                        let (start, end, total) = resp
                            .headers()
                            .get(CONTENT_RANGE)
                            .and_then(|v| v.to_str().ok())
                            .and_then(parse_content_range)
                            .ok_or_else(|| Error::protocol(&host, "206 without Content-Range"))?;
                        let total = total.ok_or_else(|| {
                            Error::protocol(&host, "suffix reply without the blob's size")
                        })?;
                        let want = len.min(total);
                        if end.checked_add(1) != Some(total) || end + 1 - start != want {
                            return Err(Error::protocol(
                                &host,
                                format!("reply {start}-{end}/{total} is not the last {want} bytes"),
                            ));
                        }
                        let body = read_body(resp, &host, Some(want), false, want).await?;
                        Ok((total, body))
                    }
                    // The whole blob: taken only when it is no longer than asked for
                    // (a registry that ignores Range would send all of a large one).
                    _ => match resp.content_length() {
                        Some(total) if total <= len => {
                            let body = read_body(resp, &host, Some(total), false, total).await?;
                            Ok((total, body))
                        }
                        _ => Err(Error::protocol(
                            &host,
                            "a suffix range was answered with the whole blob",
                        )),
                    },
                }
            }
            .boxed()
        };
        let (total, body) = self.client.execute(&ep, &spec, &read).await?;
        let known = *self.size.get_or_init(|| async { total }).await;
        if known != total {
            return Err(Error::protocol(
                &ep.host,
                format!("blob size {total} differs from the {known} known"),
            ));
        }
        Ok((total, body))
    }

    async fn head_size(&self, ep: &Endpoint) -> Result<u64> {
        let mut spec = self.spec(ep, Method::HEAD, HeaderMap::new(), &[400, 403, 405, 501])?;
        // Metadata requests use the endpoint's request timeout.
        spec.attempt_timeout = None;
        let read = |resp: Response| {
            async move {
                // The header itself: the body of a HEAD reply is empty, so the length
                // the HTTP client reports for it is 0.
                Ok(if resp.status().is_success() {
                    resp.headers()
                        .get(CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                } else {
                    None
                })
            }
            .boxed()
        };
        let len = match self.client.execute(ep, &spec, &read).await? {
            Some(l) if l > 0 || self.known_empty() => Some(l),
            _ => None,
        };
        if let Some(l) = len {
            return Ok(l);
        }
        tracing::debug!(endpoint = %ep.host, "HEAD gave no size; asking with a one-byte range");
        self.range_probe(ep).await.map(|(size, _)| size)
    }

    /// `GET Range: bytes=0-0`: the blob's size, and whether `ep` honoured the range (a
    /// 206) or sent the whole blob (a 200, whose body is not read).
    async fn range_probe(&self, ep: &Endpoint) -> Result<(u64, bool)> {
        let mut h = HeaderMap::new();
        h.insert(RANGE, HeaderValue::from_static("bytes=0-0"));
        let mut spec = self.spec(ep, Method::GET, h, &[])?;
        spec.attempt_timeout = None;
        let host = ep.host.clone();
        let read = move |resp: Response| {
            let host = host.clone();
            async move {
                if resp.status().as_u16() == 206 {
                    let cr = resp
                        .headers()
                        .get(CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_content_range);
                    match cr {
                        Some((_, _, Some(total))) => Ok((total, true)),
                        _ => Err(Error::protocol(
                            &host,
                            "206 without a usable Content-Range total",
                        )),
                    }
                } else {
                    resp.content_length()
                        .map(|l| (l, false))
                        .ok_or_else(|| Error::protocol(&host, "no Content-Length on blob"))
                }
            }
            .boxed()
        };
        self.client.execute(ep, &spec, &read).await
    }

    fn known_empty(&self) -> bool {
        // sha256 of the empty string: a zero size is genuine only for it.
        self.digest.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    }

    /// Reads `len` bytes at `offset` (clamped to the blob's end).
    pub async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
        let mut v = self
            .read_ranges(std::slice::from_ref(&(offset..offset.saturating_add(len))))
            .await?;
        Ok(v.pop().unwrap_or_default())
    }

    /// Reads several ranges; returns one `Bytes` per requested range, in order.
    /// Ranges are clamped to the blob's end; empty ranges give empty bytes.
    pub async fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let size = self.size().await?;
        let ep = self.endpoint().await?.clone();
        let wanted: Vec<Range<u64>> = ranges
            .iter()
            .map(|r| r.start.min(size)..r.end.min(size).max(r.start.min(size)))
            .collect();
        let groups = coalesce(&wanted, self.client.inner.blob.coalesce_gap_bytes);
        if groups.is_empty() {
            return Ok(wanted.iter().map(|_| Bytes::new()).collect());
        }
        let fetched = self.fetch_groups(&ep, &groups, size).await?;
        // fetched[i] holds group i; slice each wanted range out of its group.
        let mut out = Vec::with_capacity(wanted.len());
        for r in &wanted {
            if r.is_empty() {
                out.push(Bytes::new());
                continue;
            }
            let gi = groups.partition_point(|g| g.end <= r.start);
            let g = groups
                .get(gi)
                .ok_or_else(|| Error::protocol(&ep.host, "range bookkeeping"))?;
            let data = &fetched[gi];
            let s = (r.start - g.start) as usize;
            let e = (r.end - g.start) as usize;
            if e > data.len() {
                return Err(Error::protocol(&ep.host, "short range data"));
            }
            out.push(data.slice(s..e));
        }
        Ok(out)
    }

    /// Reads several ranges and hands their bytes to `sink` in blob order, each piece
    /// with its blob offset. Neighbouring ranges are merged as for
    /// [`BlobReader::read_ranges`], so pieces may carry the bytes of the gaps between
    /// them. When everything merges into one range it is streamed as it arrives (see
    /// [`BlobReader::read_range_streaming`], including repeats after a retry); otherwise
    /// each merged range is handed over whole once the reply is in.
    pub async fn read_ranges_streaming(
        &self,
        ranges: &[Range<u64>],
        sink: RangeSink,
    ) -> Result<()> {
        let size = self.size().await?;
        let wanted: Vec<Range<u64>> = ranges
            .iter()
            .map(|r| r.start.min(size)..r.end.min(size).max(r.start.min(size)))
            .collect();
        let groups = coalesce(&wanted, self.client.inner.blob.coalesce_gap_bytes);
        match groups.as_slice() {
            [] => Ok(()),
            [one] => self.read_range_streaming(one.clone(), sink).await,
            _ => {
                let ep = self.endpoint().await?.clone();
                if !self.multi_range_ok(&ep) {
                    return self.stream_singles(&ep, &groups, size, &sink).await;
                }
                self.stream_groups(&ep, &groups, size, &sink).await
            }
        }
    }

    /// Whether multi-range requests are worth sending to this host.
    fn multi_range_ok(&self, ep: &Endpoint) -> bool {
        !self.client.inner.blob.force_single_range_mode
            && !self
                .client
                .inner
                .no_multi_range
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&ep.host)
    }

    /// Notes a host that mishandles multi-range requests: single ranges from now on.
    fn degrade(&self, ep: &Endpoint, why: &str) {
        tracing::warn!(host = %ep.host, why, "registry does not do multi-range; using concurrent single-range requests for it from now on");
        self.client
            .inner
            .no_multi_range
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ep.host.clone());
    }

    /// How `groups` (more than one) are spread over multi-range requests: at most
    /// `max_ranges_per_request` each, and one request per MiB up to
    /// `multi_range_parallelism`.
    fn batches<'g>(&self, groups: &'g [Range<u64>]) -> Vec<(usize, &'g [Range<u64>])> {
        let blob = &self.client.inner.blob;
        let total: u64 = groups.iter().map(|g| g.end - g.start).sum();
        let by_count = groups.len().div_ceil(blob.max_ranges_per_request.max(1));
        let by_bytes = ((total >> 20) as usize).min(blob.multi_range_parallelism);
        let n = by_count.max(by_bytes).clamp(1, groups.len().max(1));
        let per = groups.len().div_ceil(n).max(1);
        groups
            .chunks(per)
            .enumerate()
            .map(|(i, c)| (i * per, c))
            .collect()
    }

    /// Streams `groups` through concurrent multi-range requests and hands their bytes
    /// to `sink` in blob order: the first request's parts as they arrive, each later
    /// one's as soon as every earlier one is done (held meanwhile). A request the host
    /// mishandles is done again as single ranges, and the host is noted.
    async fn stream_groups(
        &self,
        ep: &Endpoint,
        groups: &[Range<u64>],
        size: u64,
        sink: &RangeSink,
    ) -> Result<()> {
        let batches = self.batches(groups);
        let (txs, rxs): (Vec<_>, Vec<_>) = batches
            .iter()
            .map(|_| tokio::sync::mpsc::unbounded_channel::<Streamed>())
            .unzip();
        let producers =
            futures::future::join_all(batches.iter().zip(txs).map(|((_, batch), tx)| async move {
                let res = self.stream_batch(ep, batch, tx.clone()).await;
                let _ = tx.send(Streamed::End(res));
            }));
        let consumer = async {
            for ((_, batch), mut rx) in batches.iter().zip(rxs) {
                loop {
                    match rx.recv().await {
                        Some(Streamed::Piece(off, bytes)) => sink(off, bytes),
                        Some(Streamed::End(Ok(None))) => break,
                        Some(Streamed::End(Ok(Some(why)))) => {
                            self.degrade(ep, why);
                            self.stream_singles(ep, batch, size, sink).await?;
                            break;
                        }
                        Some(Streamed::End(Err(e))) => return Err(e),
                        None => return Err(Error::protocol(&ep.host, "range bookkeeping")),
                    }
                }
            }
            Ok(())
        };
        futures::pin_mut!(producers, consumer);
        match futures::future::select(producers, consumer).await {
            futures::future::Either::Left((_, consumer)) => consumer.await,
            futures::future::Either::Right((res, _)) => res,
        }
    }

    /// One multi-range GET whose `multipart/byteranges` reply is parsed as it arrives,
    /// each piece sent to `tx`. `Ok(Some(why))`: the host mishandled the request and
    /// nothing was sent.
    async fn stream_batch(
        &self,
        ep: &Endpoint,
        batch: &[Range<u64>],
        tx: tokio::sync::mpsc::UnboundedSender<Streamed>,
    ) -> Result<Option<&'static str>> {
        let h = range_header(batch)?;
        let spec = self.spec(ep, Method::GET, h, &[400, 416])?;
        let host = ep.host.clone();
        let max = multipart_max(batch);
        let span = batch.first().map_or(0, |r| r.start)..batch.last().map_or(0, |r| r.end);
        let wanted = batch.to_vec();
        let read = move |mut resp: Response| {
            let (host, tx, span, wanted) = (host.clone(), tx.clone(), span.clone(), wanted.clone());
            async move {
                match resp.status().as_u16() {
                    400 | 416 => return Ok(Some("refused multi-range request")),
                    200 => return Ok(Some("ignored Range and sent the whole blob")),
                    _ => {}
                }
                let ct = resp
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_ascii_lowercase();
                if !ct.starts_with("multipart/byteranges") {
                    return Ok(Some("answered a multi-range request with one range"));
                }
                let boundary = boundary_of(&ct)
                    .ok_or_else(|| Error::protocol(&host, "multipart reply without boundary"))?;
                let mut parser = MultipartStream::new(&boundary, span, true).expecting(&wanted);
                let mut received = 0u64;
                while let Some(c) = resp.chunk().await.map_err(|e| Error::Connection {
                    host: host.to_string(),
                    detail: crate::error::error_chain(&e),
                })? {
                    received = received.saturating_add(c.len() as u64);
                    if received > max {
                        return Err(Error::protocol(
                            &host,
                            format!("reply body is longer than the {max} bytes asked for"),
                        ));
                    }
                    parser
                        .feed(c, &mut |off, piece| {
                            let _ = tx.send(Streamed::Piece(off, piece));
                        })
                        .map_err(|d| Error::protocol(&host, d))?;
                }
                parser.finish().map_err(|d| Error::protocol(&host, d))?;
                Ok(None)
            }
            .boxed()
        };
        self.client.execute(ep, &spec, &read).await
    }

    /// Reads each of `groups` with its own GET, several at once, handing each to `sink`
    /// whole, in blob order, as soon as it and every earlier one are in.
    async fn stream_singles(
        &self,
        ep: &Endpoint,
        groups: &[Range<u64>],
        size: u64,
        sink: &RangeSink,
    ) -> Result<()> {
        use futures::StreamExt;
        let parallel = self
            .client
            .inner
            .blob
            .max_concurrent_requests_per_host
            .max(1);
        let mut replies = futures::stream::iter(groups.iter().cloned())
            .map(|g| async move {
                let got = self.fetch_singles(ep, std::slice::from_ref(&g), size).await;
                (g, got)
            })
            .buffered(parallel);
        while let Some((g, got)) = replies.next().await {
            if let Some(bytes) = got?.pop() {
                sink(g.start, bytes);
            }
        }
        Ok(())
    }

    /// Reads one range and hands its bytes to `sink` as they arrive, each piece with its
    /// blob offset, so a caller can use the front of a large range before the rest has
    /// come. The range is clamped to the blob's end. An attempt that breaks off is
    /// retried like any read, from the start of the range: `sink` may see bytes again,
    /// at the same offsets.
    pub async fn read_range_streaming(&self, range: Range<u64>, sink: RangeSink) -> Result<()> {
        let size = self.size().await?;
        let ep = self.endpoint().await?.clone();
        let range = range.start.min(size)..range.end.min(size);
        if range.is_empty() {
            return Ok(());
        }
        let mut h = HeaderMap::new();
        h.insert(
            RANGE,
            HeaderValue::from_str(&format!("bytes={}-{}", range.start, range.end - 1))
                .map_err(|e| Error::Config(e.to_string()))?,
        );
        let spec = self.spec(&ep, Method::GET, h, &[])?;
        let host = ep.host.clone();
        let read = move |mut resp: Response| {
            let (host, sink, range) = (host.clone(), sink.clone(), range.clone());
            async move {
                let conn = |e: reqwest::Error| Error::Connection {
                    host: host.to_string(),
                    detail: crate::error::error_chain(&e),
                };
                let start = match resp.status().as_u16() {
                    200 => 0,
                    _ => {
                        let ct = resp
                            .headers()
                            .get(CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        if ct.to_ascii_lowercase().starts_with("multipart/byteranges") {
                            let boundary = boundary_of(ct).ok_or_else(|| {
                                Error::protocol(&host, "multipart reply without boundary")
                            })?;
                            let max = multipart_max(std::slice::from_ref(&range));
                            let body = read_body(resp, &host, None, false, max).await?;
                            let parts = parse_multipart(&body, &boundary, size)
                                .map_err(|d| Error::protocol(&host, d))?;
                            let data = cut(&parts, &range).ok_or_else(|| {
                                Error::protocol(&host, "reply does not cover the range")
                            })?;
                            sink(range.start, data);
                            return Ok(());
                        }
                        resp.headers()
                            .get(CONTENT_RANGE)
                            .and_then(|v| v.to_str().ok())
                            .and_then(parse_content_range)
                            .map(|(start, _, _)| start)
                            .ok_or_else(|| Error::protocol(&host, "206 without Content-Range"))?
                    }
                };
                if start > range.start {
                    return Err(Error::protocol(&host, "reply starts after the range"));
                }
                let mut at = start;
                while at < range.end {
                    let Some(piece) = resp.chunk().await.map_err(conn)? else {
                        return Err(Error::Connection {
                            host: host.to_string(),
                            detail: format!(
                                "body ended after {} of {} bytes",
                                at.saturating_sub(range.start),
                                range.end - range.start
                            ),
                        });
                    };
                    let piece_end = at + piece.len() as u64;
                    // A registry that ignored Range sends the blob from its start.
                    let from = range.start.max(at);
                    let to = range.end.min(piece_end);
                    if from < to {
                        sink(from, piece.slice((from - at) as usize..(to - at) as usize));
                    }
                    at = piece_end;
                }
                Ok(())
            }
            .boxed()
        };
        self.client.execute(&ep, &spec, &read).await
    }

    async fn fetch_groups(
        &self,
        ep: &Endpoint,
        groups: &[Range<u64>],
        size: u64,
    ) -> Result<Vec<Bytes>> {
        if groups.len() < 2 || !self.multi_range_ok(ep) {
            return self.fetch_singles(ep, groups, size).await;
        }
        let mut results: Vec<Option<Bytes>> = vec![None; groups.len()];
        let batches = self.batches(groups);
        let replies = futures::future::try_join_all(
            batches.iter().map(|(_, b)| self.get_ranges(ep, b, size)),
        )
        .await?;
        let mut degraded = None;
        for ((first, batch), reply) in batches.iter().zip(replies) {
            match reply {
                Parts::Refused => degraded = Some("refused multi-range request"),
                Parts::Got(parts, support) => {
                    match support {
                        RangeSupport::Ignored => {
                            degraded = Some("ignored Range and sent the whole blob")
                        }
                        RangeSupport::SingleOnly => {
                            degraded = Some("answered a multi-range request with one range")
                        }
                        RangeSupport::Multi => {}
                    }
                    for (j, g) in batch.iter().enumerate() {
                        results[first + j] = cut(&parts, g);
                    }
                }
            }
        }
        if let Some(why) = degraded {
            self.degrade(ep, why);
        }
        let missing: Vec<usize> = (0..groups.len())
            .filter(|i| results[*i].is_none())
            .collect();
        if !missing.is_empty() {
            let rs: Vec<Range<u64>> = missing.iter().map(|i| groups[*i].clone()).collect();
            let got = self.fetch_singles(ep, &rs, size).await?;
            for (i, b) in missing.into_iter().zip(got) {
                results[i] = Some(b);
            }
        }
        Ok(results.into_iter().map(Option::unwrap_or_default).collect())
    }

    async fn fetch_singles(
        &self,
        ep: &Endpoint,
        groups: &[Range<u64>],
        size: u64,
    ) -> Result<Vec<Bytes>> {
        futures::future::try_join_all(groups.iter().map(|g| async move {
            match self.get_ranges(ep, std::slice::from_ref(g), size).await? {
                Parts::Got(parts, _) => cut(&parts, g).ok_or_else(|| {
                    Error::protocol(
                        &ep.host,
                        format!("reply does not cover bytes {}-{}", g.start, g.end - 1),
                    )
                }),
                Parts::Refused => Err(Error::protocol(
                    &ep.host,
                    format!("range {}-{} refused", g.start, g.end - 1),
                )),
            }
        }))
        .await
    }

    /// One GET with one or more ranges.
    async fn get_ranges(&self, ep: &Endpoint, ranges: &[Range<u64>], size: u64) -> Result<Parts> {
        let h = range_header(ranges)?;
        let multi = ranges.len() > 1;
        let spec = self.spec(ep, Method::GET, h, if multi { &[400, 416] } else { &[] })?;
        let host = ep.host.clone();
        let need_end = ranges.iter().map(|r| r.end).max().unwrap_or(0);
        let need_start = ranges.iter().map(|r| r.start).min().unwrap_or(0);
        let multipart_limit = multipart_max(ranges);
        let read = move |resp: Response| {
            let host = host.clone();
            async move {
                let status = resp.status().as_u16();
                if status == 400 || status == 416 {
                    return Ok(Parts::Refused);
                }
                if status == 200 {
                    tracing::warn!(%host, "registry ignored Range and sent the whole blob; reading only the needed prefix");
                    let body = read_body(resp, &host, Some(need_end), true, need_end).await?;
                    return Ok(Parts::Got(vec![(0, body)], RangeSupport::Ignored));
                }
                let ct = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                if ct.to_ascii_lowercase().starts_with("multipart/byteranges") {
                    let boundary = boundary_of(&ct).ok_or_else(|| Error::protocol(&host, "multipart reply without boundary"))?;
                    let body = read_body(resp, &host, None, false, multipart_limit).await?;
                    let parts = parse_multipart(&body, &boundary, size).map_err(|d| Error::protocol(&host, d))?;
                    return Ok(Parts::Got(parts, RangeSupport::Multi));
                }
                let (start, end, _) = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range)
                    .ok_or_else(|| Error::protocol(&host, "206 without Content-Range"))?;
                // The reply may merge the requested ranges but never reach beyond them.
                if start < need_start || end >= need_end {
                    return Err(Error::protocol(&host, format!(
                        "206 for bytes {start}-{end}, outside the requested {need_start}-{}",
                        need_end.saturating_sub(1)
                    )));
                }
                let len = end + 1 - start;
                let body = read_body(resp, &host, Some(len), false, len).await?;
                Ok(Parts::Got(vec![(start, body)], if multi { RangeSupport::SingleOnly } else { RangeSupport::Multi }))
            }
            .boxed()
        };
        self.client.execute(ep, &spec, &read).await
    }

    /// Reads the whole blob and verifies its digest.
    pub async fn read_all(&self) -> Result<Bytes> {
        // The size is the registry's claim: the buffer grows with what actually arrives.
        let mut buf =
            Vec::with_capacity(self.size.get().copied().unwrap_or(0).min(64 << 20) as usize);
        self.copy_to(&mut buf).await?;
        Ok(Bytes::from(buf))
    }

    /// Streams the whole blob into `w`, resuming with a range after a broken
    /// connection, and verifies the digest at the end. Returns the byte count.
    ///
    /// On a digest mismatch the bytes have already been written; callers
    /// writing to files should discard them.
    pub async fn copy_to<W: AsyncWrite + Unpin + Send>(&self, w: &mut W) -> Result<u64> {
        let ep = self.endpoint().await?.clone();
        let size = self.size().await?;
        let mut hasher = self.digest.hasher();
        let mut written: u64 = 0;
        let retries = self.client.inner.blob.max_retries;
        let mut failures = 0;
        let deadline = self.client.deadline();
        while written < size {
            let mut h = HeaderMap::new();
            if written > 0 {
                h.insert(
                    RANGE,
                    HeaderValue::from_str(&format!("bytes={written}-"))
                        .map_err(|e| Error::Config(e.to_string()))?,
                );
            }
            let spec = self.spec(&ep, Method::GET, h, &[])?;
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
            let host = ep.host.clone();
            let skip_to = written;
            // The response is handed over through a channel so the body can be
            // streamed to `w` while the request machinery owns the response.
            let tx = Arc::new(tx);
            let read = move |mut resp: Response| {
                let tx = tx.clone();
                let host = host.clone();
                async move {
                    let mut pos = 0u64;
                    let mut skip = 0u64;
                    if skip_to > 0 && resp.status().as_u16() == 200 {
                        tracing::warn!(%host, "registry ignored Range on resume; skipping the part already read");
                        skip = skip_to;
                    }
                    // Bytes still wanted from this reply; a longer body is cut off there.
                    let want = size - skip_to;
                    while let Some(chunk) = resp.chunk().await.map_err(|e| Error::Connection { host: host.clone(), detail: crate::error::error_chain(&e) })? {
                        let n = chunk.len() as u64;
                        let piece = if pos + n <= skip {
                            None
                        } else if pos < skip {
                            Some(chunk.slice((skip - pos) as usize..))
                        } else {
                            Some(chunk)
                        };
                        pos += n;
                        if let Some(p) = piece {
                            if tx.send(p).await.is_err() {
                                return Ok(());
                            }
                        }
                        if pos.saturating_sub(skip) >= want {
                            break;
                        }
                    }
                    Ok(())
                }
                .boxed()
            };
            let fut = self.client.execute(&ep, &spec, &read);
            tokio::pin!(fut);
            let mut result = None;
            loop {
                tokio::select! {
                    r = &mut fut, if result.is_none() => { result = Some(r); }
                    chunk = rx.recv() => match chunk {
                        Some(c) => {
                            let room = size - written;
                            let c = if c.len() as u64 > room { c.slice(..room as usize) } else { c };
                            hasher.update(&c);
                            w.write_all(&c).await.map_err(|e| Error::Io { path: "output".into(), source: e })?;
                            written += c.len() as u64;
                        }
                        None => break,
                    },
                }
                if result.is_some() && rx.is_empty() {
                    // Drain whatever is left, then stop.
                    while let Ok(c) = rx.try_recv() {
                        let room = size - written;
                        let c = if c.len() as u64 > room {
                            c.slice(..room as usize)
                        } else {
                            c
                        };
                        hasher.update(&c);
                        w.write_all(&c).await.map_err(|e| Error::Io {
                            path: "output".into(),
                            source: e,
                        })?;
                        written += c.len() as u64;
                    }
                    break;
                }
            }
            match result {
                Some(Ok(())) if written >= size => break,
                Some(Ok(()))
                | Some(Err(Error::Connection { .. }))
                | Some(Err(Error::Timeout { .. })) => {
                    failures += 1;
                    if failures > retries || Instant::now() >= deadline {
                        return Err(match result {
                            Some(Err(e)) => e,
                            _ => Error::Connection {
                                host: ep.host.clone(),
                                detail: format!("body ended after {written} of {size} bytes"),
                            },
                        });
                    }
                    tracing::warn!(host = %ep.host, written, size, "blob body broke off; resuming");
                }
                Some(Err(e)) => return Err(e),
                None => return Err(Error::protocol(&ep.host, "blob request vanished")),
            }
        }
        w.flush().await.map_err(|e| Error::Io {
            path: "output".into(),
            source: e,
        })?;
        crate::digest::finish_verify(
            hasher,
            &self.digest,
            &format!("blob {}/{}", self.reference.repository(), self.digest),
        )?;
        Ok(written)
    }
}

/// Most bytes a `multipart/byteranges` reply to `ranges` may take: the data plus
/// part headers and delimiters.
fn multipart_max(ranges: &[Range<u64>]) -> u64 {
    ranges
        .iter()
        .map(|r| (r.end - r.start).saturating_add(crate::body::MULTIPART_PART_OVERHEAD))
        .fold(crate::body::MULTIPART_PART_OVERHEAD, u64::saturating_add)
}

/// Reads a body fully (or its first `limit` bytes when `prefix`), failing
/// on a body shorter than `limit` or, unless `prefix`, longer than `max`: the bound is
/// on bytes received, whatever the headers announced.
async fn read_body(
    mut resp: Response,
    host: &str,
    limit: Option<u64>,
    prefix: bool,
    max: u64,
) -> Result<Bytes> {
    let mut buf = BytesMut::with_capacity(
        limit
            .or(resp.content_length())
            .unwrap_or(0)
            .min(max)
            .min(256 << 20) as usize,
    );
    while let Some(c) = resp.chunk().await.map_err(|e| Error::Connection {
        host: host.to_string(),
        detail: crate::error::error_chain(&e),
    })? {
        if !prefix && buf.len() as u64 + c.len() as u64 > max {
            return Err(Error::protocol(
                host,
                format!("reply body is longer than the {max} bytes asked for"),
            ));
        }
        buf.extend_from_slice(&c);
        if prefix && limit.is_some_and(|l| buf.len() as u64 >= l) {
            // Dropping the response closes the connection instead of reading the rest.
            break;
        }
    }
    if let Some(l) = limit {
        if (buf.len() as u64) < l {
            return Err(Error::Connection {
                host: host.to_string(),
                detail: format!("body ended after {} of {l} bytes", buf.len()),
            });
        }
        if prefix {
            buf.truncate(l as usize);
        }
    }
    Ok(buf.freeze())
}

/// A `Range: bytes=a-b,c-d` header for `ranges` (each non-empty).
fn range_header(ranges: &[Range<u64>]) -> Result<HeaderMap> {
    let spec = ranges
        .iter()
        .map(|r| format!("{}-{}", r.start, r.end - 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut h = HeaderMap::new();
    h.insert(
        RANGE,
        HeaderValue::from_str(&format!("bytes={spec}"))
            .map_err(|e| Error::Config(e.to_string()))?,
    );
    Ok(h)
}

/// Receives the bytes of a streamed range: `(blob offset, bytes)`.
pub type RangeSink = Arc<dyn Fn(u64, Bytes) + Send + Sync>;

/// Finds the bytes of `g` within the parts of a reply.
fn cut(parts: &[(u64, Bytes)], g: &Range<u64>) -> Option<Bytes> {
    parts.iter().find_map(|(start, data)| {
        let end = start + data.len() as u64;
        (*start <= g.start && g.end <= end)
            .then(|| data.slice((g.start - start) as usize..(g.end - start) as usize))
    })
}

/// Merges ranges (sorted by start) whose gap is at most `gap` bytes.
pub fn coalesce(ranges: &[Range<u64>], gap: u64) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = ranges.iter().filter(|r| !r.is_empty()).cloned().collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(gap) => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalescing() {
        assert_eq!(
            coalesce(&[10..20, 0..5, 22..30, 100..110], 2),
            vec![0..5, 10..30, 100..110]
        );
        assert_eq!(coalesce(&[0..10, 5..8], 0), vec![0..10]);
        assert_eq!(
            coalesce(std::slice::from_ref(&(0..0)), 0),
            Vec::<Range<u64>>::new()
        );
    }

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 0-0/1234"),
            Some((0, 0, Some(1234)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }
}
