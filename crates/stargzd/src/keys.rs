//! Every key of the reference's configuration file (v0.18) and of ours, with what this
//! daemon does with it: honoured, or accepted and ignored for a stated reason. Keys
//! nobody knows are warned about and dropped, as the reference (whose TOML decoder
//! skips them) would start with them too.
//!
//! [`screen`] walks the parsed file once: one warning line per ignored or unknown key,
//! and a copy of the file without them for the parsers that reject unknown keys.

/// What the daemon does with a key.
enum Key {
    /// Honoured (the reference's meaning, or ours where docs/compatibility.md says so).
    Used,
    /// Accepted and not acted on; the reason is logged when the value asks for more
    /// than the default (anything but `false`, `0`, `""` or empty).
    Ignored(&'static str),
    /// Looked at by value: `Some(reason)` when this value cannot be honoured.
    Check(fn(&toml::Value) -> Option<&'static str>),
    /// A count or duration: a negative value (which the reference takes) is read as
    /// 0, the default, with a warning.
    Count,
    /// A table with these keys.
    Table(&'static [(&'static str, Key)]),
    /// A table whose every key (a registry host) holds this shape.
    Map(&'static Key),
    /// A list of tables of this shape.
    List(&'static Key),
    /// A section read by a parser of its own, which judges its keys itself; or free
    /// form (header names).
    Opaque,
}

use Key::{Check, Count, Ignored, List, Map, Opaque, Table, Used};

/// `[[resolver.host."NAME".mirrors]]` and our `[resolver.host."NAME".self]`.
const ENDPOINT: Key = Table(&[
    ("host", Used),
    ("insecure", Used),
    ("request_timeout_sec", Used),
    ("header", Opaque),
    ("ca_file", Used),
]);

const HOST: Key = Table(&[
    ("mirrors", List(&ENDPOINT)),
    ("ca_file", Used),
    ("self", ENDPOINT),
]);

const TOP: &[(&str, Key)] = &[
    ("http_cache_type", Used),
    ("filesystem_cache_type", Used),
    ("resolve_result_entry_ttl_sec", Used),
    (
        "resolve_result_entry",
        Ignored("deprecated; the reference ignores it too"),
    ),
    ("prefetch_size", Used),
    ("prefetch_timeout_sec", Used),
    ("prefetch_async_size", Used),
    ("noprefetch", Used),
    ("no_background_fetch", Used),
    (
        "debug",
        Ignored("no FUSE request trace; --log-level trace logs the filesystem's work"),
    ),
    ("allow_no_verification", Used),
    ("disable_verification", Used),
    ("max_concurrency", Used),
    ("no_prometheus", Used),
    (
        "log_file_access",
        Ignored("first accesses are not logged one by one; the fuse_open and read_on_demand metrics count them"),
    ),
    (
        "blob",
        Table(&[
            (
                "valid_interval",
                Ignored("no connection check between reads: every request is retried and a blob URL refreshed when it fails"),
            ),
            (
                "check_always",
                Ignored("no connection check between reads: every request is retried and a blob URL refreshed when it fails"),
            ),
            (
                "chunk_size",
                Ignored("reads fetch whole TOC chunks, merged and read ahead as the access pattern allows"),
            ),
            (
                "prefetch_chunk_size",
                Ignored("prefetch asks for its range in one request"),
            ),
            ("fetching_timeout_sec", Count),
            ("force_single_range_mode", Used),
            ("max_retries", Count),
            ("min_wait_msec", Count),
            ("max_wait_msec", Count),
            ("coalesce_gap_bytes", Used),
            ("max_ranges_per_request", Used),
            ("multi_range_parallelism", Used),
            ("max_concurrent_requests_per_host", Used),
            ("redirect_cache_sec", Used),
            ("connect_timeout_sec", Used),
            ("read_idle_timeout_sec", Used),
        ]),
    ),
    (
        "directory_cache",
        Table(&[
            (
                "max_lru_cache_entry",
                Ignored("the memory cache in front of the directory is bounded in bytes: directory_cache.max_memory_bytes"),
            ),
            (
                "max_cache_fds",
                Ignored("cache files are opened per access; no descriptors are kept"),
            ),
            ("sync_add", Used),
            (
                "direct",
                Ignored("the memory cache in front of the directory is bounded in bytes: directory_cache.max_memory_bytes"),
            ),
            (
                "fadv_dontneed",
                Ignored("cache files are left to the page cache"),
            ),
            ("max_memory_bytes", Used),
            ("max_size_mib", Used),
            ("max_age_sec", Used),
        ]),
    ),
    (
        "fuse",
        Table(&[
            ("attr_timeout", Used),
            ("entry_timeout", Used),
            ("passthrough", Used),
            (
                "merge_buffer_size",
                Ignored("passthrough files are written whole from the verified chunks"),
            ),
            (
                "merge_worker_count",
                Ignored("passthrough files are written whole from the verified chunks"),
            ),
        ]),
    ),
    ("kubeconfig_keychain", Opaque),
    ("cri_keychain", Opaque),
    ("credential_provider_keychain", Opaque),
    (
        "resolver",
        Table(&[
            ("host", Map(&HOST)),
            ("request_timeout_sec", Used),
            ("ca_file", Used),
            ("config_path", Used),
        ]),
    ),
    (
        "snapshotter",
        Table(&[("allow_invalid_mounts_on_restart", Used)]),
    ),
    ("metrics_address", Used),
    (
        "debug_address",
        Ignored("no debug endpoint is served; metrics are at metrics_address"),
    ),
    (
        "ipfs",
        Ignored("IPFS is not supported; layers come from registries only"),
    ),
    ("metadata_store", Check(metadata_store)),
    (
        "fuse_manager",
        Table(&[
            ("enable", Used),
            ("address", Used),
            ("path", Used),
            // Newer than v0.18 in the reference.
            (
                "metrics_address",
                Ignored("the daemon's metrics_address answers with the FUSE manager's metrics"),
            ),
        ]),
    ),
    ("background_fetch_quiet_msec", Used),
    ("sequential_readahead_kib", Used),
    ("speculative_head_kib", Used),
    // Ours: start-up files of images without prioritized files.
    ("zero_config_prefetch", Used),
    ("zero_config_prefetch_max_mib", Used),
    ("disable_remote_snapshots", Used),
    // Ours: learned prefetch (docs/snapshotter.md, "Learned prefetch").
    ("learn_window_sec", Used),
    ("learned_prefetch", Used),
    ("learned_prefetch_max_mib", Used),
    ("learned_prefetch_from_registry", Used),
    // Ours: layers that are not eStargz are downloaded and unpacked by the daemon.
    ("full_pull", Used),
    // A containerd section pasted along; never ours to read.
    ("proxy_plugins", Opaque),
];

fn metadata_store(v: &toml::Value) -> Option<&'static str> {
    match v.as_str() {
        Some("" | "memory") => None,
        _ => Some("the TOC index of each layer is kept in memory"),
    }
}

/// What [`screen`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Screened {
    /// `(dotted key, reason)` for keys accepted and not acted on.
    pub ignored: Vec<(String, &'static str)>,
    /// Dotted keys neither the reference nor this daemon knows.
    pub unknown: Vec<String>,
}

/// Walks `table` (a whole config file), removing ignored and unknown keys from it, and
/// logs one warning per key removed.
pub fn screen(table: &mut toml::Table) -> Screened {
    let mut out = Screened::default();
    walk_table(table, TOP, "", &mut out);
    for (key, reason) in &out.ignored {
        tracing::warn!(key = %key, reason, "config key ignored");
    }
    for key in &out.unknown {
        tracing::warn!(key = %key, "unknown config key ignored (the reference ignores it too)");
    }
    out
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Whether a value asks for nothing beyond the default.
fn is_zero(v: &toml::Value) -> bool {
    match v {
        toml::Value::Boolean(b) => !b,
        toml::Value::Integer(i) => *i == 0,
        toml::Value::Float(f) => *f == 0.0,
        toml::Value::String(s) => s.is_empty(),
        toml::Value::Array(a) => a.is_empty(),
        toml::Value::Table(t) => t.is_empty(),
        toml::Value::Datetime(_) => false,
    }
}

fn walk_table(table: &mut toml::Table, schema: &[(&str, Key)], prefix: &str, out: &mut Screened) {
    let names: Vec<String> = table.keys().cloned().collect();
    for name in names {
        let path = join(prefix, &name);
        let Some(key) = schema.iter().find(|(k, _)| *k == name).map(|(_, k)| k) else {
            table.remove(&name);
            out.unknown.push(path);
            continue;
        };
        let drop = match (key, table.get_mut(&name)) {
            (_, None) => false,
            (Ignored(reason), Some(v)) => {
                if !is_zero(v) {
                    out.ignored.push((path, reason));
                }
                true
            }
            (Count, Some(v)) => {
                if v.as_integer().is_some_and(|i| i < 0) {
                    *v = toml::Value::Integer(0);
                    out.ignored
                        .push((path, "a negative value is read as 0, the default"));
                }
                false
            }
            (Check(f), Some(v)) => match f(v) {
                Some(reason) => {
                    out.ignored.push((path, reason));
                    true
                }
                None => false,
            },
            (key, Some(v)) => {
                walk_value(v, key, &path, out);
                false
            }
        };
        if drop {
            table.remove(&name);
        }
    }
}

/// Walks one value of shape `key`. A value of another type than the shape expects is
/// left alone: the typed parser that reads it reports the error with its position.
fn walk_value(v: &mut toml::Value, key: &Key, path: &str, out: &mut Screened) {
    match (key, v) {
        (Table(schema), toml::Value::Table(t)) => walk_table(t, schema, path, out),
        (Map(inner), toml::Value::Table(t)) => {
            for (name, v) in t.iter_mut() {
                walk_value(v, inner, &join(path, &format!("{name:?}")), out);
            }
        }
        (List(inner), toml::Value::Array(items)) => {
            for (i, item) in items.iter_mut().enumerate() {
                walk_value(item, inner, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str) -> (toml::Table, Screened) {
        let mut t: toml::Table = toml::from_str(text).unwrap();
        let s = screen(&mut t);
        (t, s)
    }

    #[test]
    fn reference_keys_pass_or_are_ignored_with_a_reason() {
        let (t, s) = run(r#"
metadata_store = "db"
ipfs = true
debug = false
noprefetch = true
[blob]
check_always = true
max_retries = 1
valid_interval = 0
[fuse]
passthrough = false
merge_worker_count = 10
[directory_cache]
direct = true
sync_add = true
[[resolver.host."registry-integration.test".mirrors]]
host = "registry-alt.test:5000"
insecure = true
typo = 1
[resolver.host."registry-integration.test".mirrors.header]
x-anything = "v"
[cri_keychain]
enable_keychain = true
image_service_path = "/run/containerd/containerd.sock"
"#);
        let ignored: Vec<&str> = s.ignored.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            ignored,
            [
                "blob.check_always",
                "directory_cache.direct",
                "fuse.merge_worker_count",
                "ipfs",
                "metadata_store",
            ]
        );
        assert!(s.ignored.iter().all(|(_, why)| !why.is_empty()));
        assert_eq!(
            s.unknown,
            ["resolver.host.\"registry-integration.test\".mirrors[0].typo"]
        );
        // Dropped: the ignored, the unknown and zero-valued ignored keys; kept: the rest.
        assert!(!t.contains_key("metadata_store") && !t.contains_key("debug"));
        assert!(t["blob"].get("valid_interval").is_none());
        assert_eq!(t["blob"]["max_retries"].as_integer(), Some(1));
        let mirror = &t["resolver"]["host"]["registry-integration.test"]["mirrors"][0];
        assert!(mirror.get("typo").is_none());
        assert_eq!(mirror["header"]["x-anything"].as_str(), Some("v"));
        assert!(t["cri_keychain"].get("image_service_path").is_some());
    }

    #[test]
    fn memory_metadata_store_and_unknown_top_level() {
        let (t, s) = run("metadata_store = \"memory\"\nnot_a_key = 1\n[not_a_table]\nx = 1\n");
        assert!(s.ignored.is_empty());
        assert_eq!(s.unknown, ["not_a_key", "not_a_table"]);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn negative_counts_mean_the_default() {
        let (t, s) = run("[blob]\nmax_retries = -1\nmin_wait_msec = 5\n");
        assert_eq!(t["blob"]["max_retries"].as_integer(), Some(0));
        assert_eq!(t["blob"]["min_wait_msec"].as_integer(), Some(5));
        assert_eq!(s.ignored.len(), 1);
        assert_eq!(s.ignored[0].0, "blob.max_retries");
    }

    #[test]
    fn wrong_types_are_left_to_the_typed_parsers() {
        let (t, s) = run("resolver = 1\nfuse = \"x\"\n");
        assert_eq!(s, Screened::default());
        assert_eq!(t.len(), 2);
    }
}
