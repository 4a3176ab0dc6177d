//! Host and blob-fetching configuration, in the TOML shape of the reference
//! snapshotter (`[[resolver.host."HOST".mirrors]]`, `[blob]`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The key under which `_default/hosts.toml` is stored: it applies to every
/// registry without its own entry.
pub const DEFAULT_HOST_KEY: &str = "_default";

use serde::{Deserialize, Serialize};

/// Default per-request timeout for registry API calls, as in the reference resolver.
pub const DEFAULT_REQUEST_TIMEOUT_SEC: i64 = 30;

/// `[resolver]`: per-host mirrors and TLS settings.
///
/// ```toml
/// [resolver]
/// request_timeout_sec = 60
/// [[resolver.host."docker.io".mirrors]]
/// host = "mirror.example.com:5000"
/// insecure = false
/// request_timeout_sec = 10
/// header = { "x-team" = ["storage"] }
/// ```
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ResolverConfig {
    /// Keyed by the registry host of the reference (`docker.io`, `ghcr.io`, `127.0.0.1:5000`);
    /// `_default` applies to registries without an entry of their own.
    pub host: BTreeMap<String, HostConfig>,
    /// CA bundle (PEM) trusted for every host, on top of the system roots.
    pub ca_file: Option<PathBuf>,
    /// containerd's hosts directory (`<dir>/<host>/hosts.toml`), read by
    /// [`ResolverConfig::apply_hosts_dir`].
    pub config_path: Option<PathBuf>,
    /// Timeout of each request in seconds for endpoints that set none of their own;
    /// only a positive value counts (else 30 s), as in the reference.
    pub request_timeout_sec: i64,
    /// TLS settings that only command lines give (`ctr`'s `--skip-verify`,
    /// `--tlscert`/`--tlskey`); not part of the configuration file.
    #[serde(skip)]
    pub tls: ClientTls,
}

/// TLS settings for every host, from command-line flags.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientTls {
    /// Accept any server certificate (`-k`/`--skip-verify`). Never the default.
    pub skip_verify: bool,
    /// Client certificate and key (PEM files) presented to servers that ask.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl ResolverConfig {
    /// Merges the hosts directory named by `config_path` (if any) into
    /// `host`; explicit entries win. Returns the warnings (also logged).
    pub fn apply_hosts_dir(&mut self) -> crate::Result<Vec<String>> {
        match self.config_path.clone() {
            Some(dir) if !dir.as_os_str().is_empty() => self.merge_hosts_dir(&dir),
            _ => Ok(Vec::new()),
        }
    }

    /// The settings for a registry: its own entry, else the `_default` entry
    /// (containerd's `_default/hosts.toml`), else none.
    pub fn host_config(&self, registry: &str) -> Option<&HostConfig> {
        self.host
            .get(registry)
            .or_else(|| self.host.get(DEFAULT_HOST_KEY))
    }
}

/// Settings for one registry host.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// Tried in order before the host itself.
    pub mirrors: Vec<MirrorConfig>,
    /// CA bundle (PEM) trusted for this host (and its mirrors), on top of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Settings for the host itself (when it is finally tried): `insecure`,
    /// `request_timeout_sec`, `header`. `host` is ignored there.
    #[serde(rename = "self")]
    pub self_: Option<MirrorConfig>,
}

/// One endpoint to try.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorConfig {
    /// `host[:port]` of the mirror.
    pub host: String,
    /// Plain HTTP instead of HTTPS. Unset: HTTPS, except loopback hosts
    /// (`localhost`, `127.0.0.1`, `::1`, any port), which default to HTTP.
    pub insecure: Option<bool>,
    /// Timeout of each request in seconds: 0 means the default (30 s), negative means none.
    pub request_timeout_sec: i64,
    /// Extra headers sent to this endpoint only (never to redirect targets). Each value
    /// is a string or a list of strings, as in the reference.
    #[serde(deserialize_with = "header_values")]
    pub header: BTreeMap<String, Vec<String>>,
    /// CA bundle (PEM) trusted for this endpoint, on top of the system roots.
    pub ca_file: Option<PathBuf>,
}

impl MirrorConfig {
    /// The effective request timeout, `None` when disabled.
    pub fn request_timeout(&self) -> Option<Duration> {
        self.request_timeout_with(0)
    }

