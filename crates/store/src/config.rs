//! The store's TOML configuration: the reference's keys (the filesystem keys shared with
//! the snapshotter, `[resolver]`, `[kubeconfig_keychain]`, `metadata_store`), unknown keys
//! warned about, and type errors reported with their position.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The configuration file read when `--config` is not given; missing, it means defaults.
pub const DEFAULT_CONFIG: &str = "/etc/stargz-store/config.toml";

/// Top-level keys the reference store understands, plus the ones of ours it shares
/// with the daemon.
const KNOWN: &[&str] = &[
    "http_cache_type",
    "filesystem_cache_type",
    "resolve_result_entry_ttl_sec",
    "resolve_result_entry",
    "prefetch_size",
    "prefetch_timeout_sec",
    "noprefetch",
    "no_background_fetch",
    "debug",
    "allow_no_verification",
    "disable_verification",
    "max_concurrency",
    "background_fetch_quiet_msec",
    "sequential_readahead_kib",
    "no_prometheus",
    "blob",
    "directory_cache",
    "fuse",
    "resolver",
    "kubeconfig_keychain",
    "metadata_store",
    "metrics_address",
];

#[derive(Deserialize)]
struct StoreKeys {
    metadata_store: Option<String>,
    metrics_address: Option<String>,
    #[serde(default)]
    no_prometheus: bool,
}

/// Parsed store configuration.
#[derive(Debug, Default)]
pub struct StoreConfig {
    pub fs: fs::Config,
    pub registry: registry::RegistryConfig,
    /// `[kubeconfig_keychain]`: registry credentials from the cluster's
    /// `kubernetes.io/dockerconfigjson` secrets (CRI-O nodes).
    pub kubeconfig_keychain: registry::KubeconfigKeychainConfig,
    /// Not a reference key for the store (the daemon's): `host:port` of a Prometheus
    /// endpoint (`GET /metrics`).
    pub metrics_address: Option<String>,
}

impl StoreConfig {
    /// Reads `path`; a missing file is fine only when `explicit` is false.
    pub fn load(path: &Path, explicit: bool) -> Result<StoreConfig> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                tracing::info!(path = %path.display(), "no config file; using defaults");
                return Ok(StoreConfig::default());
            }
            Err(e) => return Err(e).with_context(|| format!("reading config {}", path.display())),
        };
        Self::parse(&text).with_context(|| format!("config {}", path.display()))
    }

    /// Parses the TOML text; errors name the key and line.
    pub fn parse(text: &str) -> Result<StoreConfig> {
        let table: toml::Table = toml::from_str(text)?;
        for k in table.keys() {
            if !KNOWN.contains(&k.as_str()) {
                tracing::warn!(key = %k, "unknown config key ignored");
            }
        }
        let fs: fs::Config = toml::from_str(text)?;
        // As the reference: the store refuses to serve unverified content.
        if fs.disable_verification {
            bail!("disable_verification: content verification can't be disabled in stargz-store");
        }
        let mut reg = toml::Table::new();
        for k in ["resolver", "blob"] {
            if let Some(v) = table.get(k) {
                reg.insert(k.to_string(), v.clone());
            }
        }
        let mut registry: registry::RegistryConfig = reg.try_into()?;
        for warning in registry.resolver.apply_hosts_dir()? {
            tracing::warn!(%warning, "hosts directory");
        }
        let kubeconfig_keychain: registry::KubeconfigKeychainConfig = table
            .get("kubeconfig_keychain")
            .cloned()
            .unwrap_or_else(|| toml::Value::Table(toml::Table::new()))
            .try_into()
            .context("[kubeconfig_keychain]")?;
        let keys: StoreKeys = toml::from_str(text)?;
        match keys.metadata_store.as_deref() {
            None | Some("" | "memory" | "db") => {}
            Some(other) => bail!("metadata_store: unknown type {other:?}; must be memory or db"),
        }
        Ok(StoreConfig {
            fs,
            registry,
            kubeconfig_keychain,
            metrics_address: keys
                .metrics_address
                .filter(|a| !a.is_empty() && !keys.no_prometheus),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[test]
    fn reference_keys() {
        let c = StoreConfig::parse(
            "noprefetch = true\nmetadata_store = \"db\"\n[kubeconfig_keychain]\nenable_keychain = true\n\
             kubeconfig_path = \"/etc/kube.conf\"\n[[resolver.host.\"docker.io\".mirrors]]\nhost = \"mirror.example\"\n\
             [fuse]\nattr_timeout = 3\n",
        )
        .unwrap();
        assert!(c.fs.noprefetch);
        assert_eq!(c.fs.fuse.attr_timeout, 3);
        assert!(c.kubeconfig_keychain.enable_keychain);
        let h = c.registry.resolver.host_config("docker.io").unwrap();
        assert_eq!(h.mirrors[0].host, "mirror.example");
        assert_eq!(c.metrics_address, None);
    }

    #[test]
    fn refusals_and_positions() {
        let e = format!(
            "{:#}",
            StoreConfig::parse("disable_verification = true\n").unwrap_err()
        );
        assert!(e.contains("can't be disabled"), "{e}");
        let e = format!(
            "{:#}",
            StoreConfig::parse("metadata_store = \"bolt\"\n").unwrap_err()
        );
        assert!(e.contains("metadata_store"), "{e}");
        let e = format!(
            "{:#}",
            StoreConfig::parse("debug = false\nnoprefetch = 1\n").unwrap_err()
        );
        assert!(e.contains("noprefetch") && e.contains("line 2"), "{e}");
        let c = StoreConfig::parse("metrics_address = \"127.0.0.1:9\"\nno_prometheus = true\n")
            .unwrap();
        assert_eq!(c.metrics_address, None);
    }
}
