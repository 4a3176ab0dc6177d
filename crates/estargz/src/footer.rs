//! Footers: the fixed-size tails that tell where the TOC is, for eStargz (51 bytes),
//! legacy stargz (47 bytes, read only), eStargz with an external TOC (46 bytes, the
//! TOC lives in another image) and zstd:chunked (40 bytes inside a skippable frame).

use crate::error::{Error, Result};

/// Size of the eStargz footer.
pub const ESTARGZ_FOOTER_SIZE: usize = 51;
/// Size of the legacy stargz footer.
pub const LEGACY_FOOTER_SIZE: usize = 47;
/// Size of the footer of an eStargz blob whose TOC is stored outside it.
pub const EXTERNAL_TOC_FOOTER_SIZE: usize = 46;
/// The gzip extra subfield marking a footer whose TOC is stored outside the blob.
const EXTERNAL_TOC_MAGIC: &[u8; 17] = b"STARGZEXTERNALTOC";
/// Size of the zstd:chunked footer payload (what the reference calls its footer).
pub const ZSTD_CHUNKED_FOOTER_SIZE: usize = 40;
/// Size of the zstd:chunked trailer as written: skippable-frame header plus payload.
pub const ZSTD_CHUNKED_TRAILER_SIZE: usize = 8 + ZSTD_CHUNKED_FOOTER_SIZE;
/// The most bytes any footer takes; reading this many from the end finds any of them.
pub const MAX_FOOTER_SIZE: usize = ESTARGZ_FOOTER_SIZE;

const ZSTD_CHUNKED_MAGIC: &[u8; 8] = b"GnUlInUx";
pub(crate) const SKIPPABLE_FRAME_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
const ZSTD_CHUNKED_MANIFEST_TYPE_CRFS: u64 = 1;

/// The compression family of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
}

/// A parsed footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Footer {
    /// eStargz: the TOC is a gzip member starting at `toc_offset` and ending at the footer.
    Estargz { toc_offset: u64 },
    /// Legacy stargz: as eStargz with a 47-byte footer.
    Legacy { toc_offset: u64 },
    /// eStargz whose TOC is not in the blob (the reference's `--estargz-external-toc`):
    /// file data runs up to `payload_end`, where the 46-byte footer starts, and the TOC
    /// comes from a separate "TOC image".
    ExternalToc { payload_end: u64 },
    /// zstd:chunked: the TOC is a zstd frame of `toc_compressed_size` bytes at
    /// `toc_offset`, inflating to `toc_size` bytes of JSON.
    ZstdChunked {
        toc_offset: u64,
        toc_compressed_size: u64,
        toc_size: u64,
    },
}

impl Footer {
    /// Bytes the footer takes at the end of the blob.
    pub fn size(&self) -> usize {
        match self {
            Footer::Estargz { .. } => ESTARGZ_FOOTER_SIZE,
            Footer::Legacy { .. } => LEGACY_FOOTER_SIZE,
            Footer::ExternalToc { .. } => EXTERNAL_TOC_FOOTER_SIZE,
            Footer::ZstdChunked { .. } => ZSTD_CHUNKED_TRAILER_SIZE,
        }
    }

    /// Where the TOC starts; for an external TOC, where the footer starts (the TOC
    /// is not in the blob).
    pub fn toc_offset(&self) -> u64 {
        match *self {
            Footer::Estargz { toc_offset }
            | Footer::Legacy { toc_offset }
            | Footer::ZstdChunked { toc_offset, .. } => toc_offset,
            Footer::ExternalToc { payload_end } => payload_end,
        }
    }

    /// Whether the TOC is stored outside the blob.
    pub fn is_external(&self) -> bool {
        matches!(self, Footer::ExternalToc { .. })
    }

    pub fn compression(&self) -> Compression {
        match self {
            Footer::ZstdChunked { .. } => Compression::Zstd,
            _ => Compression::Gzip,
        }
    }

