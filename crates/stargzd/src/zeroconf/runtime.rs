//! The files a container's first process opens whatever it is, and those a runtime
//! opens or runs at start beyond its own libraries (a Python interpreter's start-up
//! modules, a JVM, a C compiler's toolchain, the Go command's): small tables, so what is prefetched for
//! an image without a recorded list is easy to read and to change.

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
    // `setlocale(LC_ALL, "")` with the C.UTF-8 locale opens every category.
    ("usr/lib/locale/C.utf8/LC_ADDRESS", 64 << 10),
    ("usr/lib/locale/C.utf8/LC_COLLATE", 1 << 20),
    ("usr/lib/locale/C.utf8/LC_IDENTIFICATION", 64 << 10),
    ("usr/lib/locale/C.utf8/LC_MEASUREMENT", 64 << 10),
    (
        "usr/lib/locale/C.utf8/LC_MESSAGES/SYS_LC_MESSAGES",
        64 << 10,
    ),
    ("usr/lib/locale/C.utf8/LC_MONETARY", 64 << 10),
    ("usr/lib/locale/C.utf8/LC_NAME", 64 << 10),
    ("usr/lib/locale/C.utf8/LC_NUMERIC", 64 << 10),
    ("usr/lib/locale/C.utf8/LC_PAPER", 64 << 10),
    ("usr/lib/locale/C.utf8/LC_TELEPHONE", 64 << 10),
    ("usr/lib/locale/C.utf8/LC_TIME", 64 << 10),
    ("usr/share/locale/locale.alias", 64 << 10),
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

/// What a file of a runtime's installation is to the prefetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Read or mapped as data.
    Data,
    /// A shared object the runtime loads itself (`dlopen`): its libraries come too.
    Library,
    /// A program the runtime runs: its loader and libraries come too.
    Program,
    /// A large file of which the runtime reads its start (an index) before anything
    /// else: that many bytes of it, the rest on demand.
    Start(u64),
}

/// Files an OpenJDK launcher (`JAVA_HOME/bin/java`) opens before any class runs,
/// relative to `JAVA_HOME`: the VM it `dlopen`s, its class-data archive, the
/// libraries the VM loads at start (`strace -f java -version` lists them) and the
/// index at the start of the module image (`lib/modules`, 130 MB in all: a
/// 28-byte header, then the tables that locate every class, 1.5 MB in OpenJDK 17).
pub const JAVA_FILES: &[(&str, Kind)] = &[
    ("lib/jvm.cfg", Kind::Data),
    ("lib/server/libjvm.so", Kind::Library),
    ("lib/server/classes.jsa", Kind::Data),
    ("lib/libjava.so", Kind::Library),
    ("lib/libjimage.so", Kind::Library),
    ("lib/libjsvml.so", Kind::Library),
    ("lib/modules", Kind::Start(2 << 20)),
];

/// Files Debian's Node.js (`/usr/bin/node`, built with its bundled parsers and HTTP
/// client taken from other packages) reads at every start, even `node -e`: those of
/// them the image has.
pub const NODE_FILES: &[&str] = &[
    "usr/share/nodejs/acorn/dist/acorn.js",
    "usr/share/nodejs/acorn-walk/dist/walk.js",
    "usr/share/nodejs/cjs-module-lexer/lexer.js",
    "usr/share/nodejs/cjs-module-lexer/dist/lexer.js",
    "usr/share/nodejs/undici/undici-fetch.js",
];

/// Whether a program's file name is the Node.js runtime.
pub fn is_node(name: &str) -> bool {
    matches!(name, "node" | "nodejs")
}

/// Files a C compiler driver (`gcc`, `cc`) opens or runs for any compile and link,
/// relative to its `lib/gcc/TRIPLE/VERSION` directory: the compiler proper, the
/// linker's wrapper and plug-in, the start and end objects, the support library.
pub const GCC_FILES: &[(&str, Kind)] = &[
    ("collect2", Kind::Program),
    ("liblto_plugin.so", Kind::Library),
    ("crtbeginS.o", Kind::Data),
    ("crtendS.o", Kind::Data),
    ("crtbegin.o", Kind::Data),
    ("crtend.o", Kind::Data),
    ("libgcc.a", Kind::Data),
    ("libgcc_s.so", Kind::Data),
    ("include/stddef.h", Kind::Data),
    ("include/stdarg.h", Kind::Data),
];

