//! The kubelet credential provider keychain: reads kubelet's
//! `CredentialProviderConfig`, runs the matching exec plugin with a
//! `CredentialProviderRequest` on stdin, and caches the
//! `CredentialProviderResponse` per its cache key type and duration.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, Result};
use crate::keychain::{Credential, Keychain, KeychainFuture};

/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest plugin stdout accepted.
const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Plugin stderr kept for error messages.
const MAX_STDERR_BYTES: usize = 4096;
/// Most cache entries kept per provider before expired ones are swept.
const MAX_CACHE_ENTRIES: usize = 4096;
/// Longest cache duration honoured, whatever a plugin or config says.
const MAX_CACHE_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

const API_VERSIONS: [&str; 3] = [
    "credentialprovider.kubelet.k8s.io/v1",
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
];
const CONFIG_API_VERSIONS: [&str; 3] = [
    "kubelet.config.k8s.io/v1",
    "kubelet.config.k8s.io/v1beta1",
    "kubelet.config.k8s.io/v1alpha1",
];

/// kubelet's `CredentialProviderConfig`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialProviderConfig {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub providers: Vec<CredentialProvider>,
}

/// One `providers[]` entry.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialProvider {
    /// The plugin executable's name in the plugin directory.
    pub name: String,
    /// Image globs (`*.dkr.ecr.*.amazonaws.com`, `registry.io:5000/team`).
    #[serde(default)]
    pub match_images: Vec<String>,
    /// Go duration (`12h`, `1h30m`, `90s`); used when a response has none.
    #[serde(default)]
    pub default_cache_duration: Option<String>,
    /// `credentialprovider.kubelet.k8s.io/{v1,v1beta1,v1alpha1}`.
    pub api_version: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
}

impl fmt::Debug for CredentialProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // env values may hold secrets.
        f.debug_struct("CredentialProvider")
            .field("name", &self.name)
            .field("match_images", &self.match_images)
            .field("default_cache_duration", &self.default_cache_duration)
            .field("api_version", &self.api_version)
            .field("args", &self.args)
            .field(
                "env",
                &self.env.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// An environment variable given to a plugin.
#[derive(Clone, Deserialize, PartialEq)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

impl CredentialProviderConfig {
    /// Reads and validates a config file (YAML or JSON), as kubelet does.
    pub fn from_file(path: &Path) -> Result<Self> {
        let io = |e| Error::Io {
            path: path.display().to_string(),
            source: e,
        };
        if std::fs::metadata(path).map_err(io)?.len() > MAX_CONFIG_BYTES {
            return Err(Error::Config(format!("{} is too large", path.display())));
        }
        let data = std::fs::read(path).map_err(io)?;
        Self::parse(&data).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Parses and validates config content.
    pub fn parse(data: &[u8]) -> std::result::Result<Self, String> {
        let cfg: CredentialProviderConfig = serde_yaml::from_slice(data)
            .map_err(|e| format!("not a CredentialProviderConfig: {e}"))?;
        if !CONFIG_API_VERSIONS.contains(&cfg.api_version.as_str()) {
            return Err(format!("unsupported apiVersion {:?}", cfg.api_version));
        }
        if cfg.kind != "CredentialProviderConfig" {
            return Err(format!(
                "kind must be CredentialProviderConfig, not {:?}",
                cfg.kind
            ));
        }
        if cfg.providers.is_empty() {
            return Err("at least one provider is required".into());
        }
        let mut seen = std::collections::HashSet::new();
        for p in &cfg.providers {
            if p.name.is_empty()
                || p.name == "."
                || p.name == ".."
                || p.name.contains('/')
                || p.name.contains('\\')
            {
                return Err(format!("invalid provider name {:?}", p.name));
            }
            if !seen.insert(p.name.clone()) {
                return Err(format!("duplicate provider name {:?}", p.name));
            }
            if p.match_images.is_empty() {
                return Err(format!("provider {}: matchImages is required", p.name));
            }
            for m in &p.match_images {
                if parse_image_url(m).is_none() {
                    return Err(format!(
                        "provider {}: invalid matchImages entry {m:?}",
                        p.name
                    ));
                }
            }
            match &p.default_cache_duration {
                None => {
                    return Err(format!(
                        "provider {}: defaultCacheDuration is required",
                        p.name
                    ))
                }
                Some(d) => {
                    parse_go_duration(d).ok_or_else(|| {
                        format!("provider {}: bad defaultCacheDuration {d:?}", p.name)
                    })?;
                }
            }
            if !API_VERSIONS.contains(&p.api_version.as_str()) {
                return Err(format!(
                    "provider {}: unsupported apiVersion {:?}",
                    p.name, p.api_version
                ));
            }
        }
        Ok(cfg)
    }
}

/// Parses a Go duration string (`1h30m`, `90s`, `1.5h`, `300ms`, `0`).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() || s.starts_with('-') {
        return None;
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * secs;
    }
    (total.is_finite() && total < 1e12).then(|| Duration::from_secs_f64(total))
}

