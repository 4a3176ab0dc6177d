//! The bounds and the text reading for paths a command names: a program given a file
//! or a directory by absolute path (`postgres -D /var/lib/db -c
//! config_file=/etc/db.conf`, `python3 /app/main.py`) opens it at start, and a small
//! configuration file given so names the server's other files in turn.

/// Arguments of one command looked at.
pub const MAX_ARGS: usize = 64;
/// Named paths taken in all (files and directories).
pub const MAX_PATHS: usize = 16;
/// Largest named file fetched (whole).
pub const MAX_FILE: u64 = 4 << 20;
/// Largest named file read for the paths it names.
pub const MAX_CONFIG: u64 = 256 << 10;
/// Most paths taken from one configuration file.
const MAX_CONFIG_PATHS: usize = 32;
/// Longest path taken from a configuration file.
const MAX_PATH: usize = 512;
/// Levels of a named directory whose files come (1: its own files only).
pub const DIR_DEPTH: usize = 2;
/// Most subdirectories of one level looked into.
pub const DIR_SUBDIRS: usize = 256;
/// Largest file of a named directory that comes.
pub const DIR_FILE_MAX: u64 = 64 << 10;
/// Most files, and bytes, of one named directory that come.
pub const DIR_FILES: usize = 128;
pub const DIR_BYTES: u64 = 2 << 20;

/// Top-level directories of a Linux image that are not one program's data: a command
/// naming one (`find /usr`, `chown -R app /var/lib`) is no reason to fetch its files.
const SYSTEM_TOP: &[&str] = &[
    "bin", "boot", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "media", "mnt", "opt",
    "proc", "root", "run", "sbin", "srv", "sys", "tmp", "usr", "var",
];

/// Whether `path` (relative to the image root, as resolved) is the root, a system
/// top-level directory or one right below one (`usr/lib`, `var/lib`, `etc/ssl`).
pub fn is_system_dir(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    match parts.as_slice() {
        [] => true,
        [top] | [top, _] => SYSTEM_TOP.contains(top),
        _ => false,
    }
}

/// Absolute paths in a configuration file's text: a `/` that starts a line or a
/// value (after whitespace, `=`, `:` or a quote), up to the next quote, whitespace or
/// separator. Comments (from a `#` that starts the line or follows whitespace) and
/// paths with `..` or wildcards are left out.
pub fn paths_in(text: &[u8]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        let comment = line
            .iter()
            .enumerate()
            .position(|(i, &b)| b == b'#' && (i == 0 || matches!(line[i - 1], b' ' | b'\t')))
            .unwrap_or(line.len());
        let line = &line[..comment];
        let mut i = 0;
        while i < line.len() {
            if out.len() >= MAX_CONFIG_PATHS {
                return out;
            }
            let starts = line[i] == b'/'
                && (i == 0 || matches!(line[i - 1], b' ' | b'\t' | b'=' | b':' | b'\'' | b'"'));
            if !starts {
                i += 1;
                continue;
            }
            let len = line[i..]
                .iter()
                .position(|b| matches!(b, b'\'' | b'"' | b' ' | b'\t' | b'\r' | b',' | b';'))
                .unwrap_or(line.len() - i);
            let raw = &line[i..i + len];
            i += len.max(1);
            if raw.len() < 2 || raw.len() > MAX_PATH {
                continue;
            }
            let Ok(p) = std::str::from_utf8(raw) else {
                continue;
            };
            let unsafe_or_pattern =
                p.split('/').any(|c| c == "..") || p.contains(['*', '?', '%', '$', '\0']);
            // `//host/path` is a URL's, not a file's.
            if unsafe_or_pattern || p.starts_with("//") {
                continue;
            }
            if !out.iter().any(|o| o == p) {
                out.push(p.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_a_configuration_names() {
        let text = b"# a comment naming /etc/commented\n\
            #unix_socket_directories = '/var/run/postgresql'\n\
            data_directory = '/var/lib/postgresql/15/main'\t# /etc/trailing\n\
            hba_file = '/etc/postgresql/15/main/pg_hba.conf'\n\
            ssl_cert_file=\"/etc/ssl/certs/ssl-cert-snakeoil.pem\"\n\
            include_dir = 'conf.d'\n\
            log_line_prefix = '%m [%p] %q%u@%d '\n\
            evil = '/etc/../../root/secret'\n\
            glob = /var/log/*.log\n\
            url = http://example/path\n\
            key:/srv/key.pem\n\
            /\n";
        assert_eq!(
            paths_in(text),
            vec![
                "/var/lib/postgresql/15/main",
                "/etc/postgresql/15/main/pg_hba.conf",
                "/etc/ssl/certs/ssl-cert-snakeoil.pem",
                "/srv/key.pem",
            ]
        );
        let many: String = (0..100).map(|i| format!("f{i} = /data/f{i}\n")).collect();
        assert_eq!(paths_in(many.as_bytes()).len(), MAX_CONFIG_PATHS);
        assert!(paths_in(&[b'/'; 4096]).is_empty());
    }

    #[test]
    fn system_directories() {
        for p in ["", "usr", "usr/lib", "var/lib", "etc/ssl", "tmp"] {
            assert!(is_system_dir(p), "{p}");
        }
        for p in [
            "var/lib/postgresql/15/main",
            "data",
            "app/config",
            "usr/lib/app/data",
        ] {
            assert!(!is_system_dir(p), "{p}");
        }
    }
}
