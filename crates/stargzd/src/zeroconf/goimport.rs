//! The packages a Go build reads: the imports of Go sources, followed through the
//! standard library under `GOROOT/src` a package at a time, so zero-config prefetch can
//! fetch what `go run` / `go build` opens (every file of every package it builds, and
//! the packages' compiled archives) in a few batches instead of a round trip a file.
//!
//! Every file of a package is fetched, as the go command opens them all; the imports
//! of a file are followed only when it is built here: its name (`_windows.go`, `_test.go`)
//! and its `//go:build` line (`ignore`, `!linux`, `cgo`) are checked against this
//! host, with cgo taken as off. Getting it wrong costs a few useless or missing
//! fetches.

/// Most packages followed per image.
pub const MAX_PACKAGES: usize = 256;
/// Largest Go source read for its imports.
pub const MAX_SOURCE_BYTES: u64 = 1 << 20;
/// Largest file of a package directory fetched.
pub const MAX_PACKAGE_FILE: u64 = 1 << 20;
/// Most files of one package directory fetched.
pub const MAX_PACKAGE_FILES: usize = 1024;
/// Most imports taken from one file.
const MAX_IMPORTS: usize = 256;
/// Longest import path taken.
const MAX_PATH: usize = 256;

const GOOS: &[&str] = &[
    "aix",
    "android",
    "darwin",
    "dragonfly",
    "freebsd",
    "hurd",
    "illumos",
    "ios",
    "js",
    "linux",
    "nacl",
    "netbsd",
    "openbsd",
    "plan9",
    "solaris",
    "wasip1",
    "windows",
    "zos",
];
const GOARCH: &[&str] = &[
    "386",
    "amd64",
    "amd64p32",
    "arm",
    "armbe",
    "arm64",
    "arm64be",
    "loong64",
    "mips",
    "mipsle",
    "mips64",
    "mips64le",
    "mips64p32",
    "mips64p32le",
    "ppc",
    "ppc64",
    "ppc64le",
    "riscv",
    "riscv64",
    "s390",
    "s390x",
    "sparc",
    "sparc64",
    "wasm",
];

/// The import paths of a Go source file: its import declarations, after the package
/// clause (comments anywhere).
pub fn imports(src: &[u8]) -> Vec<String> {
    let mut p = Parser { s: src, i: 0 };
    p.skip_space();
    if p.word() != Some("package") {
        return Vec::new();
    }
    p.skip_space();
    if p.word().is_none() {
        return Vec::new();
    }
    p.import_decls()
}

/// The imports of Go source a shell script writes itself (`printf 'package
/// main\nimport "fmt"\n...' > h.go`): every import declaration in its text, with
/// `\n`, `\t` and `\"` read as printf and echo would write them.
pub fn in_script(script: &str) -> Vec<String> {
    let text = script
        .replace("\\n", "\n")
        .replace("\\t", "\t")
        .replace("\\\"", "\"");
    let bytes = text.as_bytes();
    let mut out: Vec<String> = Vec::new();
    for (start, _) in text.match_indices("import") {
        let boundary =
            start == 0 || matches!(bytes[start - 1], b' ' | b'\t' | b'\n' | b';' | b'\'');
        if !boundary {
            continue;
        }
        let mut p = Parser { s: bytes, i: start };
        for path in p.import_decls() {
            if out.len() < MAX_IMPORTS && !out.contains(&path) {
                out.push(path);
            }
        }
    }
    out
}

/// Whether a file of a package is built on `goos`/`goarch` by its name (go/build's
/// rule: `_test` files are not, and `*_GOOS`, `*_GOARCH`, `*_GOOS_GOARCH` must match).
pub fn builds_here(name: &str, goos: &str, goarch: &str) -> bool {
    let Some(stem) = name.strip_suffix(".go") else {
        return false;
    };
    if stem.ends_with("_test") {
        return false;
    }
    let parts: Vec<&str> = stem.split('_').collect();
    let n = parts.len();
    if n >= 3 && GOOS.contains(&parts[n - 2]) && GOARCH.contains(&parts[n - 1]) {
        return parts[n - 2] == goos && parts[n - 1] == goarch;
    }
    if n >= 2 {
        let last = parts[n - 1];
        if GOOS.contains(&last) {
            return last == goos;
        }
        if GOARCH.contains(&last) {
            return last == goarch;
        }
    }
    true
}

/// Whether the `//go:build` line of a Go source (before its package clause) allows it
/// on `goos`/`goarch`: tags true are the system, the architecture, `unix` on Unix
/// systems, `gc` and every `go1.N` release; `cgo`, `ignore` and any other are false.
/// A file without the line, or with one that does not parse, is built.
pub fn constraint_allows(src: &[u8], goos: &str, goarch: &str) -> bool {
    for line in src.split(|&b| b == b'\n').take(MAX_HEADER_LINES) {
        let line = String::from_utf8_lossy(line);
        let line = line.trim();
        if line.starts_with("package ") {
            break;
        }
        let Some(expr) = line.strip_prefix("//go:build ") else {
            continue;
        };
        let tokens = tokenize(expr);
        let tag = |t: &str| {
            t == goos
                || t == goarch
                || t == "gc"
                || t.starts_with("go1.")
                || (t == "unix" && UNIX.contains(&goos))
        };
        let mut at = 0;
        return match or_expr(&tokens, &mut at, &tag, 0) {
            Some(v) if at == tokens.len() => v,
            _ => true,
        };
    }
    true
}