    /// The effective request timeout when `[resolver] request_timeout_sec` is
    /// `global`: this endpoint's own value unless 0, else `global` if positive, else
    /// 30 s. `None` when disabled (negative).
    pub fn request_timeout_with(&self, global: i64) -> Option<Duration> {
        let secs = |n: i64| Some(Duration::from_secs(n.unsigned_abs()));
        match self.request_timeout_sec {
            0 if global > 0 => secs(global),
            0 => secs(DEFAULT_REQUEST_TIMEOUT_SEC),
            n if n < 0 => None,
            n => secs(n),
        }
    }
}

/// Header values as the reference takes them: `name = "v"` or `name = ["v1", "v2"]`.
fn header_values<'de, D>(d: D) -> Result<BTreeMap<String, Vec<String>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let raw = BTreeMap::<String, OneOrMany>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                OneOrMany::One(s) => vec![s],
                OneOrMany::Many(l) => l,
            };
            (k, v)
        })
        .collect())
}

/// `[kubeconfig_keychain]`, the reference snapshotter's keys.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KubeconfigKeychainConfig {
    pub enable_keychain: bool,
    /// Empty: `$KUBECONFIG`, else `~/.kube/config`.
    pub kubeconfig_path: Option<PathBuf>,
}

impl KubeconfigKeychainConfig {
    /// Starts the keychain (on the current tokio runtime) when enabled.
    pub fn start(&self) -> Option<crate::KubeconfigKeychain> {
        self.enable_keychain.then(|| {
            crate::KubeconfigKeychain::start(crate::KubeconfigKeychainOptions {
                kubeconfig_path: self.kubeconfig_path.clone(),
                ..Default::default()
            })
        })
    }
}

/// `[cri_keychain]`, the reference snapshotter's keys: the daemon serves the CRI
/// image service, forwards it to `image_service_path`, and keeps the credentials of
/// each `PullImage` for the layers it then mounts.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CriKeychainConfig {
    pub enable_keychain: bool,
    /// containerd's socket, whose CRI plugin the calls are forwarded to. Empty:
    /// `/run/containerd/containerd.sock`.
    pub image_service_path: Option<PathBuf>,
    /// A socket of its own for the image service. Empty (or the daemon's `--address`):
    /// the daemon's socket serves it beside the Snapshots API.
    pub listen_path: Option<PathBuf>,
    /// Ours: seconds a captured credential is used after the last `PullImage` that
    /// brought it; 0 means seven days.
    pub credential_ttl_sec: u64,
}

/// containerd's socket, where its CRI plugin serves.
pub const DEFAULT_IMAGE_SERVICE_PATH: &str = "/run/containerd/containerd.sock";
/// The file under the daemon's root where captured CRI credentials are kept.
pub const CRI_CREDENTIALS_FILE: &str = "cri-credentials.json";

impl CriKeychainConfig {
    /// The backend image service socket.
    pub fn image_service_path(&self) -> PathBuf {
        self.image_service_path
            .clone()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_IMAGE_SERVICE_PATH))
    }

    /// The credential store kept under the daemon's `root`, when enabled.
    pub fn open(&self, root: &std::path::Path) -> Option<crate::CriKeychain> {
        self.enable_keychain.then(|| {
            crate::CriKeychain::open(crate::CriKeychainOptions {
                path: Some(root.join(CRI_CREDENTIALS_FILE)),
                ttl: match self.credential_ttl_sec {
                    0 => crate::DEFAULT_CRI_CREDENTIAL_TTL,
                    s => Duration::from_secs(s),
                },
                ..Default::default()
            })
        })
    }
}

/// `[credential_provider_keychain]`: kubelet credential provider plugins.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CredentialProviderKeychainConfig {
    pub enable_keychain: bool,
    /// kubelet's `--image-credential-provider-config`.
    pub config_path: PathBuf,
    /// kubelet's `--image-credential-provider-bin-dir`.
    pub bin_dir: PathBuf,
    /// Plugin timeout in seconds; 0 means 60.
    pub exec_timeout_sec: u64,
}

impl CredentialProviderKeychainConfig {
    /// Loads the provider config when enabled; a bad config is an error.
    pub fn build(&self) -> crate::Result<Option<crate::CredentialProviderKeychain>> {
        if !self.enable_keychain {
            return Ok(None);
        }
        let mut o = crate::CredentialProviderOptions::new(&self.config_path, &self.bin_dir);
        if self.exec_timeout_sec > 0 {
            o.exec_timeout = Duration::from_secs(self.exec_timeout_sec);
        }
        crate::CredentialProviderKeychain::new(o).map(Some)
    }
}

