//! Just enough of the tar format to read untrusted archives header by header (USTAR,
//! GNU long names, PAX records and xattrs) while keeping each entry's raw header bytes,
//! and to write the few headers the format adds itself (landmarks, the TOC entry).

use std::collections::BTreeMap;
use std::io::{self, Read};

use crate::error::{Error, Result};

pub const BLOCK: u64 = 512;
/// Extension headers larger than this are refused: no real archive needs them and a
/// hostile one could ask for unbounded memory.
const MAX_EXTENSION_SIZE: u64 = 1 << 20;

/// The type of a tar entry, as far as the format cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TarKind {
    Reg,
    Hardlink,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
}

impl From<TarKind> for crate::toc::EntryType {
    fn from(k: TarKind) -> Self {
        use crate::toc::EntryType;
        match k {
            TarKind::Reg => EntryType::Reg,
            TarKind::Hardlink => EntryType::Hardlink,
            TarKind::Symlink => EntryType::Symlink,
            TarKind::Char => EntryType::Char,
            TarKind::Block => EntryType::Block,
            TarKind::Dir => EntryType::Dir,
            TarKind::Fifo => EntryType::Fifo,
        }
    }
}

/// One logical tar entry with its metadata and where its bytes are.
#[derive(Debug, Clone)]
pub struct TarEntry {
    /// Offset of the entry's first header block (extension headers included).
    pub header_start: u64,
    /// Offset of the entry's data, just after its last header block.
    pub data_start: u64,
    pub kind: TarKind,
    pub name: String,
    pub link_name: String,
    /// Bytes of file data (0 for anything but regular files).
    pub size: u64,
    /// Bytes of data the header claims, whatever the type; non-zero for a
    /// non-regular entry only in unusual archives.
    pub stored_size: u64,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub user_name: String,
    pub group_name: String,
    /// Seconds since the epoch, rounded to the nearest second.
    pub mtime: i64,
    pub dev_major: u64,
    pub dev_minor: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// Rounds up to a whole number of blocks.
pub fn padded(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

/// Reads a tar stream header by header. The caller reads or skips each entry's data
/// through [`TarScanner::read_data`] / [`TarScanner::skip_data`] before asking for the
/// next entry (skipping happens automatically otherwise).
pub struct TarScanner<R> {
    r: R,
    pos: u64,
    /// Bytes of the current entry's data (with padding) not consumed yet.
    pending: u64,
    global: BTreeMap<String, Vec<u8>>,
    done: bool,
}

impl<R: Read> TarScanner<R> {
    pub fn new(r: R) -> Self {
        TarScanner {
            r,
            pos: 0,
            pending: 0,
            global: BTreeMap::new(),
            done: false,
        }
    }

    fn read_block(&mut self, buf: &mut [u8; 512]) -> Result<bool> {
        let mut got = 0;
        while got < 512 {
            match self.r.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io_at(
                        format!("reading tar at offset {}", self.pos),
                        e,
                    ))
                }
            }
        }
        self.pos += got as u64;
        match got {
            0 => Ok(false),
            512 => Ok(true),
            _ => Err(self.bad(self.pos - got as u64, "archive ends inside a header block")),
        }
    }

    fn bad(&self, offset: u64, reason: impl Into<String>) -> Error {
        Error::BadTar {
            offset,
            reason: reason.into(),
        }
    }

    /// Skips what is left of the current entry's data.
    pub fn skip_data(&mut self) -> Result<()> {
        let n = self.pending;
        let copied = io::copy(&mut (&mut self.r).take(n), &mut io::sink())
            .map_err(|e| Error::io_at(format!("reading tar at offset {}", self.pos), e))?;
        self.pos += copied;
        self.pending = 0;
        if copied != n {
            return Err(self.bad(self.pos, "archive ends inside an entry's data"));
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes of the current entry's data.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<()> {
        if buf.len() as u64 > self.pending {
            return Err(self.bad(self.pos, "read past the entry's data"));
        }
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                self.bad(self.pos, "archive ends inside an entry's data")
            }
            _ => Error::io_at(format!("reading tar at offset {}", self.pos), e),
        })?;
        self.pos += buf.len() as u64;
        self.pending -= buf.len() as u64;
        Ok(())
    }

    fn read_extension(&mut self, size: u64, at: u64) -> Result<Vec<u8>> {
        if size > MAX_EXTENSION_SIZE {
            return Err(self.bad(at, format!("extension header of {size} bytes is too large")));
        }
        let mut data = vec![0u8; size as usize];
        self.pending = padded(size);
        self.read_data(&mut data)?;
        self.skip_data()?;
        Ok(data)
    }

    /// Returns the next entry, or `None` at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<TarEntry>> {
        if self.done {
            return Ok(None);
        }
        self.skip_data()?;
        let header_start = self.pos;
        let mut local: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut gnu_name: Option<Vec<u8>> = None;
        let mut gnu_link: Option<Vec<u8>> = None;
        let mut block = [0u8; 512];
        loop {
            let at = self.pos;
            if !self.read_block(&mut block)? {
                // A missing end-of-archive marker is tolerated, as most readers do.
                self.done = true;
                if at != header_start {
                    return Err(self.bad(at, "archive ends after extension headers"));
                }
                return Ok(None);
            }
            if block.iter().all(|&b| b == 0) {
                self.done = true;
                if at != header_start {
                    return Err(self.bad(at, "end-of-archive marker after extension headers"));
                }
                return Ok(None);
            }
            verify_checksum(&block).map_err(|r| self.bad(at, r))?;
            let size =
                parse_number(&block[124..136]).map_err(|r| self.bad(at, format!("size: {r}")))?;
            let typeflag = block[156];
            match typeflag {
                b'x' => {
                    let data = self.read_extension(size, at)?;
                    parse_pax(&data, &mut local).map_err(|r| self.bad(at, r))?;
                }
                b'g' => {
                    let data = self.read_extension(size, at)?;
                    parse_pax(&data, &mut self.global).map_err(|r| self.bad(at, r))?;
                }
                b'L' => gnu_name = Some(trim_nul(&self.read_extension(size, at)?).to_vec()),
                b'K' => gnu_link = Some(trim_nul(&self.read_extension(size, at)?).to_vec()),
                _ => {
                    let kind = match typeflag {
                        b'0' | 0 | b'7' => TarKind::Reg,
                        b'1' => TarKind::Hardlink,
                        b'2' => TarKind::Symlink,
                        b'3' => TarKind::Char,
                        b'4' => TarKind::Block,
                        b'5' => TarKind::Dir,
                        b'6' => TarKind::Fifo,
                        other => {
                            return Err(
                                self.bad(at, format!("unsupported entry type {:?}", other as char))
                            )
                        }
                    };
                    let mut records = self.global.clone();
                    records.extend(local);
                    let entry = self
                        .build_entry(
                            &block,
                            kind,
                            size,
                            header_start,
                            records,
                            gnu_name,
                            gnu_link,
                        )
                        .map_err(|r| self.bad(at, r))?;
                    // Other types carry no data, but a size field may still claim some.
                    self.pending = padded(entry.stored_size);
                    return Ok(Some(entry));
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn build_entry(
        &self,
        b: &[u8; 512],
        kind: TarKind,
        size: u64,
        header_start: u64,
        pax: BTreeMap<String, Vec<u8>>,
        gnu_name: Option<Vec<u8>>,
        gnu_link: Option<Vec<u8>>,
    ) -> std::result::Result<TarEntry, String> {
        let ustar = &b[257..263] == b"ustar\0";
        let mut name = trim_nul(&b[0..100]).to_vec();
        if ustar && b[345] != 0 {
            let mut full = trim_nul(&b[345..500]).to_vec();
            full.push(b'/');
            full.extend_from_slice(&name);
            name = full;
        }
        if let Some(n) = gnu_name {
            name = n;
        }
        let mut link = gnu_link.unwrap_or_else(|| trim_nul(&b[157..257]).to_vec());
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        let mut e = TarEntry {
            header_start,
            data_start: self.pos,
            kind,
            name: String::new(),
            link_name: String::new(),
            size: if kind == TarKind::Reg { size } else { 0 },
            stored_size: size,
            mode: (parse_number(&b[100..108]).map_err(|r| format!("mode: {r}"))? & 0o7777_7777)
                as u32,
            uid: parse_number(&b[108..116]).map_err(|r| format!("uid: {r}"))?,
            gid: parse_number(&b[116..124]).map_err(|r| format!("gid: {r}"))?,
            user_name: text(trim_nul(&b[265..297])),
            group_name: text(trim_nul(&b[297..329])),
            mtime: parse_signed(&b[136..148]).map_err(|r| format!("mtime: {r}"))?,
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
        };
        if matches!(kind, TarKind::Char | TarKind::Block) {
            e.dev_major = parse_number(&b[329..337]).map_err(|r| format!("devmajor: {r}"))?;
            e.dev_minor = parse_number(&b[337..345]).map_err(|r| format!("devminor: {r}"))?;
        }
        let num = |v: &[u8], what: &str| -> std::result::Result<u64, String> {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| format!("PAX {what} is not a number"))
        };
        for (k, v) in pax {
            match k.as_str() {
                "path" => name = v,
                "linkpath" => link = v,
                "size" => {
                    e.stored_size = num(&v, "size")?;
                    if kind == TarKind::Reg {
                        e.size = e.stored_size;
                    }
                }
                "uid" => e.uid = num(&v, "uid")?,
                "gid" => e.gid = num(&v, "gid")?,
                "uname" => e.user_name = text(&v),
                "gname" => e.group_name = text(&v),
                "mtime" => e.mtime = parse_pax_time(&v).ok_or("PAX mtime is not a number")?,
                _ => {
                    if let Some(x) = k.strip_prefix("SCHILY.xattr.") {
                        e.xattrs.insert(x.to_string(), v);
                    }
                }
            }
        }
        e.name = text(&name);
        e.link_name = text(&link);
        if e.name.is_empty() {
            return Err("entry has an empty name".into());
        }
        Ok(e)
    }
}

fn trim_nul(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

fn verify_checksum(b: &[u8; 512]) -> std::result::Result<(), String> {
    let stored = parse_number(&b[148..156]).map_err(|r| format!("checksum field: {r}"))?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &c) in b.iter().enumerate() {
        let c = if (148..156).contains(&i) { b' ' } else { c };
        unsigned += c as u64;
        signed += c as i8 as i64;
    }
    if stored == unsigned || stored as i64 == signed {
        Ok(())
    } else {
        Err(format!(
            "header checksum {stored} does not match computed {unsigned}"
        ))
    }
}

/// Parses an octal field, or a GNU base-256 one (high bit set).
fn parse_number(f: &[u8]) -> std::result::Result<u64, String> {
    let v = parse_signed(f)?;
    u64::try_from(v).map_err(|_| "negative value".to_string())
}

fn parse_signed(f: &[u8]) -> std::result::Result<i64, String> {
    if let Some(&first) = f.first() {
        if first & 0x80 != 0 {
            // Base-256, two's complement; 0xff starts a negative number.
            let neg = first == 0xff;
            let mut v: i128 = if neg { -1 } else { (first & 0x7f) as i128 };
            if neg {
                v = 0xff_i128 - 256;
            }
            for &c in &f[1..] {
                v = v.checked_mul(256).ok_or("number too large")? + c as i128;
                if v.abs() > i64::MAX as i128 {
                    return Err("number too large".into());
                }
            }
            return Ok(v as i64);
        }
    }
    let s = trim_nul(f);
    let s = std::str::from_utf8(s)
        .map_err(|_| "not ASCII")?
        .trim_matches(|c| c == ' ' || c == '\0');
    if s.is_empty() {
        return Ok(0);
    }
    i64::from_str_radix(s, 8).map_err(|_| format!("{s:?} is not an octal number"))
}

fn parse_pax_time(v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    let secs: i64 = int.parse().ok()?;
    if !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    // Round half up, as the reference's time.Round(time.Second) does.
    let round_up = frac.as_bytes().first().is_some_and(|&d| d >= b'5');
    Some(if round_up {
        if secs < 0 || int.starts_with('-') {
            secs - 1
        } else {
            secs + 1
        }
    } else {
        secs
    })
}

fn parse_pax(data: &[u8], into: &mut BTreeMap<String, Vec<u8>>) -> std::result::Result<(), String> {
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&c| c == 0) {
            break;
        }
        let sp = rest
            .iter()
            .position(|&c| c == b' ')
            .ok_or("PAX record without length")?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("PAX record length is not a number")?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err("PAX record length is wrong".into());
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&c| c == b'=')
            .ok_or("PAX record without '='")?;
        let key = String::from_utf8_lossy(&rec[..eq]).into_owned();
        into.insert(key, rec[eq + 1..].to_vec());
        rest = &rest[len..];
    }
    Ok(())
}