/// Lines before the package clause looked at for a `//go:build` line.
const MAX_HEADER_LINES: usize = 256;
/// Deepest nesting of a build expression evaluated.
const MAX_EXPR_DEPTH: u32 = 32;
const UNIX: &[&str] = &[
    "aix",
    "android",
    "darwin",
    "dragonfly",
    "freebsd",
    "hurd",
    "illumos",
    "ios",
    "linux",
    "netbsd",
    "openbsd",
    "solaris",
];

fn tokenize(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() && out.len() < 256 {
        match b[i] {
            b' ' | b'\t' => i += 1,
            b'(' | b')' | b'!' => {
                out.push((b[i] as char).to_string());
                i += 1;
            }
            b'&' | b'|' if b.get(i + 1) == Some(&b[i]) => {
                out.push(expr[i..i + 2].to_string());
                i += 2;
            }
            c if c.is_ascii_alphanumeric() || c == b'_' || c == b'.' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'.')
                {
                    i += 1;
                }
                out.push(expr[start..i].to_string());
            }
            _ => {
                // Not a build expression: a parse failure, so the file counts as built.
                out.push(String::from("?"));
                i += 1;
            }
        }
    }
    out
}

fn or_expr(t: &[String], at: &mut usize, tag: &dyn Fn(&str) -> bool, depth: u32) -> Option<bool> {
    let mut v = and_expr(t, at, tag, depth)?;
    while t.get(*at).is_some_and(|s| s == "||") {
        *at += 1;
        v |= and_expr(t, at, tag, depth)?;
    }
    Some(v)
}

fn and_expr(t: &[String], at: &mut usize, tag: &dyn Fn(&str) -> bool, depth: u32) -> Option<bool> {
    let mut v = not_expr(t, at, tag, depth)?;
    while t.get(*at).is_some_and(|s| s == "&&") {
        *at += 1;
        v &= not_expr(t, at, tag, depth)?;
    }
    Some(v)
}

fn not_expr(t: &[String], at: &mut usize, tag: &dyn Fn(&str) -> bool, depth: u32) -> Option<bool> {
    if depth >= MAX_EXPR_DEPTH {
        return None;
    }
    let tok = t.get(*at)?;
    *at += 1;
    match tok.as_str() {
        "!" => not_expr(t, at, tag, depth + 1).map(|v| !v),
        "(" => {
            let v = or_expr(t, at, tag, depth + 1)?;
            (t.get(*at)? == ")").then(|| *at += 1)?;
            Some(v)
        }
        s if s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') =>
        {
            Some(tag(s))
        }
        _ => None,
    }
}

/// This host's `GOOS` and `GOARCH`, whose images run here.
pub fn host() -> Option<(&'static str, &'static str)> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        _ => return None,
    };
    (std::env::consts::OS == "linux").then_some(("linux", arch))
}

