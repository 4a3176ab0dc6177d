//! Range replies: `Content-Range` values, `multipart/byteranges` boundaries, and
//! `multipart/byteranges` replies read as they arrive: each part's bytes are handed on
//! with their blob offset while the rest of the reply is still on the wire, so a reader
//! of many ranges can use the first before the last has come.

use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};

/// Longest header block accepted for one part (a Content-Type and a Content-Range
/// need well under 200 bytes).
const MAX_PART_HEADERS: usize = 8 << 10;
/// Most bytes accepted before the first delimiter (a preamble), or between a part's
/// data and the next delimiter (a line break).
const MAX_GAP: usize = 1 << 10;

enum State {
    /// Looking for the next `--boundary`.
    Delimiter { first: bool },
    /// Right after a delimiter: `--` closes the reply, anything else opens headers.
    AfterDelimiter,
    /// Reading a part's header block up to its blank line.
    Headers,
    /// Handing on a part's data: `left` bytes from blob offset `at`.
    Data { at: u64, left: u64 },
    /// After the closing delimiter; the epilogue is ignored.
    End,
}

/// An incremental `multipart/byteranges` parser. Part lengths come from each part's
/// Content-Range, so blob bytes that look like a delimiter are harmless. Every part
/// must lie inside `bounds`; with `ordered`, parts must come in ascending,
/// non-overlapping order (the order asked for), and [`MultipartStream::finish`] checks
/// that each range of `wanted` lay whole inside one part.
pub(crate) struct MultipartStream {
    delim: Vec<u8>,
    bounds: Range<u64>,
    ordered: bool,
    wanted: Vec<Range<u64>>,
    covered: usize,
    next_start: u64,
    state: State,
    pending: BytesMut,
}

impl MultipartStream {
    pub fn new(boundary: &str, bounds: Range<u64>, ordered: bool) -> MultipartStream {
        MultipartStream {
            delim: format!("--{boundary}").into_bytes(),
            next_start: bounds.start,
            bounds,
            ordered,
            wanted: Vec::new(),
            covered: 0,
            state: State::Delimiter { first: true },
            pending: BytesMut::new(),
        }
    }

    /// Ranges (sorted) the reply must cover, checked by [`MultipartStream::finish`].
    pub fn expecting(mut self, wanted: &[Range<u64>]) -> MultipartStream {
        self.wanted = wanted.to_vec();
        self
    }