/// `[blob]`: knobs for blob readers. Zero values mean "use the default",
/// matching the reference snapshotter.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct BlobConfig {
    /// Upper bound on the time one blob fetch (including its retries) may take.
    pub fetching_timeout_sec: u64,
    /// How many times a failed request is retried.
    pub max_retries: u32,
    /// Smallest backoff between retries.
    pub min_wait_msec: u64,
    /// Largest backoff between retries.
    pub max_wait_msec: u64,
    /// Ranges closer than this many bytes are fetched as one.
    pub coalesce_gap_bytes: u64,
    /// Most ranges put in one multi-range request.
    pub max_ranges_per_request: usize,
    /// Large multi-range reads (one request per MiB) are split over up to
    /// this many concurrent requests, so TCP slow start runs in parallel.
    /// Default 1: on the benchmark link the extra connections' handshakes
    /// cost more than the parallel slow start saved.
    pub multi_range_parallelism: usize,
    /// Never send multi-range requests.
    pub force_single_range_mode: bool,
    /// Most concurrent requests per host.
    pub max_concurrent_requests_per_host: usize,
    /// How long a redirect target URL is reused before asking the registry again.
    pub redirect_cache_sec: u64,
    /// Connect timeout in seconds.
    pub connect_timeout_sec: u64,
    /// A body read that makes no progress for this long fails (seconds).
    pub read_idle_timeout_sec: u64,
}

impl Default for BlobConfig {
    fn default() -> Self {
        BlobConfig {
            fetching_timeout_sec: 300,
            max_retries: 5,
            min_wait_msec: 30,
            max_wait_msec: 300_000,
            coalesce_gap_bytes: 32 * 1024,
            max_ranges_per_request: 64,
            multi_range_parallelism: 1,
            force_single_range_mode: false,
            max_concurrent_requests_per_host: 16,
            redirect_cache_sec: 600,
            connect_timeout_sec: 10,
            read_idle_timeout_sec: 30,
        }
    }
}

impl BlobConfig {
    /// Replaces zero values with defaults, like the reference does.
    pub fn normalized(&self) -> BlobConfig {
        let d = BlobConfig::default();
        let pick = |v: u64, dv: u64| if v == 0 { dv } else { v };
        BlobConfig {
            fetching_timeout_sec: pick(self.fetching_timeout_sec, d.fetching_timeout_sec),
            max_retries: if self.max_retries == 0 {
                d.max_retries
            } else {
                self.max_retries
            },
            min_wait_msec: pick(self.min_wait_msec, d.min_wait_msec),
            max_wait_msec: pick(self.max_wait_msec, d.max_wait_msec)
                .max(pick(self.min_wait_msec, d.min_wait_msec)),
            coalesce_gap_bytes: self.coalesce_gap_bytes,
            max_ranges_per_request: if self.max_ranges_per_request == 0 {
                d.max_ranges_per_request
            } else {
                self.max_ranges_per_request
            },
            multi_range_parallelism: self.multi_range_parallelism.max(1),
            force_single_range_mode: self.force_single_range_mode,
            max_concurrent_requests_per_host: if self.max_concurrent_requests_per_host == 0 {
                d.max_concurrent_requests_per_host
            } else {
                self.max_concurrent_requests_per_host
            },
            redirect_cache_sec: pick(self.redirect_cache_sec, d.redirect_cache_sec),
            connect_timeout_sec: pick(self.connect_timeout_sec, d.connect_timeout_sec),
            read_idle_timeout_sec: pick(self.read_idle_timeout_sec, d.read_idle_timeout_sec),
        }
    }
}

/// Everything a [`crate::Client`] needs besides credentials; embeddable in a
/// daemon config as `[resolver]` and `[blob]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RegistryConfig {
    pub resolver: ResolverConfig,
    pub blob: BlobConfig,
}

impl RegistryConfig {
    /// Parses the TOML form.
    pub fn from_toml(s: &str) -> crate::Result<Self> {
        toml::from_str(s).map_err(|e| crate::Error::Config(e.to_string()))
    }
}