/// Whether an import path names a package that can be in `GOROOT/src`: the standard
/// library (no dot in its first element), or one it vendors (`golang.org/x/...`).
pub fn sane(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= MAX_PATH
        && path != "C"
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | '~'))
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    /// Skips whitespace, semicolons and comments.
    fn skip_space(&mut self) {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' | b'\n' | b'\r' | b';' => self.i += 1,
                b'/' if self.s.get(self.i + 1) == Some(&b'/') => {
                    while self.peek().is_some_and(|c| c != b'\n') {
                        self.i += 1;
                    }
                }
                b'/' if self.s.get(self.i + 1) == Some(&b'*') => {
                    self.i += 2;
                    while self.i < self.s.len() && !self.s[self.i..].starts_with(b"*/") {
                        self.i += 1;
                    }
                    self.i = (self.i + 2).min(self.s.len());
                }
                _ => return,
            }
        }
    }

    /// An identifier (or `_`, `.`), if one starts here.
    fn word(&mut self) -> Option<&str> {
        let start = self.i;
        if self.peek() == Some(b'.') {
            self.i += 1;
        } else {
            while self
                .peek()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80)
            {
                self.i += 1;
            }
        }
        (self.i > start).then(|| std::str::from_utf8(&self.s[start..self.i]).ok())?
    }

    /// A `"..."` or `` `...` `` string literal, if one starts here.
    fn string(&mut self) -> Option<String> {
        let quote = self.peek().filter(|c| matches!(c, b'"' | b'`'))?;
        let start = self.i + 1;
        let len = self.s[start..]
            .iter()
            .take(MAX_PATH + 1)
            .position(|&c| c == quote || c == b'\n')?;
        if self.s[start + len] != quote {
            return None;
        }
        self.i = start + len + 1;
        std::str::from_utf8(&self.s[start..start + len])
            .ok()
            .map(str::to_string)
    }

    /// One import spec: an optional name, then the path.
    fn spec(&mut self) -> Option<String> {
        if !matches!(self.peek(), Some(b'"' | b'`')) {
            self.word()?;
            self.skip_space();
        }
        self.string()
    }

    /// Consecutive `import` declarations from here.
    fn import_decls(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            self.skip_space();
            let save = self.i;
            if self.word() != Some("import") {
                self.i = save;
                return out;
            }
            self.skip_space();
            if self.peek() == Some(b'(') {
                self.i += 1;
                loop {
                    self.skip_space();
                    if self.peek() == Some(b')') {
                        self.i += 1;
                        break;
                    }
                    match self.spec() {
                        Some(p) if out.len() < MAX_IMPORTS => out.push(p),
                        Some(_) => {}
                        None => return out,
                    }
                }
            } else {
                match self.spec() {
                    Some(p) if out.len() < MAX_IMPORTS => out.push(p),
                    Some(_) => {}
                    None => return out,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_of_a_file() {
        let src = br#"// Copyright
//go:build linux

/* a block
   comment */
package fmt // the package

import "errors"
import (
	"internal/fmtsort"
	// a comment between
	io2 "io"
	_ "unsafe"
	. "math"
	`os`
)

import "strconv"; import "sync"

func main() { import_ := "not an import" }
"#;
        assert_eq!(
            imports(src),
            [
                "errors",
                "internal/fmtsort",
                "io",
                "unsafe",
                "math",
                "os",
                "strconv",
                "sync"
            ]
        );
        assert!(imports(b"no package clause").is_empty());
        assert!(imports(b"package x\nimport (\n\"unterminated").is_empty());
        let many: String = std::iter::once("package p\nimport (\n".to_string())
            .chain((0..1000).map(|i| format!("\"p{i}\"\n")))
            .collect();
        assert_eq!(imports(many.as_bytes()).len(), MAX_IMPORTS);
    }

    #[test]
    fn imports_a_script_writes() {
        let script = r#"mkdir -p /tmp/h && cd /tmp/h && printf 'package main\nimport "fmt"\nfunc main() { fmt.Println("hello") }\n' > h.go && go run h.go"#;
        assert_eq!(in_script(script), ["fmt"]);
        let escaped = r#"echo "package main\nimport (\n\t\"os\"\n\t\"strings\"\n)\n" > m.go"#;
        assert_eq!(in_script(escaped), ["os", "strings"]);
        assert!(in_script("echo reimported; ls").is_empty());
    }

    #[test]
    fn file_names_by_system() {
        let ok = |n: &str| builds_here(n, "linux", "amd64");
        for yes in [
            "print.go",
            "os_linux.go",
            "asm_amd64.go",
            "sys_linux_amd64.go",
            "x_y.go",
        ] {
            assert!(ok(yes), "{yes}");
        }
        for no in [
            "print_test.go",
            "os_windows.go",
            "asm_arm64.go",
            "sys_linux_arm64.go",
            "sys_darwin_amd64.go",
            "asm.s",
        ] {
            assert!(!ok(no), "{no}");
        }
    }

    #[test]
    fn build_lines() {
        let here = |src: &str| constraint_allows(src.as_bytes(), "linux", "amd64");
        assert!(here("package x\n"));
        assert!(here(
            "// Copyright\n\n//go:build linux && amd64\n\npackage x\n"
        ));
        assert!(here("//go:build unix || windows\npackage x\n"));
        assert!(here("//go:build !cgo && go1.18\npackage x\n"));
        assert!(here(
            "//go:build (linux || darwin) && !(arm64 || 386)\npackage x\n"
        ));
        assert!(!here("//go:build ignore\n\npackage main\n"));
        assert!(!here("//go:build windows\npackage x\n"));
        assert!(!here("//go:build cgo\npackage x\n"));
        assert!(!here("//go:build linux && !amd64\npackage x\n"));
        // After the package clause it is no constraint; a broken one builds.
        assert!(here("package x\n//go:build ignore\n"));
        assert!(here("//go:build linux &&\npackage x\n"));
        assert!(here("//go:build (((linux\npackage x\n"));
        let deep = format!("//go:build {}linux\npackage x\n", "!".repeat(1000));
        assert!(here(&deep));
    }

    #[test]
    fn import_paths() {
        for p in ["fmt", "internal/abi", "golang.org/x/net/dns/dnsmessage"] {
            assert!(sane(p), "{p}");
        }
        for p in ["", "C", "/etc", "../x", "a//b", "a/./b", "a b"] {
            assert!(!sane(p), "{p}");
        }
    }
}