    /// The byte range of the compressed TOC, given the blob's size; empty (at the
    /// footer) for an external TOC.
    pub fn toc_range(&self, blob_size: u64) -> Result<std::ops::Range<u64>> {
        let footer_start = blob_size
            .checked_sub(self.size() as u64)
            .ok_or(Error::BlobTooSmall { size: blob_size })?;
        if let Footer::ExternalToc { payload_end } = *self {
            if payload_end != footer_start {
                return Err(Error::BadFooter(format!(
                    "external-TOC footer of a {blob_size}-byte blob must start at {footer_start}, not {payload_end}"
                )));
            }
            return Ok(footer_start..footer_start);
        }
        let (start, end) = match *self {
            Footer::ZstdChunked {
                toc_offset,
                toc_compressed_size,
                ..
            } => (toc_offset, toc_offset.saturating_add(toc_compressed_size)),
            _ => (self.toc_offset(), footer_start),
        };
        if start >= end || end > footer_start {
            return Err(Error::BadFooter(format!(
                "TOC range {start}..{end} does not fit before the footer at {footer_start}"
            )));
        }
        Ok(start..end)
    }

    /// Encodes the footer as the reference writes it.
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            Footer::Estargz { toc_offset } => {
                let mut f = Vec::with_capacity(ESTARGZ_FOOTER_SIZE);
                // gzip header with FEXTRA, MTIME 0, XFL 0, OS unknown.
                f.extend_from_slice(&[0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff]);
                f.extend_from_slice(&26u16.to_le_bytes());
                f.extend_from_slice(b"SG");
                f.extend_from_slice(&22u16.to_le_bytes());
                f.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
                // An empty stored deflate block, then CRC32 and ISIZE of nothing.
                f.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
                f.extend_from_slice(&[0; 8]);
                f
            }
            Footer::Legacy { toc_offset } => {
                let mut f = Vec::with_capacity(LEGACY_FOOTER_SIZE);
                f.extend_from_slice(&[0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff]);
                f.extend_from_slice(&22u16.to_le_bytes());
                f.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
                f.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
                f.extend_from_slice(&[0; 8]);
                f
            }
            Footer::ExternalToc { .. } => {
                let mut f = Vec::with_capacity(EXTERNAL_TOC_FOOTER_SIZE);
                f.extend_from_slice(&[0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff]);
                f.extend_from_slice(&(4 + EXTERNAL_TOC_MAGIC.len() as u16).to_le_bytes());
                f.extend_from_slice(b"SG");
                f.extend_from_slice(&(EXTERNAL_TOC_MAGIC.len() as u16).to_le_bytes());
                f.extend_from_slice(EXTERNAL_TOC_MAGIC);
                f.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
                f.extend_from_slice(&[0; 8]);
                f
            }
            Footer::ZstdChunked {
                toc_offset,
                toc_compressed_size,
                toc_size,
            } => {
                let mut f = Vec::with_capacity(ZSTD_CHUNKED_TRAILER_SIZE);
                f.extend_from_slice(&SKIPPABLE_FRAME_MAGIC);
                f.extend_from_slice(&(ZSTD_CHUNKED_FOOTER_SIZE as u32).to_le_bytes());
                f.extend_from_slice(&toc_offset.to_le_bytes());
                f.extend_from_slice(&toc_compressed_size.to_le_bytes());
                f.extend_from_slice(&toc_size.to_le_bytes());
                f.extend_from_slice(&ZSTD_CHUNKED_MANIFEST_TYPE_CRFS.to_le_bytes());
                f.extend_from_slice(ZSTD_CHUNKED_MAGIC);
                f
            }
        }
    }

    /// Finds the footer in `tail`, the last bytes of a blob of `blob_size` bytes.
    /// Tries eStargz, then zstd:chunked, then legacy stargz, then the external-TOC one.
    pub fn detect(tail: &[u8], blob_size: u64) -> Result<Footer> {
        let mut reasons = Vec::new();
        let footer = (|| {
            if tail.len() >= ESTARGZ_FOOTER_SIZE {
                match parse_gzip_footer(&tail[tail.len() - ESTARGZ_FOOTER_SIZE..], false) {
                    Ok(f) => return Some(f),
                    Err(e) => reasons.push(format!("eStargz: {e}")),
                }
            }
            if tail.len() >= ZSTD_CHUNKED_FOOTER_SIZE {
                match parse_zstd_footer(&tail[tail.len() - ZSTD_CHUNKED_FOOTER_SIZE..]) {
                    Ok(f) => return Some(f),
                    Err(e) => reasons.push(format!("zstd:chunked: {e}")),
                }
            }
            if tail.len() >= LEGACY_FOOTER_SIZE {
                match parse_gzip_footer(&tail[tail.len() - LEGACY_FOOTER_SIZE..], true) {
                    Ok(f) => return Some(f),
                    Err(e) => reasons.push(format!("legacy stargz: {e}")),
                }
            }
            if tail.len() >= EXTERNAL_TOC_FOOTER_SIZE {
                let p = &tail[tail.len() - EXTERNAL_TOC_FOOTER_SIZE..];
                match parse_external_footer(p) {
                    Ok(()) => {
                        return Some(Footer::ExternalToc {
                            payload_end: blob_size.saturating_sub(EXTERNAL_TOC_FOOTER_SIZE as u64),
                        })
                    }
                    Err(e) => reasons.push(format!("external TOC: {e}")),
                }
            }
            None
        })();
        match footer {
            Some(f) => {
                f.toc_range(blob_size)?;
                Ok(f)
            }
            None if tail.len() < EXTERNAL_TOC_FOOTER_SIZE => {
                Err(Error::BlobTooSmall { size: blob_size })
            }
            None => Err(Error::BadFooter(format!(
                "no known footer in the last {} bytes ({})",
                tail.len(),
                reasons.join("; ")
            ))),
        }
    }
}

