//! What an ELF program or library makes the dynamic loader open: its interpreter
//! (`PT_INTERP`), the libraries it needs (`DT_NEEDED`) and where it says to look for
//! them (`DT_RPATH`, `DT_RUNPATH`).
//!
//! Parsing uses the `object` crate (gimli-rs): its read API is written for untrusted
//! input (every offset and count checked, no panics) and reads through
//! [`object::ReadCache`] only the ranges it is asked for, so a large binary is never
//! copied whole. The files come from images: this module reads at most
//! [`MAX_PHDRS`] program headers, [`MAX_DYN`] dynamic entries, [`MAX_NEEDED`] names and
//! strings of [`MAX_STR`] bytes.

use std::ops::Range;

use object::elf;
use object::read::elf::{Dyn, FileHeader, ProgramHeader};
use object::read::{ReadCache, ReadCacheOps, ReadRef};
use object::Endianness;

const MAX_PHDRS: usize = 128;
const MAX_DYN: usize = 4096;
const MAX_NEEDED: usize = 256;
const MAX_STR: u64 = 4096;

/// The loader-facing part of an ELF file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ElfDeps {
    pub interp: Option<String>,
    pub needed: Vec<String>,
    /// `DT_RPATH` entries (searched before `LD_LIBRARY_PATH`, when there is no runpath).
    pub rpath: Vec<String>,
    /// `DT_RUNPATH` entries.
    pub runpath: Vec<String>,
}

/// Whether `head` (a file's first bytes) starts like an ELF file.
pub fn is_elf(head: &[u8]) -> bool {
    head.starts_with(b"\x7fELF")
}

/// Parses the ELF file `r` reads; `None` when it is no ELF or is malformed.
pub fn parse<R: ReadCacheOps>(r: R) -> Option<ElfDeps> {
    let cache = ReadCache::new(r);
    let data = &cache;
    match class(data)? {
        elf::ELFCLASS64 => deps::<elf::FileHeader64<Endianness>, _>(data),
        elf::ELFCLASS32 => deps::<elf::FileHeader32<Endianness>, _>(data),
        _ => None,
    }
}

/// `EI_CLASS` of an ELF file (32 or 64 bits); `None` when it is no ELF.
fn class<'data, R: ReadRef<'data>>(data: R) -> Option<u8> {
    let ident = data.read_bytes_at(0, 16).ok()?;
    if !is_elf(ident) {
        return None;
    }
    ident.get(4).copied()
}

