//! The daemon's TOML configuration (shared by the FUSE manager): the reference's key
//! names, ignored and unknown keys warned about ([`crate::keys`]), and the digest that
//! tells one version of the file from another.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::Deserialize;

/// The metrics keys, read on their own so type errors carry their position.
#[derive(Deserialize)]
struct MetricsKeys {
    metrics_address: Option<String>,
    #[serde(default)]
    no_prometheus: bool,
}

/// `[snapshotter]`, read on its own so type errors carry their position.
#[derive(Deserialize)]
struct SnapshotterKeys {
    snapshotter: Option<SnapshotterSection>,
}

#[derive(Deserialize)]
struct SnapshotterSection {
    allow_invalid_mounts_on_restart: Option<bool>,
}

/// Parsed daemon configuration.
#[derive(Debug)]
pub struct DaemonConfig {
    pub fs: fs::Config,
    pub registry: registry::RegistryConfig,
    /// Not a reference key: serve every layer by download (no FUSE).
    pub disable_remote_snapshots: bool,
    /// Not a reference key (default true): a layer that cannot be mounted lazily is
    /// downloaded and unpacked by the daemon, in parallel with the image's other
    /// layers, instead of by containerd's own pull.
    pub full_pull: bool,
    /// `[fuse_manager]`: where layer mounts live.
    pub fuse_manager: FuseManagerConfig,
    /// `[snapshotter] allow_invalid_mounts_on_restart`: start even when some remote
    /// snapshots cannot be mounted again (off: the daemon refuses to start).
    pub allow_invalid_mounts_on_restart: bool,
    /// `host:port` for the Prometheus endpoint (`GET /metrics`).
    pub metrics_address: Option<String>,
    /// Turns the Prometheus endpoint off even with `metrics_address` set.
    pub no_prometheus: bool,
    /// `[kubeconfig_keychain]` (the reference's keys): registry credentials from the
    /// cluster's `kubernetes.io/dockerconfigjson` secrets.
    pub kubeconfig_keychain: registry::KubeconfigKeychainConfig,
    /// `[credential_provider_keychain]` (ours): kubelet's credential provider plugins.
    pub credential_provider_keychain: registry::CredentialProviderKeychainConfig,
    /// `[cri_keychain]` (the reference's keys): the daemon proxies the CRI image
    /// service and keeps each `PullImage`'s credentials.
    pub cri_keychain: registry::CriKeychainConfig,
    /// Ours: learned prefetch (`learn_window_sec`, `learned_prefetch`,
    /// `learned_prefetch_max_mib`, `learned_prefetch_from_registry`).
    pub learned: crate::learned::LearnedConfig,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            fs: Default::default(),
            registry: Default::default(),
            disable_remote_snapshots: false,
            full_pull: true,
            fuse_manager: Default::default(),
            allow_invalid_mounts_on_restart: false,
            metrics_address: None,
            no_prometheus: false,
            kubeconfig_keychain: Default::default(),
            credential_provider_keychain: Default::default(),
            cri_keychain: Default::default(),
            learned: Default::default(),
        }
    }
}