/// A USTAR header for a regular file written by the format itself (landmarks, TOC):
/// mode 0, owner 0, mtime 0, as the reference writes them.
pub fn synthetic_file_header(name: &str, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |field: &mut [u8], v: u64| {
        let s = format!("{:0width$o}", v, width = field.len() - 1);
        field[..s.len()].copy_from_slice(s.as_bytes());
    };
    octal(&mut h[100..108], 0);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&c| c as u64).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_header_is_readable() {
        let mut tar = synthetic_file_header("stargz.index.json", 3).to_vec();
        tar.extend_from_slice(b"abc");
        tar.resize(1024 + 1024, 0);
        let mut s = TarScanner::new(&tar[..]);
        let e = s.next_entry().unwrap().unwrap();
        assert_eq!(e.name, "stargz.index.json");
        assert_eq!(e.size, 3);
        assert_eq!((e.header_start, e.data_start), (0, 512));
        let mut buf = [0u8; 3];
        s.read_data(&mut buf).unwrap();
        assert_eq!(&buf, b"abc");
        assert!(s.next_entry().unwrap().is_none());
    }

    #[test]
    fn rejects_garbage() {
        let mut block = synthetic_file_header("x", 3);
        block[0] = b'y';
        let mut s = TarScanner::new(&block[..]);
        assert!(matches!(s.next_entry(), Err(Error::BadTar { .. })));
        let trunc = synthetic_file_header("x", 3000);
        let mut s = TarScanner::new(&trunc[..]);
        s.next_entry().unwrap();
        assert!(s.skip_data().is_err());
    }

    #[test]
    fn base256_and_pax_time() {
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[11] = 5;
        assert_eq!(parse_number(&f).unwrap(), 5);
        assert_eq!(parse_pax_time(b"1700000000.5"), Some(1_700_000_001));
        assert_eq!(parse_pax_time(b"1700000000.49"), Some(1_700_000_000));
    }
}
