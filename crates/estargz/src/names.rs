//! Entry names: the one place that decides what a safe, canonical path inside a layer is.

/// Longest path accepted, as Linux's PATH_MAX.
pub const MAX_PATH_LEN: usize = 4096;

/// Canonical form of an entry name: no leading `./`, no trailing `/`, no empty or `.`
/// components; the root directory is `""`. Names that climb out of the layer (`..`),
/// absolute names, NUL bytes and over-long names are refused with the reason.
pub fn clean_name(name: &str) -> Result<String, String> {
    if name.starts_with('/') {
        return Err("absolute path".into());
    }
    if name.len() > MAX_PATH_LEN {
        return Err(format!("path longer than {MAX_PATH_LEN} bytes"));
    }
    if name.contains('\0') {
        return Err("NUL byte in path".into());
    }
    let mut out = String::with_capacity(name.len());
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("path contains \"..\"".into()),
            p => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(p);
            }
        }
    }
    Ok(out)
}

/// Parent of a clean name (`""` for top-level names and the root).
pub fn parent_of(clean: &str) -> &str {
    match clean.rfind('/') {
        Some(i) => &clean[..i],
        None => "",
    }
}

/// Last component of a clean name.
pub fn base_of(clean: &str) -> &str {
    match clean.rfind('/') {
        Some(i) => &clean[i + 1..],
        None => clean,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_and_refuses() {
        assert_eq!(clean_name("./a/b/").unwrap(), "a/b");
        assert_eq!(clean_name("./").unwrap(), "");
        assert_eq!(clean_name("a//b/./c").unwrap(), "a/b/c");
        assert!(clean_name("../etc/passwd").is_err());
        assert!(clean_name("a/../../b").is_err());
        assert!(clean_name("/etc/passwd").is_err());
        assert!(clean_name(&"a/".repeat(3000)).is_err());
        assert_eq!(parent_of("a/b/c"), "a/b");
        assert_eq!(base_of("a/b/c"), "c");
        assert_eq!(parent_of("a"), "");
    }
}