fn parse_gzip_footer(p: &[u8], legacy: bool) -> std::result::Result<Footer, String> {
    if p[0] != 0x1f || p[1] != 0x8b || p[2] != 0x08 {
        return Err("not a gzip member".into());
    }
    if p[3] != 0x04 {
        return Err(format!("gzip flags {:#04x}, expected FEXTRA only", p[3]));
    }
    let xlen = u16::from_le_bytes([p[10], p[11]]) as usize;
    let (want_xlen, sub) = if legacy {
        (22, &p[12..34])
    } else {
        (26, &p[16..38])
    };
    if xlen != want_xlen {
        return Err(format!("extra field of {xlen} bytes, expected {want_xlen}"));
    }
    if !legacy {
        if &p[12..14] != b"SG" {
            return Err(format!(
                "subfield id {:?}, expected \"SG\"",
                String::from_utf8_lossy(&p[12..14])
            ));
        }
        if u16::from_le_bytes([p[14], p[15]]) != 22 {
            return Err("subfield length is not 22".into());
        }
    }
    if &sub[16..] != b"STARGZ" {
        return Err("magic \"STARGZ\" missing".into());
    }
    let hexdigits = std::str::from_utf8(&sub[..16]).map_err(|_| "TOC offset is not hex")?;
    let toc_offset = u64::from_str_radix(hexdigits, 16).map_err(|_| "TOC offset is not hex")?;
    let rest = &p[12 + xlen..];
    if rest != [0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0] {
        return Err("footer member is not empty".into());
    }
    Ok(if legacy {
        Footer::Legacy { toc_offset }
    } else {
        Footer::Estargz { toc_offset }
    })
}

/// The 46-byte footer of a blob with an external TOC: an empty gzip member whose
/// extra field holds the subfield `SG` = `STARGZEXTERNALTOC`.
fn parse_external_footer(p: &[u8]) -> std::result::Result<(), String> {
    if p[0] != 0x1f || p[1] != 0x8b || p[2] != 0x08 {
        return Err("not a gzip member".into());
    }
    if p[3] != 0x04 {
        return Err(format!("gzip flags {:#04x}, expected FEXTRA only", p[3]));
    }
    let xlen = u16::from_le_bytes([p[10], p[11]]) as usize;
    if xlen != 4 + EXTERNAL_TOC_MAGIC.len() {
        return Err(format!(
            "extra field of {xlen} bytes, expected {}",
            4 + EXTERNAL_TOC_MAGIC.len()
        ));
    }
    if &p[12..14] != b"SG"
        || u16::from_le_bytes([p[14], p[15]]) as usize != EXTERNAL_TOC_MAGIC.len()
    {
        return Err("no SG subfield of 17 bytes".into());
    }
    if &p[16..33] != EXTERNAL_TOC_MAGIC {
        return Err("magic \"STARGZEXTERNALTOC\" missing".into());
    }
    if p[33..] != [0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0] {
        return Err("footer member is not empty".into());
    }
    Ok(())
}