/// Files of the C library's development files a link opens, relative to the
/// multiarch library directory (`usr/lib/TRIPLE`).
pub const GCC_LIBC_FILES: &[&str] = &[
    "Scrt1.o",
    "crt1.o",
    "crti.o",
    "crtn.o",
    "libc.so",
    "libc_nonshared.a",
];

/// Programs a C compiler driver runs from `PATH`: the assembler and the linker.
pub const GCC_TOOLS: &[&str] = &["as", "ld"];

/// Whether a program's file name is a GCC driver, and for which language: `Some(true)`
/// for C++ (`g++`, `c++`, `x86_64-linux-gnu-g++-12`), `Some(false)` for C (`gcc`,
/// `cc`, `c99`, `gcc-12`).
pub fn gcc_driver(name: &str) -> Option<bool> {
    // `x86_64-linux-gnu-gcc-12`: drop a target triple in front and a version behind.
    let base = name.rsplit_once("-g").map_or(name, |(_, rest)| {
        if rest.starts_with("cc") || rest.starts_with("++") {
            &name[name.len() - rest.len() - 1..]
        } else {
            name
        }
    });
    let base = match base.rsplit_once('-') {
        Some((b, v)) if !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.') => b,
        _ => base,
    };
    match base {
        "gcc" | "cc" | "c89" | "c99" => Some(false),
        "g++" | "c++" => Some(true),
        _ => None,
    }
}

/// Programs the `go` command runs from `GOROOT/pkg/tool/GOOS_GOARCH` to build any
/// package (`go build`, `go run`, `go test`): the compiler, the linker, the assembler.
pub const GO_TOOLS: &[&str] = &["compile", "link", "asm"];

/// `GOROOT` of a program at `path` if it is the `go` command (`GOROOT/bin/go`).
pub fn go_root(path: &str) -> Option<&str> {
    let root = path.strip_suffix("/bin/go")?;
    (!root.is_empty()).then_some(root)
}

/// The `GOOS_GOARCH` tool directory of this host, whose images run here.
pub fn go_host_tools() -> Option<&'static str> {
    match (std::env::consts::OS, std::env::consts::ARCH) {
        ("linux", "x86_64") => Some("linux_amd64"),
        ("linux", "aarch64") => Some("linux_arm64"),
        _ => None,
    }
}

/// `JAVA_HOME` of a program at `path` if it is an OpenJDK launcher (`.../bin/java`).
pub fn java_home(path: &str) -> Option<&str> {
    let home = path.strip_suffix("/bin/java")?;
    (!home.is_empty()).then_some(home)
}

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
    fn gcc_and_java_names() {
        for c in [
            "gcc",
            "cc",
            "c99",
            "gcc-12",
            "x86_64-linux-gnu-gcc-12",
            "x86_64-linux-gnu-gcc",
        ] {
            assert_eq!(gcc_driver(c), Some(false), "{c}");
        }
        for cxx in ["g++", "c++", "g++-12", "aarch64-linux-gnu-g++-13"] {
            assert_eq!(gcc_driver(cxx), Some(true), "{cxx}");
        }
        for other in ["gcc-ar", "gccgo", "ld", "x86_64-linux-gnu-gcc-nm-12", "cc1"] {
            assert_eq!(gcc_driver(other), None, "{other}");
        }
        assert_eq!(
            java_home("usr/lib/jvm/java-17-openjdk-amd64/bin/java"),
            Some("usr/lib/jvm/java-17-openjdk-amd64")
        );
        assert_eq!(java_home("usr/bin/javac"), None);
        assert_eq!(go_root("usr/lib/go-1.19/bin/go"), Some("usr/lib/go-1.19"));
        assert_eq!(go_root("usr/bin/gofmt"), None);
        assert_eq!(java_home("/bin/java"), None);
    }

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