fn deps<'data, H, R>(data: R) -> Option<ElfDeps>
where
    H: FileHeader<Endian = Endianness>,
    R: ReadRef<'data>,
{
    let header = H::parse(data).ok()?;
    let endian = header.endian().ok()?;
    let phdrs = header.program_headers(endian, data).ok()?;
    let phdrs = &phdrs[..phdrs.len().min(MAX_PHDRS)];
    let mut out = ElfDeps::default();
    let mut dynamic = None;
    // Only the first segment of each kind, and only of a sane size: each read is kept
    // by the cache, so a hostile file must not make it read the same bytes over and over.
    for ph in phdrs {
        let filesz: u64 = ph.p_filesz(endian).into();
        match ph.p_type(endian) {
            elf::PT_INTERP if out.interp.is_none() && filesz <= MAX_STR => {
                if let Ok(Some(interp)) = ph.interpreter(endian, data) {
                    out.interp = Some(String::from_utf8_lossy(interp).into_owned());
                }
            }
            elf::PT_DYNAMIC if dynamic.is_none() && filesz <= MAX_DYN as u64 * 16 => {
                if let Ok(Some(d)) = ph.dynamic(endian, data) {
                    dynamic = Some(d);
                }
            }
            _ => {}
        }
    }
    let Some(dynamic) = dynamic else {
        return Some(out);
    };
    let dynamic = &dynamic[..dynamic.len().min(MAX_DYN)];
    let mut strtab = None;
    let mut strsz = None;
    for d in dynamic {
        let tag: u64 = d.d_tag(endian).into();
        let val: u64 = d.d_val(endian).into();
        match u32::try_from(tag) {
            Ok(elf::DT_NULL) => break,
            Ok(elf::DT_STRTAB) => strtab = Some(val),
            Ok(elf::DT_STRSZ) => strsz = Some(val),
            _ => {}
        }
    }
    // The string table is named by address: find the loaded segment that holds it.
    let (Some(addr), Some(size)) = (strtab, strsz) else {
        return Some(out);
    };
    let Some(table) = phdrs.iter().find_map(|ph| {
        if ph.p_type(endian) != elf::PT_LOAD {
            return None;
        }
        let vaddr: u64 = ph.p_vaddr(endian).into();
        let filesz: u64 = ph.p_filesz(endian).into();
        let offset: u64 = ph.p_offset(endian).into();
        let rel = addr.checked_sub(vaddr)?;
        (rel < filesz).then(|| offset.checked_add(rel))?
    }) else {
        return Some(out);
    };
    let string = |at: u64| -> Option<String> {
        if at >= size {
            return None;
        }
        let start = table.checked_add(at)?;
        let end = start.checked_add((size - at).min(MAX_STR))?;
        let b = data.read_bytes_at_until(start..end, 0).ok()?;
        let s = std::str::from_utf8(b).ok()?;
        (!s.is_empty()).then(|| s.to_string())
    };
    for d in dynamic {
        let tag: u64 = d.d_tag(endian).into();
        let val: u64 = d.d_val(endian).into();
        match u32::try_from(tag) {
            Ok(elf::DT_NULL) => break,
            Ok(elf::DT_NEEDED) if out.needed.len() < MAX_NEEDED => {
                if let Some(s) = string(val) {
                    out.needed.push(s);
                }
            }
            Ok(elf::DT_RPATH) => {
                if let Some(s) = string(val) {
                    out.rpath.extend(s.split(':').map(str::to_string));
                }
            }
            Ok(elf::DT_RUNPATH) => {
                if let Some(s) = string(val) {
                    out.runpath.extend(s.split(':').map(str::to_string));
                }
            }
            _ => {}
        }
    }
    Some(out)
}

/// Files larger than this are fetched head first, so that their program headers can
/// say which parts the loader and the program need.
pub const LARGE_FILE: u64 = 16 << 20;
/// Bytes of a file's start fetched to read its ELF and program headers.
pub const HEAD_BYTES: u64 = 64 << 10;
/// Bytes after the last loaded segment (symbol tables, debug sections) from which on
/// they are left out: the loader never reads them, and a program seldom does.
pub const UNLOADED_TAIL: u64 = 1 << 20;

/// The byte ranges of a large ELF file worth fetching before it runs, sorted: every
/// loaded segment but read-only data that follows the code and outweighs it (the
/// data of a library such as ICU's `libicudata`, 30 MiB of which a program reads a
/// little), the headers and the dynamic section. What follows the last loaded
/// segment (`.symtab`, `.strtab`, debug sections: 5 MB of OpenJDK's `libjvm.so`) is
/// left out too once it reaches [`UNLOADED_TAIL`]. `None` when the file is no ELF, is
/// malformed, or nothing would be left out (then it is fetched whole).
pub fn load_ranges<R: ReadCacheOps>(r: R, size: u64) -> Option<Vec<Range<u64>>> {
    let cache = ReadCache::new(r);
    let data = &cache;
    match class(data)? {
        elf::ELFCLASS64 => segments::<elf::FileHeader64<Endianness>, _>(data, size),
        elf::ELFCLASS32 => segments::<elf::FileHeader32<Endianness>, _>(data, size),
        _ => None,
    }
}