fn parse_zstd_footer(p: &[u8]) -> std::result::Result<Footer, String> {
    if &p[32..40] != ZSTD_CHUNKED_MAGIC {
        return Err("magic \"GnUlInUx\" missing".into());
    }
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&p[i..i + 8]);
        u64::from_le_bytes(b)
    };
    if word(24) != ZSTD_CHUNKED_MANIFEST_TYPE_CRFS {
        return Err(format!("manifest type {}, expected 1", word(24)));
    }
    Ok(Footer::ZstdChunked {
        toc_offset: word(0),
        toc_compressed_size: word(8),
        toc_size: word(16),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estargz_footer_matches_reference_bytes() {
        let f = Footer::Estargz { toc_offset: 0x1234 };
        assert_eq!(
            hex::encode(f.encode()),
            "1f8b08040000000000ff1a00534716003030303030303030303030303132333453544152475a010000ffff0000000000000000"
        );
        let mut blob = vec![0u8; 0x1300];
        blob.extend(f.encode());
        let err = Footer::detect(&blob[blob.len() - 47..], blob.len() as u64).unwrap_err();
        assert!(err.to_string().contains("footer"), "{err}");
        assert_eq!(
            Footer::detect(&blob[blob.len() - 51..], blob.len() as u64).unwrap(),
            f
        );
    }

    #[test]
    fn footers_round_trip() {
        for f in [
            Footer::Estargz { toc_offset: 99 },
            Footer::Legacy { toc_offset: 99 },
            Footer::ExternalToc { payload_end: 100 },
            Footer::ZstdChunked {
                toc_offset: 90,
                toc_compressed_size: 10,
                toc_size: 30,
            },
        ] {
            let mut blob = vec![0u8; 100];
            blob.extend(f.encode());
            assert_eq!(f.encode().len(), f.size());
            let tail = &blob[blob.len() - MAX_FOOTER_SIZE..];
            assert_eq!(Footer::detect(tail, blob.len() as u64).unwrap(), f);
        }
    }

    /// The reference writes this footer with Go's gzip writer at NoCompression and the
    /// extra field `SG`, length 17, `STARGZEXTERNALTOC`.
    #[test]
    fn external_toc_footer_matches_reference_layout() {
        let f = Footer::ExternalToc { payload_end: 7 }.encode();
        assert_eq!(
            hex::encode(&f),
            format!(
                "1f8b08040000000000ff150053471100{}010000ffff0000000000000000",
                hex::encode("STARGZEXTERNALTOC")
            )
        );
        assert_eq!(f.len(), 46);
        // It is an empty gzip member: the blob still decompresses as a whole.
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&f[..]), &mut out).unwrap();
        assert!(out.is_empty());
        let mut blob = vec![0u8; 7];
        blob.extend(&f);
        let got = Footer::detect(&blob, blob.len() as u64).unwrap();
        assert_eq!(got, Footer::ExternalToc { payload_end: 7 });
        assert_eq!(got.toc_range(blob.len() as u64).unwrap(), 7..7);
        let mut bad = f.clone();
        bad[20] ^= 1;
        assert!(Footer::detect(&bad, 100).is_err());
    }

    #[test]
    fn rejects_bad_footers() {
        let mut f = Footer::Estargz { toc_offset: 10 }.encode();
        f[40] ^= 1;
        assert!(Footer::detect(&f, 1000).is_err());
        // TOC offset beyond the blob.
        let f = Footer::Estargz { toc_offset: 5000 }.encode();
        assert!(matches!(Footer::detect(&f, 1000), Err(Error::BadFooter(_))));
        assert!(matches!(
            Footer::detect(&[0u8; 10], 10),
            Err(Error::BlobTooSmall { .. })
        ));
        let f = Footer::ZstdChunked {
            toc_offset: 10,
            toc_compressed_size: u64::MAX,
            toc_size: 1,
        }
        .encode();
        assert!(Footer::detect(&f, 1000).is_err());
    }
}