/// Scheme, host parts, port and path of an image or glob, kubelet style
/// (`https://` assumed).
struct ImageUrl {
    scheme: String,
    host: String,
    port: String,
    path: String,
}

fn parse_image_url(s: &str) -> Option<ImageUrl> {
    let (scheme, rest) = match s.split_once("://") {
        Some((sc, r)) => (sc.to_ascii_lowercase(), r),
        None => ("https".to_string(), s),
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if hostport.is_empty() {
        return None;
    }
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => (h, p),
        _ => (hostport, ""),
    };
    Some(ImageUrl {
        scheme,
        host: host.to_ascii_lowercase(),
        port: port.to_string(),
        path: path.to_string(),
    })
}

/// kubelet's glob matching of `matchImages` / response `auth` keys against
/// an image: same number of dot-separated host parts each matching as a
/// glob, equal ports, and the glob's path a prefix of the image's path.
pub fn image_matches(glob: &str, image: &str) -> bool {
    let (Some(g), Some(t)) = (parse_image_url(glob), parse_image_url(image)) else {
        return false;
    };
    if g.scheme != t.scheme || g.port != t.port {
        return false;
    }
    let gp: Vec<&str> = g.host.split('.').collect();
    let tp: Vec<&str> = t.host.split('.').collect();
    if gp.len() != tp.len() || !gp.iter().zip(&tp).all(|(g, t)| glob_part(g, t)) {
        return false;
    }
    t.path.starts_with(&g.path)
}

/// Shell-style glob of one host part: `*`, `?`, `[...]` classes.
fn glob_part(pat: &str, s: &str) -> bool {
    let p: Vec<char> = pat.chars().collect();
    let t: Vec<char> = s.chars().collect();
    // Iterative matcher with backtracking on the last '*': linear in practice.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ti));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                '[' => {
                    if let Some((ok, next)) = class(&p, pi, t[ti]) {
                        if ok {
                            pi = next;
                            ti += 1;
                            continue;
                        }
                    }
                }
                c if c == t[ti] => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Matches `c` against the class starting at `p[i] == '['`: (matched, index after `]`).
