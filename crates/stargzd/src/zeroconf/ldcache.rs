//! glibc's `/etc/ld.so.cache`, as the dynamic loader reads it to find a library by its
//! soname: the `glibc-ld.so.cache1.1` format, alone (glibc ≥ 2.32 writes only this) or
//! after the old `ld.so-1.7.0` table.
//!
//! The file comes from an image: counts and string offsets are checked against its
//! length, and at most [`MAX_ENTRIES`] entries are read.

use std::collections::HashMap;

const OLD_MAGIC: &[u8] = b"ld.so-1.7.0";
const NEW_MAGIC: &[u8] = b"glibc-ld.so.cache1.1";
/// magic+version (20), nlibs, len_strings, flags + padding, extension offset, 3 unused.
const NEW_HEADER: usize = 20 + 4 + 4 + 4 + 4 + 12;
const NEW_ENTRY: usize = 24;
const OLD_ENTRY: usize = 12;
/// Most entries taken from one cache (a full distribution has a few thousand).
pub const MAX_ENTRIES: usize = 65_536;
/// Largest cache file read.
pub const MAX_CACHE_BYTES: u64 = 16 << 20;

/// `FLAG_ELF_LIBC6`: the entry type for glibc's ELF libraries.
const FLAG_ELF_LIBC6: i32 = 0x0003;
const FLAG_TYPE_MASK: i32 = 0x00ff;
const FLAG_ARCH_MASK: i32 = 0xff00;

/// The architecture bits the loader of this build looks for (`FLAG_X8664_LIB64`,
/// `FLAG_AARCH64_LIB64`; i386 and others carry none).
fn host_arch_flag() -> Option<i32> {
    match std::env::consts::ARCH {
        "x86_64" => Some(0x0300),
        "aarch64" => Some(0x0a00),
        "riscv64" => Some(0x1000),
        "powerpc64" => Some(0x0500),
        "s390x" => Some(0x0400),
        _ => None,
    }
}

/// Sonames with the path the cache gives for each (the first entry of a name wins, as
/// in the loader, which reads the sorted table from the start; entries for glibc-hwcaps
/// subdirectories lose to the plain one).
#[derive(Debug, Default, Clone)]
pub struct LdCache {
    libs: HashMap<String, String>,
}

impl LdCache {
    pub fn get(&self, soname: &str) -> Option<&str> {
        self.libs.get(soname).map(String::as_str)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.libs.len()
    }

