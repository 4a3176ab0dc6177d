//! The headers a C or C++ compile reads: the `#include` directives of sources and
//! headers, and the directories GCC searches for them, so zero-config prefetch can
//! fetch a compile's headers a level at a time instead of one round trip each.
//!
//! Nothing is preprocessed: the includes of every conditional branch are taken, and an
//! include whose name is a macro is skipped. Getting it wrong costs a few small
//! useless or missing fetches.

/// Most headers (and sources) of one image looked at in all.
pub const MAX_HEADERS: usize = 512;
/// Largest header parsed for its includes (a larger one is still fetched).
pub const MAX_HEADER_BYTES: u64 = 1 << 20;
/// Deepest nesting of includes followed.
pub const MAX_INCLUDE_DEPTH: u32 = 32;
/// Most directives taken from one file.
const MAX_PER_FILE: usize = 256;
/// Longest header name taken.
const MAX_NAME: usize = 256;

/// The header every GCC compile includes before the source (`-include` of glibc's
/// predefined macros), searched like `#include <...>`.
pub const PREINCLUDED: &str = "stdc-predef.h";

/// One `#include` directive.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Include {
    pub name: String,
    /// `"name"`: the including file's directory is searched first.
    pub quoted: bool,
    /// `#include_next`: the search goes on past the directory the includer came from.
    pub next: bool,
}

/// The include directives of a source or header, in order.
pub fn directives(text: &[u8]) -> Vec<Include> {
    let mut out = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        if out.len() >= MAX_PER_FILE {
            break;
        }
        let line = trim_start(line);
        let Some(rest) = line.strip_prefix(b"#") else {
            continue;
        };
        if let Some(inc) = directive(trim_start(rest)) {
            out.push(inc);
        }
    }
    out
}

/// The includes of C source a shell script writes itself (`printf '#include
/// <stdio.h>\n...' > h.c`, a here-document): `#include` anywhere in its text.
pub fn in_script(script: &str) -> Vec<Include> {
    let mut out: Vec<Include> = Vec::new();
    for (start, _) in script.match_indices("#include") {
        if out.len() >= MAX_PER_FILE {
            break;
        }
        if let Some(inc) = directive(&script.as_bytes()[start + 1..]) {
            if !out.contains(&inc) {
                out.push(inc);
            }
        }
    }
    out
}

/// `include <name>` / `include_next "name"` after the `#`.
fn directive(rest: &[u8]) -> Option<Include> {
    let rest = rest.strip_prefix(b"include")?;
    let (next, rest) = match rest.strip_prefix(b"_next") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    // `#include<x.h>` is as valid as `#include <x.h>`; `#includes` is no directive.
    let rest = trim_start(rest);
    let (close, quoted) = match rest.first()? {
        b'<' => (b'>', false),
        b'"' => (b'"', true),
        _ => return None,
    };
    let body = &rest[1..];
    let end = body.iter().take(MAX_NAME + 1).position(|&b| b == close)?;
    let name = std::str::from_utf8(&body[..end]).ok()?.trim();
    let sane = !name.is_empty()
        && !name.starts_with('/')
        && !name.contains(['\\', '\0', '\n', '\r'])
        && !name.split('/').any(|c| c == "..");
    sane.then(|| Include {
        name: name.to_string(),
        quoted,
        next,
    })
}

/// GCC's search list for `#include <...>` on a Debian-style layout (`gcc -v -E`):
/// the compiler's own headers, `/usr/local/include`, its fixed headers, the multiarch
/// and plain system directories; for C++ the library's headers come first.
pub fn search_dirs(gcc_dir: &str, triple: &str, version: &str, cxx: bool) -> Vec<String> {
    let mut dirs = Vec::new();
    if cxx {
        dirs.push(format!("usr/include/c++/{version}"));
        dirs.push(format!("usr/include/{triple}/c++/{version}"));
        dirs.push(format!("usr/include/c++/{version}/backward"));
    }
    dirs.push(format!("{gcc_dir}/include"));
    dirs.push("usr/local/include".to_string());
    dirs.push(format!("{gcc_dir}/include-fixed"));
    dirs.push(format!("usr/include/{triple}"));
    dirs.push("usr/include".to_string());
    dirs
}

/// Whether a command-line argument of a compiler driver names a C or C++ source or
/// header, which the compile reads and whose includes it follows.
pub fn is_source(arg: &str) -> bool {
    !arg.starts_with('-')
        && [".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".C"]
            .iter()
            .any(|ext| arg.ends_with(ext) && arg.len() > ext.len())
}

fn trim_start(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
    &s[n..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[Include]) -> Vec<(&str, bool, bool)> {
        v.iter()
            .map(|i| (i.name.as_str(), i.quoted, i.next))
            .collect()
    }

    #[test]
    fn directives_of_every_branch() {
        let text = b"/* #include <not_at_line_start.h> */\n\
            #include <features.h>\n\
            #if defined __USE_GNU\n\
            #  include <bits/types/cookie_io_functions_t.h>\n\
            #else\n\
            \t# include \"local.h\"\n\
            #endif\n\
            #include_next <limits.h>\n\
            #include<tight.h>\n\
            #includes <no.h>\n\
            #include MACRO_NAME\n\
            #include </etc/passwd>\n\
            #include \"../up.h\"\n\
            #include <unterminated.h\n\
            #define X 1\n";
        assert_eq!(
            names(&directives(text)),
            vec![
                ("features.h", false, false),
                ("bits/types/cookie_io_functions_t.h", false, false),
                ("local.h", true, false),
                ("limits.h", false, true),
                ("tight.h", false, false),
            ]
        );
    }

    #[test]
    fn includes_a_script_writes() {
        let script = r#"printf '#include <stdio.h>\n#include "app.h"\nint main(void){puts("hello");return 0;}\n' > /tmp/h.c && gcc -o /tmp/h /tmp/h.c && /tmp/h; echo '#include <stdio.h>'"#;
        assert_eq!(
            names(&in_script(script)),
            vec![("stdio.h", false, false), ("app.h", true, false)]
        );
        assert!(in_script("echo no includes here").is_empty());
    }

    #[test]
    fn bounds_hold() {
        let many: String = (0..1000).map(|i| format!("#include <h{i}.h>\n")).collect();
        assert_eq!(directives(many.as_bytes()).len(), MAX_PER_FILE);
        assert_eq!(in_script(&many).len(), MAX_PER_FILE);
        let long = format!("#include <{}.h>\n", "a".repeat(MAX_NAME + 10));
        assert!(directives(long.as_bytes()).is_empty());
    }

    #[test]
    fn sources_and_search_dirs() {
        for s in ["h.c", "/tmp/h.c", "src/a.cpp", "x.h", "y.cc"] {
            assert!(is_source(s), "{s}");
        }
        for s in ["-o", "/tmp/h", ".c", "-DX=a.c", "h.o", "libx.a"] {
            assert!(!is_source(s), "{s}");
        }
        let dirs = search_dirs(
            "usr/lib/gcc/x86_64-linux-gnu/12",
            "x86_64-linux-gnu",
            "12",
            false,
        );
        assert_eq!(dirs[0], "usr/lib/gcc/x86_64-linux-gnu/12/include");
        assert_eq!(dirs.last().map(String::as_str), Some("usr/include"));
        let cxx = search_dirs(
            "usr/lib/gcc/x86_64-linux-gnu/12",
            "x86_64-linux-gnu",
            "12",
            true,
        );
        assert_eq!(cxx[0], "usr/include/c++/12");
        assert_eq!(cxx.len(), dirs.len() + 3);
    }
}
