//! Compressing and decompressing members: one gzip member or zstd frame per chunk, and
//! bounded decompression of the ranges a reader fetched.

use std::cell::RefCell;
use std::io::Read;

use crate::error::{Error, Result};
use crate::footer::Compression;

/// How the builder compresses members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// gzip at a level 0..=9 (9 by default, as the reference).
    Gzip { level: u32 },
    /// zstd:chunked at a zstd level (3 by default).
    Zstd { level: i32 },
}

impl Codec {
    pub fn compression(self) -> Compression {
        match self {
            Codec::Gzip { .. } => Compression::Gzip,
            Codec::Zstd { .. } => Compression::Zstd,
        }
    }

    pub(crate) fn validate(self) -> Result<()> {
        match self {
            Codec::Gzip { level } if level > 9 => Err(Error::InvalidOption(format!(
                "gzip compression level {level} is not in 0..=9"
            ))),
            Codec::Zstd { level } if !(1..=22).contains(&level) => Err(Error::InvalidOption(
                format!("zstd compression level {level} is not in 1..=22"),
            )),
            _ => Ok(()),
        }
    }
}

thread_local! {
    static DEFLATER: RefCell<Option<(u32, libdeflater::Compressor)>> = const { RefCell::new(None) };
    static ZSTD: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

/// Compresses one member. Output depends only on the input and the codec, never on
/// which thread runs it.
pub fn compress_member(codec: Codec, data: &[u8]) -> Result<Vec<u8>> {
    match codec {
        Codec::Gzip { level } => DEFLATER.with(|cell| {
            let mut slot = cell.borrow_mut();
            let c = match slot.take() {
                Some((l, c)) if l == level => &mut slot.insert((l, c)).1,
                _ => {
                    let lvl = libdeflater::CompressionLvl::new(level as i32)
                        .map_err(|_| Error::InvalidOption(format!("gzip level {level}")))?;
                    &mut slot.insert((level, libdeflater::Compressor::new(lvl))).1
                }
            };
            let mut out = vec![0u8; c.gzip_compress_bound(data.len())];
            let n = c
                .gzip_compress(data, &mut out)
                .map_err(|e| Error::Io(std::io::Error::other(format!("gzip: {e:?}"))))?;
            out.truncate(n);
            Ok(out)
        }),
        Codec::Zstd { level } => ZSTD.with(|cell| {
            let mut slot = cell.borrow_mut();
            let c = match slot.take() {
                Some((l, c)) if l == level => &mut slot.insert((l, c)).1,
                _ => {
                    let mut c = zstd::bulk::Compressor::new(level)?;
                    c.include_checksum(true)?;
                    c.include_contentsize(true)?;
                    &mut slot.insert((level, c)).1
                }
            };
            Ok(c.compress(data)?)
        }),
    }
}

/// Bytes the fast path may inflate ahead of a chunk into its own buffer. Past this
/// inner offset the streaming decoder skips the prefix through a fixed buffer instead,
/// so no inner offset, however large, turns into an allocation.
const FAST_PATH_MAX_SKIP: u64 = 1 << 20;

/// Largest zstd window accepted: a frame asking for more is refused instead of making
/// the decoder allocate it. Chunks are capped well below this.
const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// Decompresses `compressed`, which starts at a member boundary, and returns the
/// `len` bytes that start `skip` bytes into the decompressed stream. Reads no further
/// than needed, so a range holding several members costs only what is used.
///
/// Memory is `len` plus a fixed window whatever `skip` is: the bytes before the chunk
/// stream through a small buffer, and the output is filled in place.
pub fn decompress_range(
    compression: Compression,
    compressed: &[u8],
    skip: u64,
    len: usize,
) -> std::io::Result<Vec<u8>> {
    match compression {
        Compression::Gzip => {
            if skip <= FAST_PATH_MAX_SKIP {
                if let Some(data) = try_libdeflate(compressed, skip, len) {
                    return Ok(data);
                }
            }
            let mut d = flate2::read::MultiGzDecoder::new(compressed);
            skip_exact(&mut d, skip)?;
            read_exactly(&mut d, len)
        }
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(compressed)?;
            d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
            skip_exact(&mut d, skip)?;
            read_exactly(&mut d, len)
        }
    }
}

/// Reads exactly `len` bytes, growing the buffer only as data arrives (never past
/// `len`), so a short stream that claims a large chunk costs what it holds rather than
/// what it claims.
fn read_exactly(r: &mut impl Read, len: usize) -> std::io::Result<Vec<u8>> {
    let mut out: Vec<u8> = Vec::new();
    while out.len() < len {
        if out.len() == out.capacity() {
            let target = len.min(out.capacity().saturating_mul(2).max(READ_STEP));
            out.reserve_exact(target - out.len());
        }
        let start = out.len();
        let room = out.capacity().min(len) - start;
        out.resize(start + room, 0);
        let n = read_full(r, &mut out[start..])?;
        out.truncate(start + n);
        if n < room {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "compressed data holds {} of the chunk's {len} bytes",
                    out.len()
                ),
            ));
        }
    }
    Ok(out)
}

/// Fills `buf` as far as the stream goes; returns how much it filled.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Initial output reservation of the streaming decoder.
const READ_STEP: usize = 4 << 20;

/// Headers of the entries that follow a chunk in its member rarely take more than
/// this; when they do, the streaming decoder takes over.
const MEMBER_SLACK: usize = 128 << 10;

/// Fast path: inflate the first member in one call. libdeflate ignores what follows
/// the member, so a range spanning several members works as long as the first one
/// holds the chunk and fits the buffer. The caller keeps `skip` small, so the buffer
/// is the chunk plus a bounded margin; the prefix is dropped in place.
fn try_libdeflate(compressed: &[u8], skip: u64, len: usize) -> Option<Vec<u8>> {
    thread_local! {
        static INFLATER: RefCell<libdeflater::Decompressor> = RefCell::new(libdeflater::Decompressor::new());
    }
    let skip = usize::try_from(skip).ok()?;
    let need = skip.checked_add(len)?;
    let mut out = vec![0u8; need.checked_add(MEMBER_SLACK)?];
    let n = INFLATER.with(|d| d.borrow_mut().gzip_decompress(compressed, &mut out).ok())?;
    if n < need {
        return None;
    }
    out.truncate(need);
    out.drain(..skip);
    Some(out)
}

fn skip_exact(r: &mut impl Read, n: u64) -> std::io::Result<()> {
    let copied = std::io::copy(&mut r.take(n), &mut std::io::sink())?;
    if copied != n {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "compressed data ends before the chunk",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_member_round_trip_and_header() {
        let data = b"hello hello hello hello".repeat(100);
        let gz = compress_member(Codec::Gzip { level: 9 }, &data).unwrap();
        // MTIME 0, XFL 2 (best compression), OS unknown: what the reference writes.
        assert_eq!(&gz[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 0xff]);
        assert_eq!(
            decompress_range(Compression::Gzip, &gz, 0, data.len()).unwrap(),
            data
        );
        assert_eq!(
            decompress_range(Compression::Gzip, &gz, 6, 5).unwrap(),
            b"hello"
        );
        let z = compress_member(Codec::Zstd { level: 3 }, &data).unwrap();
        assert_eq!(
            decompress_range(Compression::Zstd, &z, 6, 5).unwrap(),
            b"hello"
        );
        assert!(decompress_range(Compression::Gzip, &gz, 0, data.len() + 1).is_err());
    }
}
