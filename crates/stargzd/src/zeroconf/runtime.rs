//! The files a container's first process opens whatever it is, and those a Python
//! interpreter imports before running anything: small tables, so what is prefetched
//! for an image without a recorded list is easy to read and to change.

/// Files a dynamically linked program (glibc's loader, its NSS and locale set-up) or a
/// common runtime opens at start, when the image has them, with the most bytes of each
/// worth fetching ahead (a larger file is left to on-demand reads).
pub const COMMON_FILES: &[(&str, u64)] = &[
    ("etc/ld.so.preload", 64 << 10),
    ("etc/ld.so.cache", super::ldcache::MAX_CACHE_BYTES),
    ("etc/passwd", 1 << 20),
    ("etc/group", 1 << 20),
    ("etc/nsswitch.conf", 64 << 10),
    ("etc/host.conf", 64 << 10),
    ("etc/localtime", 1 << 20),
    // Distributions with all locales ship hundreds of MiB here; only a small one
    // (C.UTF-8 and a few) is worth it.
    ("usr/lib/locale/locale-archive", 4 << 20),
    ("usr/lib/locale/C.utf8/LC_CTYPE", 1 << 20),
    (
        "usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
        256 << 10,
    ),
    (
        "usr/lib/aarch64-linux-gnu/gconv/gconv-modules.cache",
        256 << 10,
    ),
    ("usr/lib64/gconv/gconv-modules.cache", 256 << 10),
];

/// Where the dynamic loader looks after `LD_LIBRARY_PATH`, the runpath and
/// `/etc/ld.so.cache`: its built-in directories, the multiarch ones of Debian-based
/// images first.
pub const DEFAULT_LIB_DIRS: &[&str] = &[
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "lib64",
    "usr/lib64",
    "lib",
    "usr/lib",
];

/// `PATH` when the image's config sets none (what containerd gives a container then).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Modules of the standard library a CPython 3 interpreter imports before the script
/// runs (`python3 -c pass` with `-X importtime` lists them), as paths under
/// `lib/python3.N/` without `.py`. Recent versions freeze some of them into the
/// binary; fetching the few KiB of the source is cheaper than guessing which.
pub const PYTHON_STARTUP_MODULES: &[&str] = &[
    "encodings/__init__",
    "encodings/aliases",
    "encodings/utf_8",
    "encodings/latin_1",
    "codecs",
    "io",
    "abc",
    "site",
    "os",
    "stat",
    "posixpath",
    "genericpath",
    "_collections_abc",
    "_sitebuiltins",
    "_distutils_hack/__init__",
];

/// Directories holding a Python's standard library (`{}` is `python3.N`).
pub const PYTHON_LIB_DIRS: &[&str] = &["usr/local/lib/{}", "usr/lib/{}"];

/// Where `site` finds `distutils-precedence.pth` and `_distutils_hack` (Debian's
/// `dist-packages`, upstream's `site-packages`).
pub const PYTHON_SITE_DIRS: &[&str] = &[
    "usr/local/lib/{}/site-packages",
    "usr/lib/python3/dist-packages",
];

/// Whether a program's file name is a Python 3 interpreter (`python3`, `python3.12`).
pub fn python_version(name: &str) -> Option<Option<u32>> {
    let rest = name.strip_prefix("python3")?;
    if rest.is_empty() {
        return Some(None);
    }
    let minor = rest.strip_prefix('.')?;
    let n: u32 = minor.parse().ok()?;
    (n < 100).then_some(Some(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_names() {
        assert_eq!(python_version("python3"), Some(None));
        assert_eq!(python_version("python3.12"), Some(Some(12)));
        assert_eq!(python_version("python3.x"), None);
        assert_eq!(python_version("python3-config"), None);
        assert_eq!(python_version("ls"), None);
        assert_eq!(python_version("python3.99999999999"), None);
    }
}