/// Whether a host defaults to plain HTTP: loopback names and addresses, any port.
pub fn is_local_host(host: &str) -> bool {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    let bare = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map(|(h, _)| h).unwrap_or(rest)
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    bare == "localhost"
        || bare == "::1"
        || bare
            .parse::<std::net::Ipv4Addr>()
            .map(|a| a.is_loopback())
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reference_shape() {
        let cfg = RegistryConfig::from_toml(
            r#"
[[resolver.host."docker.io".mirrors]]
host = "mirror.example.com:5000"
insecure = true
request_timeout_sec = 5
header = { "x-a" = ["1", "2"] }

[[resolver.host."docker.io".mirrors]]
host = "second.example.com"

[blob]
max_retries = 3
"#,
        )
        .expect("parse");
        let h = &cfg.resolver.host["docker.io"];
        assert_eq!(h.mirrors.len(), 2);
        assert_eq!(h.mirrors[0].insecure, Some(true));
        assert_eq!(h.mirrors[0].request_timeout(), Some(Duration::from_secs(5)));
        assert_eq!(
            h.mirrors[1].request_timeout(),
            Some(Duration::from_secs(30))
        );
        assert_eq!(h.mirrors[0].header["x-a"], vec!["1", "2"]);
        assert_eq!(h.mirrors[1].header, BTreeMap::new());
        assert_eq!(cfg.blob.max_retries, 3);
        assert_eq!(cfg.blob.fetching_timeout_sec, 300);
        assert!(RegistryConfig::from_toml("[resolver]\nbogus = 1").is_err());
        let cfg =
            RegistryConfig::from_toml("[resolver]\nconfig_path = \"/etc/containerd/certs.d\"\n")
                .expect("config_path");
        assert_eq!(
            cfg.resolver.config_path.as_deref(),
            Some(std::path::Path::new("/etc/containerd/certs.d"))
        );
        let k: KubeconfigKeychainConfig =
            toml::from_str("enable_keychain = true\nkubeconfig_path = \"/k\"").expect("kube");
        assert!(k.enable_keychain);
        let c: CriKeychainConfig = toml::from_str(
            "enable_keychain = true\nimage_service_path = \"/run/containerd/containerd.sock\"\nlisten_path = \"/run/cri.sock\"",
        )
        .expect("cri");
        assert!(c.enable_keychain);
        assert_eq!(
            c.listen_path.as_deref(),
            Some(std::path::Path::new("/run/cri.sock"))
        );
        assert_eq!(
            CriKeychainConfig::default().image_service_path(),
            PathBuf::from(DEFAULT_IMAGE_SERVICE_PATH)
        );
        assert!(toml::from_str::<CriKeychainConfig>("enable_keychian = true").is_err());
        let c: CredentialProviderKeychainConfig =
            toml::from_str("enable_keychain = false\nconfig_path = \"/c\"\nbin_dir = \"/b\"")
                .expect("credprovider");
        assert!(c.build().expect("disabled").is_none());
    }

    #[test]
    fn header_forms_and_global_timeout() {
        let cfg = RegistryConfig::from_toml(
            r#"
[resolver]
request_timeout_sec = 300
[[resolver.host."registry2:5000".mirrors]]
host = "registry2:5000"
  [resolver.host."registry2:5000".mirrors.header]
  x-custom-1 = "value1"
  x-custom-2 = ["value3", "value4"]
[[resolver.host."registry2:5000".mirrors]]
host = "other:5000"
request_timeout_sec = 7
[[resolver.host."registry2:5000".mirrors]]
host = "third:5000"
request_timeout_sec = -1
"#,
        )
        .expect("parse");
        let m = &cfg.resolver.host["registry2:5000"].mirrors;
        assert_eq!(m[0].header["x-custom-1"], ["value1"]);
        assert_eq!(m[0].header["x-custom-2"], ["value3", "value4"]);
        let global = cfg.resolver.request_timeout_sec;
        assert_eq!(
            m[0].request_timeout_with(global),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            m[1].request_timeout_with(global),
            Some(Duration::from_secs(7))
        );
        assert_eq!(m[2].request_timeout_with(global), None);
        // A global value that is not positive means the default, as in the reference.
        assert_eq!(m[0].request_timeout_with(-5), Some(Duration::from_secs(30)));
        let e = RegistryConfig::from_toml(
            "[[resolver.host.\"h\".mirrors]]\nhost = \"h\"\nheader = { x = 1 }\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("header"), "{e}");
    }

    #[test]
    fn local_hosts() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.0.0.1:1",
            "[::1]:5000",
            "::1",
        ] {
            assert!(is_local_host(h), "{h}");
        }
        for h in ["docker.io", "10.0.0.1:5000", "localhost.example.com"] {
            assert!(!is_local_host(h), "{h}");
        }
    }
}