fn segments<'data, H, R>(data: R, size: u64) -> Option<Vec<Range<u64>>>
where
    H: FileHeader<Endian = Endianness>,
    R: ReadRef<'data>,
{
    let header = H::parse(data).ok()?;
    let endian = header.endian().ok()?;
    let phdrs = header.program_headers(endian, data).ok()?;
    let phdrs = &phdrs[..phdrs.len().min(MAX_PHDRS)];
    let span = |ph: &H::ProgramHeader| -> Option<Range<u64>> {
        let offset: u64 = ph.p_offset(endian).into();
        let filesz: u64 = ph.p_filesz(endian).into();
        let end = offset.checked_add(filesz)?.min(size);
        (offset < end).then_some(offset..end)
    };
    let code: u64 = phdrs
        .iter()
        .filter(|ph| ph.p_type(endian) == elf::PT_LOAD && ph.p_flags(endian) & elf::PF_X != 0)
        .filter_map(&span)
        .map(|r| r.end - r.start)
        .fold(0, u64::saturating_add);
    let mut keep: Vec<Range<u64>> = Vec::with_capacity(phdrs.len() + 1);
    keep.push(0..HEAD_BYTES.min(size));
    let mut loaded_end = 0;
    let mut left_out = false;
    let mut after_code = false;
    for ph in phdrs {
        let Some(r) = span(ph) else { continue };
        match ph.p_type(endian) {
            elf::PT_DYNAMIC => keep.push(r),
            elf::PT_LOAD => {
                loaded_end = loaded_end.max(r.end);
                let flags = ph.p_flags(endian);
                let data_only = flags & (elf::PF_X | elf::PF_W) == 0;
                if data_only && after_code && r.end - r.start > code {
                    left_out = true;
                } else {
                    keep.push(r);
                }
                after_code |= flags & elf::PF_X != 0;
            }
            _ => {}
        }
    }
    left_out |= loaded_end > 0 && size - loaded_end >= UNLOADED_TAIL;
    if !left_out {
        return None;
    }
    keep.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(keep.len());
    for r in keep {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    Some(merged)
}

/// `elf` (a 64-bit little-endian ELF file) with `extra` bytes appended and its first
/// read-only segment after the code stretched over them; with that segment's offset
/// and its former end.
#[cfg(test)]
pub(super) fn with_large_data(elf: &[u8], extra: u64) -> Option<(Vec<u8>, u64, u64)> {
    let header = elf::FileHeader64::<Endianness>::parse(elf).ok()?;
    let endian = header.endian().ok()?;
    let phoff = usize::try_from(header.e_phoff.get(endian)).ok()?;
    let phnum = usize::from(header.e_phnum.get(endian));
    let field = |b: &[u8], at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
    };
    let word = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let mut after_code = false;
    let mut target = None;
    for i in 0..phnum {
        let at = phoff + i * 56;
        if word(elf, at)? == elf::PT_LOAD {
            let flags = word(elf, at + 4)?;
            if after_code && flags & (elf::PF_X | elf::PF_W) == 0 && target.is_none() {
                target = Some(at);
            }
            after_code |= flags & elf::PF_X != 0;
        }
    }
    let at = target?;
    let offset = field(elf, at + 8)?;
    let old_end = offset + field(elf, at + 32)?;
    let mut grown = elf.to_vec();
    let new_size = grown.len() as u64 + extra;
    grown.resize(usize::try_from(new_size).ok()?, 0);
    grown[at + 32..at + 40].copy_from_slice(&(new_size - offset).to_le_bytes());
    Some((grown, offset, old_end))
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "test code: a panic is a failed assertion"
    )]

    use super::*;

    fn host(path: &str) -> Option<ElfDeps> {
        let f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                assert!(std::env::var_os("CI").is_none(), "{path}: {e}");
                return None;
            }
        };
        Some(parse(f).expect("host binary parses"))
    }

    #[test]
    fn host_ls_needs_libc_through_its_loader() {
        let Some(d) = host("/bin/ls") else { return };
        if std::env::consts::ARCH == "x86_64" {
            assert_eq!(d.interp.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
        } else {
            assert!(d.interp.is_some(), "{d:?}");
        }
        assert!(d.needed.iter().any(|n| n == "libc.so.6"), "{d:?}");
    }

    #[test]
    fn host_libc_has_no_interp_and_needs_the_loader() {
        if std::env::consts::ARCH != "x86_64" {
            return;
        }
        let Some(d) = host("/lib/x86_64-linux-gnu/libc.so.6") else {
            return;
        };
        assert!(d.needed.iter().any(|n| n.starts_with("ld-linux")), "{d:?}");
    }

    #[test]
    fn garbage_is_no_elf() {
        assert_eq!(parse(std::io::Cursor::new(b"#!/bin/sh\n".to_vec())), None);
        assert_eq!(parse(std::io::Cursor::new(Vec::new())), None);
        // A real header cut short, then bytes flipped all over it.
        let ls = std::fs::read("/bin/ls").unwrap_or_default();
        if ls.len() > 4096 {
            // The program headers lie past the cut: nothing (and no panic).
            assert_eq!(parse(std::io::Cursor::new(ls[..100].to_vec())), None);
            let mut bad = ls.clone();
            for i in (16..bad.len().min(8192)).step_by(7) {
                bad[i] ^= 0xa5;
            }
            let _ = parse(std::io::Cursor::new(bad));
        }
    }

    /// Symbol tables and debug sections after the last loaded segment are left out
    /// once they reach [`UNLOADED_TAIL`]; the loaded part stays whole.
    #[test]
    fn an_unloaded_tail_is_left_out() {
        let Ok(libc) = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6") else {
            assert!(std::env::var_os("CI").is_none(), "host lacks libc");
            return;
        };
        let with_tail = |extra: u64| {
            let mut f = libc.clone();
            f.resize(libc.len() + extra as usize, 0x5a);
            let size = f.len() as u64;
            (load_ranges(std::io::Cursor::new(f), size), size)
        };
        let (small, _) = with_tail(UNLOADED_TAIL / 2);
        assert_eq!(small, None, "a small tail is fetched with the rest");
        let (ranges, size) = with_tail(4 << 20);
        let ranges = ranges.expect("tail left out");
        let end = ranges.last().expect("ranges").end;
        assert!(end <= libc.len() as u64, "{ranges:?}");
        assert!(size - end >= 4 << 20, "{ranges:?}");
        // Everything before the tail is kept: loaded segments only leave gaps of
        // their alignment.
        let kept: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        assert!(kept + (64 << 10) >= end, "{ranges:?}");
    }

    /// A library that is mostly read-only data after its code (as ICU's data library
    /// is) keeps its headers, code, writable data and dynamic section; the host's libc,
    /// mostly code, is left whole.
    #[test]
    fn a_data_library_leaves_out_its_data() {
        let Ok(libc) = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6") else {
            assert!(std::env::var_os("CI").is_none(), "host lacks libc");
            return;
        };
        let size = libc.len() as u64;
        assert_eq!(load_ranges(std::io::Cursor::new(libc.clone()), size), None);
        // The same file with its first read-only segment after the code made larger
        // than the code: that segment alone is left out.
        let (grown, offset, old_end) = with_large_data(&libc, 8 << 20).unwrap();
        let new_size = grown.len() as u64;
        let ranges = load_ranges(std::io::Cursor::new(grown), new_size).expect("data left out");
        assert_eq!(ranges[0].start, 0);
        assert!(
            ranges.windows(2).all(|w| w[0].end < w[1].start),
            "{ranges:?}"
        );
        // Nothing of the segment's own bytes but what other segments share with it.
        let kept_inside: u64 = ranges
            .iter()
            .map(|r| r.end.min(old_end).saturating_sub(r.start.max(offset)))
            .sum();
        assert!(kept_inside < 64 << 10, "{ranges:?}");
        assert!(
            ranges
                .iter()
                .all(|r| r.end <= new_size - (8 << 20) || r.start >= new_size),
            "{ranges:?}"
        );
        assert!(
            ranges.iter().any(|r| r.end > 1 << 16),
            "code kept: {ranges:?}"
        );
        // Garbage and cut files fall back to a whole fetch.
        assert_eq!(
            load_ranges(std::io::Cursor::new(b"#!/bin/sh".to_vec()), 9),
            None
        );
        assert_eq!(
            load_ranges(std::io::Cursor::new(libc[..100].to_vec()), size),
            None
        );
    }
}