impl DaemonConfig {
    /// Reads `path`; a missing file is fine only when `explicit` is false.
    pub fn load(path: &Path, explicit: bool) -> Result<DaemonConfig> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                tracing::info!(path = %path.display(), "no config file; using defaults");
                return Ok(DaemonConfig::default());
            }
            Err(e) => return Err(e).with_context(|| format!("reading config {}", path.display())),
        };
        Self::parse(&text).with_context(|| format!("config {}", path.display()))
    }

    /// Parses the TOML text; errors name the key and line.
    pub fn parse(text: &str) -> Result<DaemonConfig> {
        let mut table: toml::Table = toml::from_str(text)?;
        // Ignored and unknown keys leave the table (with a warning each), so the parts
        // read from it below never fail on a key the reference would start with.
        crate::keys::screen(&mut table);
        // Each part deserializes from the same text so its errors carry positions; the
        // typed parts skip keys they do not know.
        let fs: fs::Config = toml::from_str(text)?;
        let mut reg = toml::Table::new();
        for k in ["resolver", "blob"] {
            if let Some(v) = table.get(k) {
                reg.insert(k.to_string(), v.clone());
            }
        }
        let mut registry: registry::RegistryConfig = reg.try_into()?;
        // `[resolver] config_path`: containerd's hosts directory, under explicit hosts.
        for warning in registry.resolver.apply_hosts_dir()? {
            tracing::warn!(%warning, "hosts directory");
        }
        let section = |name: &str| -> Result<toml::Value> {
            Ok(table
                .get(name)
                .cloned()
                .unwrap_or_else(|| toml::Value::Table(toml::Table::new())))
        };
        let kubeconfig_keychain: registry::KubeconfigKeychainConfig =
            section("kubeconfig_keychain")?
                .try_into()
                .context("[kubeconfig_keychain]")?;
        let credential_provider_keychain: registry::CredentialProviderKeychainConfig =
            section("credential_provider_keychain")?
                .try_into()
                .context("[credential_provider_keychain]")?;
        let cri_keychain: registry::CriKeychainConfig = section("cri_keychain")?
            .try_into()
            .context("[cri_keychain]")?;
        let disable_remote_snapshots = match table.get("disable_remote_snapshots") {
            None => false,
            Some(toml::Value::Boolean(b)) => *b,
            Some(_) => anyhow::bail!("disable_remote_snapshots: expected a boolean"),
        };
        let full_pull = match table.get("full_pull") {
            None => true,
            Some(toml::Value::Boolean(b)) => *b,
            Some(_) => anyhow::bail!("full_pull: expected a boolean"),
        };
        let metrics: MetricsKeys = toml::from_str(text)?;
        let snap: SnapshotterKeys = toml::from_str(text)?;
        let learned = crate::learned::LearnedConfig::parse(text)?;
        Ok(DaemonConfig {
            fs,
            registry,
            disable_remote_snapshots,
            full_pull,
            fuse_manager: FuseManagerConfig::parse(text)?,
            allow_invalid_mounts_on_restart: snap
                .snapshotter
                .and_then(|s| s.allow_invalid_mounts_on_restart)
                .unwrap_or(false),
            metrics_address: metrics.metrics_address.filter(|a| !a.is_empty()),
            no_prometheus: metrics.no_prometheus,
            kubeconfig_keychain,
            credential_provider_keychain,
            cri_keychain,
            learned,
        })
    }

    /// The credentials captured from CRI `PullImage` calls, kept under `root`, when
    /// `[cri_keychain]` is enabled. The daemon records into it; the process that
    /// mounts layers (the daemon or the FUSE manager) reads it through [`keychain`].
    ///
    /// [`keychain`]: DaemonConfig::keychain
    pub fn cri_credentials(&self, root: &Path) -> Option<Arc<registry::CriKeychain>> {
        self.cri_keychain.open(root).map(Arc::new)
    }

    /// Where registry credentials come from, first answer wins: the credentials
    /// kubelet pulled the image with (`cri`, per repository), docker's `config.json`
    /// (and its helpers), then the cluster's secrets, then kubelet's credential
    /// provider plugins, as configured. When a registry refuses the first answer, the
    /// client goes on with the next source's. Call inside the tokio runtime (the
    /// kubeconfig keychain watches the API server from a task).
    pub fn keychain(
        &self,
        cri: Option<Arc<registry::CriKeychain>>,
    ) -> Result<Arc<dyn registry::Keychain>> {
        let mut chain = registry::ChainKeychain::new();
        if let Some(k) = cri {
            tracing::info!(
                entries = k.len(),
                "registry credentials from CRI PullImage calls (cri keychain)"
            );
            chain = chain.with(k);
        }
        let mut chain = chain.with(Arc::new(registry::DockerConfigKeychain::from_env()));
        if let Some(k) = self.kubeconfig_keychain.start() {
            tracing::info!("registry credentials from Kubernetes secrets (kubeconfig keychain)");
            chain = chain.with(Arc::new(k));
        }
        if let Some(k) = self
            .credential_provider_keychain
            .build()
            .context("[credential_provider_keychain]")?
        {
            tracing::info!("registry credentials from kubelet credential provider plugins");
            chain = chain.with(Arc::new(k));
        }
        Ok(Arc::new(chain))
    }
}

/// `[fuse_manager]`: the reference's keys. Enabled by default here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuseManagerConfig {
    pub enable: bool,
    /// Socket; default `fuse-manager.sock` next to the daemon's socket.
    pub address: Option<PathBuf>,
    /// Executable; default `stargz-fuse-manager` next to the daemon, else on `PATH`.
    pub path: Option<PathBuf>,
}

impl Default for FuseManagerConfig {
    fn default() -> Self {
        FuseManagerConfig {
            enable: true,
            address: None,
            path: None,
        }
    }
}

#[derive(Deserialize)]
struct RawSection {
    enable: Option<bool>,
    address: Option<PathBuf>,
    path: Option<PathBuf>,
}

#[derive(Deserialize)]
struct RawTop {
    fuse_manager: Option<RawSection>,
}

impl FuseManagerConfig {
    /// The `[fuse_manager]` section of the config text; errors carry positions.
    pub fn parse(text: &str) -> Result<FuseManagerConfig> {
        let top: RawTop = toml::from_str(text)?;
        let Some(raw) = top.fuse_manager else {
            return Ok(FuseManagerConfig::default());
        };
        let empty = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
        Ok(FuseManagerConfig {
            enable: raw.enable.unwrap_or(true),
            address: empty(raw.address),
            path: empty(raw.path),
        })
    }
}