    /// Takes the next bytes of the body and hands every complete piece of part data to
    /// `out` as `(blob offset, bytes)`; data bytes are passed on without copying.
    pub fn feed(
        &mut self,
        mut input: Bytes,
        out: &mut dyn FnMut(u64, Bytes),
    ) -> Result<(), String> {
        while !input.is_empty() {
            match self.state {
                State::End => return Ok(()),
                State::Data { at, left } => {
                    let n = usize::try_from(left).map_or(input.len(), |l| l.min(input.len()));
                    out(at, input.split_to(n));
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::Delimiter { first: false }
                    } else {
                        State::Data {
                            at: at + n as u64,
                            left,
                        }
                    };
                }
                State::Delimiter { first } => {
                    let delim = std::mem::take(&mut self.delim);
                    let found = self.take_until(&mut input, &delim, MAX_GAP);
                    self.delim = delim;
                    let Some(before) = found.map_err(|_| {
                        if first {
                            "no multipart boundary in body".to_string()
                        } else {
                            "missing boundary after a part".to_string()
                        }
                    })?
                    else {
                        return Ok(());
                    };
                    if !first && !before.iter().all(u8::is_ascii_whitespace) {
                        return Err("unexpected bytes after a part's data".into());
                    }
                    self.state = State::AfterDelimiter;
                }
                State::AfterDelimiter => {
                    while self.pending.len() < 2 && !input.is_empty() {
                        self.pending.extend_from_slice(&input.split_to(1));
                    }
                    if self.pending.len() < 2 {
                        return Ok(());
                    }
                    if &self.pending[..2] == b"--" {
                        self.pending.clear();
                        self.state = State::End;
                    } else {
                        // The two bytes (normally the line break) open the header block.
                        self.state = State::Headers;
                    }
                }
                State::Headers => {
                    let Some(block) = self
                        .take_until(&mut input, b"\r\n\r\n", MAX_PART_HEADERS)
                        .map_err(|_| "unterminated part headers".to_string())?
                    else {
                        return Ok(());
                    };
                    let (start, end) = self.part_range(&block)?;
                    self.state = State::Data {
                        at: start,
                        left: end - start,
                    };
                }
            }
        }
        Ok(())
    }

    /// Checks that the reply was whole: closed by its final delimiter, and (with
    /// `wanted`) every range covered.
    pub fn finish(&self) -> Result<(), String> {
        match self.state {
            State::End if self.covered >= self.wanted.len() => Ok(()),
            State::End => {
                let r = &self.wanted[self.covered];
                Err(format!(
                    "reply does not cover bytes {}-{}",
                    r.start,
                    r.end.saturating_sub(1)
                ))
            }
            State::Data { .. } => Err("multipart part cut short".into()),
            _ => Err("missing closing boundary".into()),
        }
    }

    /// The blob range `start..end` a header block announces, checked.
    fn part_range(&mut self, block: &[u8]) -> Result<(u64, u64), String> {
        let headers = std::str::from_utf8(block).map_err(|_| "non-UTF-8 part headers")?;
        let value = headers
            .split("\r\n")
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.trim().eq_ignore_ascii_case("content-range"))
                    .map(|(_, v)| v.trim())
            })
            .ok_or("part without Content-Range")?;
        let (s, e, _) = parse_content_range(value).ok_or("bad part Content-Range")?;
        let end = e.checked_add(1).ok_or("bad part Content-Range")?;
        if s < self.bounds.start || end > self.bounds.end {
            return Err(format!(
                "part range {s}-{e} outside bytes {}-{}",
                self.bounds.start,
                self.bounds.end.saturating_sub(1)
            ));
        }
        if self.ordered {
            if s < self.next_start {
                return Err(format!("part range {s}-{e} out of order"));
            }
            self.next_start = end;
            while let Some(w) = self.wanted.get(self.covered) {
                if s <= w.start && w.end <= end {
                    self.covered += 1;
                } else {
                    break;
                }
            }
        }
        Ok((s, end))
    }

    /// Consumes `input` up to and including the first `needle`, returning what came
    /// before it (joined with bytes held from earlier calls), or `None` when `input`
    /// ran out first (its bytes are held). Fails once more than `max` bytes came
    /// without the needle.
    fn take_until(
        &mut self,
        input: &mut Bytes,
        needle: &[u8],
        max: usize,
    ) -> Result<Option<Bytes>, ()> {
        let window = max + needle.len();
        if self.pending.is_empty() {
            let scan = &input[..input.len().min(window)];
            if let Some(p) = find(scan, needle) {
                let before = input.split_to(p);
                input.advance(needle.len());
                return Ok(Some(before));
            }
            if input.len() >= window {
                return Err(());
            }
            self.pending.extend_from_slice(input);
            input.clear();
            return Ok(None);
        }
        let held = self.pending.len();
        let take = input.len().min(window.saturating_sub(held));
        self.pending.extend_from_slice(&input[..take]);
        let from = held.saturating_sub(needle.len() - 1);
        if let Some(p) = find(&self.pending[from..], needle).map(|p| p + from) {
            let used = p + needle.len() - held;
            input.advance(used);
            let before = self.pending.split_to(p).freeze();
            self.pending.clear();
            return Ok(Some(before));
        }
        if self.pending.len() >= window {
            return Err(());
        }
        input.advance(take);
        Ok(None)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses a whole `multipart/byteranges` body into `(offset, bytes)` parts, in the
/// order they came, each inside `0..size`.
pub(crate) fn parse_multipart(
    body: &Bytes,
    boundary: &str,
    size: u64,
) -> Result<Vec<(u64, Bytes)>, String> {
    let mut parts: Vec<(u64, Bytes)> = Vec::new();
    let mut p = MultipartStream::new(boundary, 0..size, false);
    p.feed(body.clone(), &mut |off, b| parts.push((off, b)))?;
    p.finish()?;
    Ok(parts)
}

/// Parses `bytes START-END/TOTAL` (TOTAL may be `*`).
pub(crate) fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (s, e) = range.split_once('-')?;
    let (s, e) = (s.trim().parse().ok()?, e.trim().parse().ok()?);
    if e < s {
        return None;
    }
    let total = if total.trim() == "*" {
        None
    } else {
        Some(total.trim().parse().ok()?)
    };
    Some((s, e, total))
}