    /// Parses a cache; `None` for anything that is not one.
    pub fn parse(data: &[u8]) -> Option<LdCache> {
        let new_at = if data.starts_with(NEW_MAGIC) {
            0
        } else if data.starts_with(OLD_MAGIC) {
            // The old table, then the new format aligned to 8 bytes.
            let n = read_u32(data, OLD_MAGIC.len().next_multiple_of(4))? as usize;
            let end =
                (OLD_MAGIC.len().next_multiple_of(4) + 4).checked_add(n.checked_mul(OLD_ENTRY)?)?;
            let at = end.next_multiple_of(8);
            if !data.get(at..)?.starts_with(NEW_MAGIC) {
                return None;
            }
            at
        } else {
            return None;
        };
        let new = data.get(new_at..)?;
        let nlibs = read_u32(new, 20)? as usize;
        let want_arch = host_arch_flag();
        let mut libs = HashMap::new();
        let mut hwcap_only: HashMap<String, String> = HashMap::new();
        for i in 0..nlibs.min(MAX_ENTRIES) {
            let at = NEW_HEADER.checked_add(i.checked_mul(NEW_ENTRY)?)?;
            let Some(entry) = new.get(at..at + NEW_ENTRY) else {
                break;
            };
            let flags = read_u32(entry, 0)? as i32;
            if flags & FLAG_TYPE_MASK != FLAG_ELF_LIBC6 {
                continue;
            }
            if let Some(arch) = want_arch {
                if flags & FLAG_ARCH_MASK != arch {
                    continue;
                }
            }
            // String offsets count from the start of the new-format header.
            let (Some(key), Some(value)) = (
                c_str(new, read_u32(entry, 4)? as usize),
                c_str(new, read_u32(entry, 8)? as usize),
            ) else {
                continue;
            };
            let hwcap = u64::from(read_u32(entry, 16)?) | u64::from(read_u32(entry, 20)?) << 32;
            let target = if hwcap == 0 {
                &mut libs
            } else {
                &mut hwcap_only
            };
            target.entry(key).or_insert(value);
        }
        for (k, v) in hwcap_only {
            libs.entry(k).or_insert(v);
        }
        Some(LdCache { libs })
    }
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let b = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// The NUL-terminated UTF-8 string at `at`, at most 4096 bytes.
fn c_str(data: &[u8], at: usize) -> Option<String> {
    let rest = data.get(at..)?;
    let rest = &rest[..rest.len().min(4096)];
    let end = rest.iter().position(|&b| b == 0)?;
    let s = std::str::from_utf8(&rest[..end]).ok()?;
    (!s.is_empty()).then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "test code: a panic is a failed assertion"
    )]

    use super::*;

    #[test]
    fn host_cache_lists_libc() {
        let Ok(data) = std::fs::read("/etc/ld.so.cache") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "no /etc/ld.so.cache on this host"
            );
            return;
        };
        let cache = LdCache::parse(&data).expect("host cache parses");
        let libc = cache.get("libc.so.6").expect("libc.so.6 listed");
        assert!(
            libc.starts_with('/') && libc.ends_with("libc.so.6"),
            "{libc}"
        );
        assert!(std::path::Path::new(libc).exists(), "{libc}");
        assert!(cache.len() > 5, "{cache:?}");
    }

    /// A cache built by the host's own ldconfig over a directory of ours.
    #[test]
    fn ldconfig_built_cache() {
        let ldconfig = ["/sbin/ldconfig", "/usr/sbin/ldconfig"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let Some(ldconfig) = ldconfig else {
            assert!(std::env::var_os("CI").is_none(), "no ldconfig on this host");
            return;
        };
        let host = LdCache::parse(&std::fs::read("/etc/ld.so.cache").unwrap()).unwrap();
        let libc = host.get("libc.so.6").unwrap().to_string();
        // An image root of its own: ldconfig -r works inside it as an image build does,
        // and records paths as the image sees them.
        let root = tempfile::tempdir().unwrap();
        for d in ["etc", "mylibs", "lib", "usr/lib"] {
            std::fs::create_dir_all(root.path().join(d)).unwrap();
        }
        std::fs::copy(&libc, root.path().join("mylibs/libc.so.6")).unwrap();
        std::fs::write(root.path().join("etc/ld.so.conf"), "/mylibs\n").unwrap();
        let st = std::process::Command::new(ldconfig)
            .arg("-r")
            .arg(root.path())
            .args(["-X", "-C", "/etc/ld.so.cache", "-f", "/etc/ld.so.conf"])
            .status()
            .unwrap();
        assert!(st.success());
        let data = std::fs::read(root.path().join("etc/ld.so.cache")).unwrap();
        let cache = LdCache::parse(&data).unwrap();
        assert_eq!(
            cache.get("libc.so.6"),
            Some("/mylibs/libc.so.6"),
            "{cache:?}"
        );
        assert!(cache.get("libnothere.so.1").is_none());
    }

    #[test]
    fn hostile_caches_do_not_panic() {
        assert!(LdCache::parse(b"").is_none());
        assert!(LdCache::parse(b"not a cache at all").is_none());
        let mut data = NEW_MAGIC.to_vec();
        data.extend_from_slice(&u32::MAX.to_ne_bytes());
        data.resize(NEW_HEADER, 0);
        // One entry whose strings point past the end.
        data.extend_from_slice(&(FLAG_ELF_LIBC6 | 0x0300).to_ne_bytes());
        data.extend_from_slice(&u32::MAX.to_ne_bytes());
        data.extend_from_slice(&u32::MAX.to_ne_bytes());
        data.resize(data.len() + 12, 0);
        let c = LdCache::parse(&data).unwrap();
        assert_eq!(c.len(), 0);
        let mut old = OLD_MAGIC.to_vec();
        old.resize(12, 0);
        old.extend_from_slice(&u32::MAX.to_ne_bytes());
        assert!(LdCache::parse(&old).is_none());
    }
}