/// Digest of the config file's text (a missing file counts as empty), so the daemon
/// can tell when a running manager serves with another configuration.
pub fn config_digest(path: &Path) -> String {
    use sha2::Digest;
    let text = std::fs::read(path).unwrap_or_default();
    format!("{:x}", sha2::Sha256::digest(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keychain_sections_and_hosts_directory() {
        let hosts = tempfile::tempdir().unwrap();
        let dir = hosts.path().join("registry.example");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("hosts.toml"),
            "server = \"https://registry.example\"\n[host.\"http://127.0.0.1:5999\"]\ncapabilities = [\"pull\", \"resolve\"]\n",
        )
        .unwrap();
        let c = DaemonConfig::parse(&format!(
            "[kubeconfig_keychain]\nenable_keychain = true\nkubeconfig_path = \"/etc/kubernetes/snapshotter/config.conf\"\n\
             [credential_provider_keychain]\nenable_keychain = false\nconfig_path = \"/etc/kubernetes/cp.yaml\"\n\
             [cri_keychain]\nenable_keychain = true\nimage_service_path = \"/run/k3s/containerd/containerd.sock\"\n\
             [resolver]\nconfig_path = \"{}\"\n",
            hosts.path().display()
        ))
        .unwrap();
        assert!(c.kubeconfig_keychain.enable_keychain);
        assert_eq!(
            c.kubeconfig_keychain.kubeconfig_path.as_deref(),
            Some(Path::new("/etc/kubernetes/snapshotter/config.conf"))
        );
        assert!(!c.credential_provider_keychain.enable_keychain);
        assert!(c.cri_keychain.enable_keychain);
        assert_eq!(
            c.cri_keychain.image_service_path(),
            Path::new("/run/k3s/containerd/containerd.sock")
        );
        assert_eq!(c.cri_keychain.listen_path, None);
        let root = tempfile::tempdir().unwrap();
        let store = c.cri_credentials(root.path()).expect("enabled");
        assert_eq!(
            store.path(),
            Some(root.path().join(registry::CRI_CREDENTIALS_FILE).as_path())
        );
        let host = c
            .registry
            .resolver
            .host_config("registry.example")
            .expect("hosts.toml entry");
        assert!(
            format!("{host:?}").contains("127.0.0.1:5999"),
            "mirror from hosts.toml: {host:?}"
        );
        // A typo inside a keychain section is an error naming the section.
        let err =
            DaemonConfig::parse("[kubeconfig_keychain]\nenable_keychian = true\n").unwrap_err();
        assert!(
            format!("{err:#}").contains("kubeconfig_keychain"),
            "{err:#}"
        );
    }

    #[test]
    fn fuse_manager_section_keys() {
        assert_eq!(
            FuseManagerConfig::parse("noprefetch = true\n").unwrap(),
            FuseManagerConfig::default()
        );
        let c = FuseManagerConfig::parse(
            "[fuse_manager]\nenable = false\naddress = \"/run/x.sock\"\npath = \"\"\n",
        )
        .unwrap();
        assert!(!c.enable);
        assert_eq!(c.address.as_deref(), Some(Path::new("/run/x.sock")));
        assert_eq!(c.path, None);
        let e = format!(
            "{:#}",
            FuseManagerConfig::parse("[fuse_manager]\nenable = 1\n").unwrap_err()
        );
        assert!(e.contains("enable") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn reference_keys_and_errors() {
        let c = DaemonConfig::parse(
            "noprefetch = true\nmax_concurrency = 3\nunknown_thing = 1\n[fuse]\nattr_timeout = 5\n[resolver.host.\"127.0.0.1:5000\".mirrors]\n",
        );
        // Mirrors must be a list in the reference; a table is a user error.
        assert!(c.is_err());
        let c = DaemonConfig::parse(
            "noprefetch = true\nmax_concurrency = 3\nunknown_thing = 1\n[fuse]\nattr_timeout = 5\n",
        )
        .unwrap();
        assert!(c.fs.noprefetch);
        assert_eq!(c.fs.max_concurrency, 3);
        assert_eq!(c.fs.fuse.attr_timeout, 5);
        let e = format!("{:#}", DaemonConfig::parse("noprefetch = 1\n").unwrap_err());
        assert!(e.contains("noprefetch") && e.contains("line 1"), "{e}");
        assert!(!c.allow_invalid_mounts_on_restart);
        let c =
            DaemonConfig::parse("[snapshotter]\nallow_invalid_mounts_on_restart = true\n").unwrap();
        assert!(c.allow_invalid_mounts_on_restart);
        let e = format!(
            "{:#}",
            DaemonConfig::parse("[snapshotter]\nallow_invalid_mounts_on_restart = 1\n")
                .unwrap_err()
        );
        assert!(
            e.contains("allow_invalid_mounts_on_restart") && e.contains("line 2"),
            "{e}"
        );
        let c = DaemonConfig::parse("metrics_address = \"127.0.0.1:8234\"\n").unwrap();
        assert_eq!(c.metrics_address.as_deref(), Some("127.0.0.1:8234"));
        assert!(!c.no_prometheus);
        let e = format!(
            "{:#}",
            DaemonConfig::parse("debug = false\nmetrics_address = 8234\n").unwrap_err()
        );
        assert!(e.contains("metrics_address") && e.contains("line 2"), "{e}");
    }
}