pub(crate) fn boundary_of(ct: &str) -> Option<String> {
    ct.split(';').skip(1).find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = b"\r\n--XyZ\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-3/20\r\n\r\n--Xy\r\n--XyZ\r\nContent-Range: bytes 10-11/20\r\n\r\nab\r\n--XyZ--\r\n";

    #[test]
    fn whole_body() {
        let parts = parse_multipart(&Bytes::from_static(BODY), "XyZ", 20).expect("parse");
        assert_eq!(
            parts,
            vec![
                (0, Bytes::from_static(b"--Xy")),
                (10, Bytes::from_static(b"ab"))
            ]
        );
        assert!(parse_multipart(&Bytes::from_static(BODY), "XyZ", 5).is_err());
    }

    /// Fed in pieces of every size, the same data comes out, and each byte of a part
    /// is handed on as soon as it was fed.
    #[test]
    fn fed_in_pieces() {
        let first_data_end = find(BODY, b"\r\n\r\n").expect("headers") + 4 + 4;
        for step in 1..BODY.len() {
            let mut p = MultipartStream::new("XyZ", 0..20, true).expecting(&[0..4, 10..12]);
            let mut got: Vec<(u64, u8)> = Vec::new();
            for (i, piece) in BODY.chunks(step).enumerate() {
                p.feed(Bytes::copy_from_slice(piece), &mut |off, b| {
                    got.extend(b.iter().enumerate().map(|(j, &x)| (off + j as u64, x)))
                })
                .expect("feed");
                let fed = (i + 1) * step;
                if fed >= first_data_end {
                    assert!(got.len() >= 4, "step {step}: first part held back");
                }
            }
            p.finish().expect("finish");
            let want: Vec<(u64, u8)> = vec![
                (0, b'-'),
                (1, b'-'),
                (2, b'X'),
                (3, b'y'),
                (10, b'a'),
                (11, b'b'),
            ];
            assert_eq!(got, want, "step {step}");
        }
    }

    #[test]
    fn refuses_what_it_must() {
        let check = |body: &[u8], wanted: &[Range<u64>]| {
            let mut p = MultipartStream::new("B", 0..100, true).expecting(wanted);
            p.feed(Bytes::copy_from_slice(body), &mut |_, _| {})
                .and_then(|()| p.finish())
        };
        // Out of order.
        let e = check(b"--B\r\nContent-Range: bytes 10-11/100\r\n\r\nab\r\n--B\r\nContent-Range: bytes 0-1/100\r\n\r\ncd\r\n--B--", &[]);
        assert!(e.unwrap_err().contains("out of order"));
        // Beyond the bounds.
        let e = check(
            b"--B\r\nContent-Range: bytes 99-100/101\r\n\r\nab\r\n--B--",
            &[],
        );
        assert!(e.unwrap_err().contains("outside"));
        // Cut short, and without the closing delimiter.
        let e = check(b"--B\r\nContent-Range: bytes 0-9/100\r\n\r\nabc", &[]);
        assert!(e.unwrap_err().contains("cut short"));
        let e = check(b"--B\r\nContent-Range: bytes 0-1/100\r\n\r\nab\r\n", &[]);
        assert!(e.unwrap_err().contains("closing"));
        // A range asked for that no part covers.
        let e = check(
            b"--B\r\nContent-Range: bytes 0-1/100\r\n\r\nab\r\n--B--",
            &[0..2, 5..6],
        );
        assert!(e.unwrap_err().contains("5-5"));
        // Junk where the next delimiter should be, and endless headers.
        let e = check(
            b"--B\r\nContent-Range: bytes 0-1/100\r\n\r\nabXX\r\n--B--",
            &[],
        );
        assert!(e.unwrap_err().contains("unexpected"));
        let mut flood = b"--B\r\nX: ".to_vec();
        flood.extend(std::iter::repeat_n(b'x', 20_000));
        assert!(check(&flood, &[]).unwrap_err().contains("unterminated"));
        let e = check(&[b'y'; 5000], &[]);
        assert!(e.unwrap_err().contains("no multipart boundary"));
    }
}