fn class(p: &[char], i: usize, c: char) -> Option<(bool, usize)> {
    let mut j = i + 1;
    let negate = p.get(j) == Some(&'^') || p.get(j) == Some(&'!');
    if negate {
        j += 1;
    }
    let mut hit = false;
    let mut first = true;
    while j < p.len() && (p[j] != ']' || first) {
        first = false;
        if j + 2 < p.len() && p[j + 1] == '-' && p[j + 2] != ']' {
            if p[j] <= c && c <= p[j + 2] {
                hit = true;
            }
            j += 3;
        } else {
            if p[j] == c {
                hit = true;
            }
            j += 1;
        }
    }
    (j < p.len()).then_some((hit != negate, j + 1))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CredentialProviderRequest<'a> {
    api_version: &'a str,
    kind: &'static str,
    image: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CredentialProviderResponse {
    api_version: String,
    kind: String,
    cache_key_type: String,
    #[serde(default)]
    cache_duration: Option<String>,
    #[serde(default)]
    auth: BTreeMap<String, AuthConfig>,
}

#[derive(Deserialize)]
struct AuthConfig {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

/// How a response is cached (`cacheKeyType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum CacheKeyType {
    Image,
    Registry,
    Global,
}

struct CacheEntry {
    until: Instant,
    /// (match key, credential), most specific first.
    auth: Vec<(String, Credential)>,
}

struct ProviderState {
    provider: CredentialProvider,
    default_ttl: Duration,
    cache: Mutex<HashMap<(CacheKeyType, String), CacheEntry>>,
    /// One plugin run at a time per provider; waiters then find the cache filled.
    exec_lock: tokio::sync::Mutex<()>,
    execs: std::sync::atomic::AtomicUsize,
}

/// Options of a [`CredentialProviderKeychain`].
#[derive(Clone, Debug)]
pub struct CredentialProviderOptions {
    /// kubelet's `--image-credential-provider-config` file.
    pub config_path: PathBuf,
    /// kubelet's `--image-credential-provider-bin-dir`.
    pub bin_dir: PathBuf,
    /// Longest a plugin may run before it is killed.
    pub exec_timeout: Duration,
}

impl CredentialProviderOptions {
    /// Options with kubelet's one-minute plugin timeout.
    pub fn new(config_path: impl Into<PathBuf>, bin_dir: impl Into<PathBuf>) -> Self {
        CredentialProviderOptions {
            config_path: config_path.into(),
            bin_dir: bin_dir.into(),
            exec_timeout: Duration::from_secs(60),
        }
    }
}

/// Credentials from kubelet credential provider exec plugins.
pub struct CredentialProviderKeychain {
    opts: CredentialProviderOptions,
    providers: Vec<Arc<ProviderState>>,
}

impl fmt::Debug for CredentialProviderKeychain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialProviderKeychain")
            .field("config_path", &self.opts.config_path)
            .field("bin_dir", &self.opts.bin_dir)
            .field(
                "providers",
                &self
                    .providers
                    .iter()
                    .map(|p| p.provider.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl CredentialProviderKeychain {
    /// Loads and validates the config; plugins must exist in `bin_dir`.
    pub fn new(opts: CredentialProviderOptions) -> Result<Self> {
        let cfg = CredentialProviderConfig::from_file(&opts.config_path)?;
        let mut providers = Vec::new();
        for p in cfg.providers {
            let bin = opts.bin_dir.join(&p.name);
            if !bin.is_file() {
                return Err(Error::Config(format!(
                    "credential provider plugin {} not found",
                    bin.display()
                )));
            }
            let default_ttl = p
                .default_cache_duration
                .as_deref()
                .and_then(parse_go_duration)
                .unwrap_or_default()
                .min(MAX_CACHE_DURATION);
            providers.push(Arc::new(ProviderState {
                provider: p,
                default_ttl,
                cache: Mutex::new(HashMap::new()),
                exec_lock: tokio::sync::Mutex::new(()),
                execs: std::sync::atomic::AtomicUsize::new(0),
            }));
        }
        Ok(CredentialProviderKeychain { opts, providers })
    }

    /// How many times the named provider's plugin has been run.
    pub fn plugin_runs(&self, name: &str) -> usize {
        self.providers
            .iter()
            .find(|p| p.provider.name == name)
            .map(|p| p.execs.load(std::sync::atomic::Ordering::SeqCst))
            .unwrap_or(0)
    }

    /// The credential for `image` (`host[:port]/repo[:tag]`, or a bare host):
    /// the first matching provider that yields one.
    pub async fn credential_for_image(&self, image: &str) -> Result<Option<Credential>> {
        for p in &self.providers {
            if !p
                .provider
                .match_images
                .iter()
                .any(|g| image_matches(g, image))
            {
                continue;
            }
            if let Some(c) = self.run_provider(p, image).await? {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }

    fn cached(p: &ProviderState, image: &str) -> Option<Option<Credential>> {
        let registry = image.split('/').next().unwrap_or(image).to_string();
        let now = Instant::now();
        let cache = p.cache.lock().unwrap_or_else(|e| e.into_inner());
        for key in [
            (CacheKeyType::Image, image.to_string()),
            (CacheKeyType::Registry, registry),
            (CacheKeyType::Global, String::new()),
        ] {
            if let Some(e) = cache.get(&key) {
                if e.until > now {
                    return Some(pick(&e.auth, image));
                }
            }
        }
        None
    }

    async fn run_provider(
        &self,
        p: &Arc<ProviderState>,
        image: &str,
    ) -> Result<Option<Credential>> {
        if let Some(hit) = Self::cached(p, image) {
            return Ok(hit);
        }
        let _guard = p.exec_lock.lock().await;
        if let Some(hit) = Self::cached(p, image) {
            return Ok(hit);
        }
        let resp = self.exec(p, image).await?;
        let key_type = match resp.cache_key_type.as_str() {
            "Image" => CacheKeyType::Image,
            "Registry" => CacheKeyType::Registry,
            "Global" => CacheKeyType::Global,
            other => {
                return Err(self.err(p, format!("unknown cacheKeyType {other:?}")));
            }
        };
        let ttl = match &resp.cache_duration {
            Some(d) => parse_go_duration(d)
                .ok_or_else(|| self.err(p, format!("bad cacheDuration {d:?}")))?,
            None => p.default_ttl,
        }
        .min(MAX_CACHE_DURATION);
        let mut auth: Vec<(String, Credential)> = resp
            .auth
            .into_iter()
            .map(|(k, a)| {
                (
                    k,
                    Credential::Basic {
                        username: a.username,
                        password: a.password,
                    },
                )
            })
            .collect();
        // Longer keys are more specific (path-scoped); they win over wildcards.
        auth.sort_by_key(|a| std::cmp::Reverse(a.0.len()));
        let result = pick(&auth, image);
        if !ttl.is_zero() {
            let key = match key_type {
                CacheKeyType::Image => image.to_string(),
                CacheKeyType::Registry => image.split('/').next().unwrap_or(image).to_string(),
                CacheKeyType::Global => String::new(),
            };
            let now = Instant::now();
            let mut cache = p.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= MAX_CACHE_ENTRIES {
                cache.retain(|_, e| e.until > now);
                if cache.len() >= MAX_CACHE_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(
                (key_type, key),
                CacheEntry {
                    until: now + ttl,
                    auth,
                },
            );
        }
        Ok(result)
    }

    fn err(&self, p: &ProviderState, detail: String) -> Error {
        Error::Credentials {
            source_name: format!("credential provider {}", p.provider.name),
            detail,
        }
    }

    async fn exec(&self, p: &ProviderState, image: &str) -> Result<CredentialProviderResponse> {
        let bin = self.opts.bin_dir.join(&p.provider.name);
        p.execs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tracing::debug!(provider = %p.provider.name, %image, "running credential provider plugin");
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.args(&p.provider.args)
            .envs(p.provider.env.iter().map(|e| (&e.name, &e.value)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| self.err(p, format!("cannot run {}: {e}", bin.display())))?;
        let req = serde_json::to_vec(&CredentialProviderRequest {
            api_version: &p.provider.api_version,
            kind: "CredentialProviderRequest",
            image,
        })
        .map_err(|e| self.err(p, e.to_string()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let run = async {
            if let Some(mut w) = stdin {
                // A plugin may exit without reading stdin; that is its business.
                let _ = w.write_all(&req).await;
                drop(w);
            }
            let out = async {
                let mut buf = Vec::new();
                if let Some(o) = stdout {
                    o.take(MAX_RESPONSE_BYTES as u64 + 1)
                        .read_to_end(&mut buf)
                        .await
                        .map(|_| buf)
                } else {
                    Ok(buf)
                }
            };
            let err = async {
                let mut buf = Vec::new();
                if let Some(e) = stderr {
                    let _ = e.take(MAX_STDERR_BYTES as u64).read_to_end(&mut buf).await;
                }
                buf
            };
            let (out, err) = tokio::join!(out, err);
            let status = child.wait().await;
            (out, err, status)
        };
        let (out, err, status) = match tokio::time::timeout(self.opts.exec_timeout, run).await {
            Ok(r) => r,
            Err(_) => {
                // kill_on_drop reaps it; say so explicitly for the log.
                tracing::warn!(provider = %p.provider.name, timeout = ?self.opts.exec_timeout, "credential provider plugin timed out; killed");
                return Err(self.err(
                    p,
                    format!("plugin timed out after {:?}", self.opts.exec_timeout),
                ));
            }
        };
        let out = out.map_err(|e| self.err(p, format!("reading plugin output: {e}")))?;
        let status = status.map_err(|e| self.err(p, format!("waiting for plugin: {e}")))?;
        if !status.success() {
            return Err(self.err(
                p,
                format!(
                    "plugin exited with {status}: {}",
                    String::from_utf8_lossy(&err).trim()
                ),
            ));
        }
        if out.len() > MAX_RESPONSE_BYTES {
            return Err(self.err(
                p,
                format!("plugin output larger than {MAX_RESPONSE_BYTES} bytes"),
            ));
        }
        // Never echo the output: it holds the secret.
        let resp: CredentialProviderResponse = serde_json::from_slice(&out).map_err(|e| {
            self.err(
                p,
                format!(
                    "plugin output is not a CredentialProviderResponse (at line {}, column {})",
                    e.line(),
                    e.column()
                ),
            )
        })?;
        if resp.kind != "CredentialProviderResponse" {
            return Err(self.err(p, format!("plugin answered kind {:?}", resp.kind)));
        }
        if resp.api_version != p.provider.api_version {
            return Err(self.err(
                p,
                format!(
                    "plugin answered apiVersion {:?}, configured {:?}",
                    resp.api_version, p.provider.api_version
                ),
            ));
        }
        Ok(resp)
    }
}

/// The credential whose key matches `image` (keys sorted most specific first).
fn pick(auth: &[(String, Credential)], image: &str) -> Option<Credential> {
    auth.iter()
        .find(|(k, _)| image_matches(k, image))
        .map(|(_, c)| c.clone())
}

impl Keychain for CredentialProviderKeychain {
    /// By host: the plugin is asked about the bare host, so only host-wide
    /// `matchImages` (no path part) can match.
    fn resolve<'a>(&'a self, host: &'a str) -> KeychainFuture<'a> {
        Box::pin(self.credential_for_image(host))
    }
    fn resolve_image<'a>(&'a self, host: &'a str, repository: &'a str) -> KeychainFuture<'a> {
        Box::pin(async move {
            let image = format!("{host}/{repository}");
            self.credential_for_image(&image).await
        })
    }
    fn describe(&self) -> String {
        format!(
            "kubelet credential providers {}",
            self.opts.config_path.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("12h"), Some(Duration::from_secs(43200)));
        assert_eq!(parse_go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("5m0s"), Some(Duration::from_secs(300)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        for bad in ["", "5", "-1s", "1x", "h", "1e400h"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn kubelet_matching_rules() {
        let ecr = "*.dkr.ecr.*.amazonaws.com";
        assert!(image_matches(
            ecr,
            "123456789.dkr.ecr.us-east-1.amazonaws.com/app:1"
        ));
        assert!(image_matches(
            ecr,
            "123456789.dkr.ecr.us-east-1.amazonaws.com"
        ));
        // '*' never spans a dot: the part count must match.
        assert!(!image_matches(
            ecr,
            "a.b.dkr.ecr.us-east-1.amazonaws.com/app"
        ));
        assert!(!image_matches("*.azurecr.io", "azurecr.io/x"));
        assert!(image_matches("*.azurecr.io", "team.azurecr.io/x"));
        // Ports must be equal, including absent.
        assert!(image_matches("registry.io:5000", "registry.io:5000/a"));
        assert!(!image_matches("registry.io:5000", "registry.io/a"));
        assert!(!image_matches("registry.io", "registry.io:5000/a"));
        // Path prefix.
        assert!(image_matches("registry.io/team", "registry.io/team/app:1"));
        assert!(!image_matches("registry.io/team", "registry.io/other/app"));
        assert!(image_matches(
            "reg-[0-9].example.com",
            "reg-7.example.com/x"
        ));
        assert!(!image_matches(
            "reg-[0-9].example.com",
            "reg-x.example.com/x"
        ));
        assert!(image_matches("r?g.io", "reg.io/x"));
    }

    #[test]
    fn config_validation() {
        let good = br#"
apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: ecr-credential-provider
    matchImages: ["*.dkr.ecr.*.amazonaws.com", "registry.io:5000/team"]
    defaultCacheDuration: "12h"
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args: [get-credentials]
    env:
      - name: AWS_PROFILE
        value: top-secret-profile
"#;
        let cfg = CredentialProviderConfig::parse(good).expect("good");
        assert_eq!(cfg.providers[0].args, ["get-credentials"]);
        assert!(!format!("{cfg:?}").contains("top-secret-profile"));
        let s = String::from_utf8_lossy(good);
        for (from, to) in [
            ("kubelet.config.k8s.io/v1", "kubelet.config.k8s.io/v9"),
            ("name: ecr-credential-provider", "name: ../evil"),
            ("    defaultCacheDuration: \"12h\"\n", ""),
            (
                "apiVersion: credentialprovider.kubelet.k8s.io/v1",
                "apiVersion: credentialprovider.kubelet.k8s.io/v7",
            ),
        ] {
            let bad = s.replace(from, to);
            assert!(
                CredentialProviderConfig::parse(bad.as_bytes()).is_err(),
                "{from} -> {to}"
            );
        }
    }
}
