//! The kubeconfig keychain: registry credentials from the cluster's
//! `kubernetes.io/dockerconfigjson` secrets, listed then watched through the
//! API server named by a kubeconfig file, served as a [`Keychain`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use bytes::BytesMut;
use serde::Deserialize;
use tokio::sync::watch;
use url::Url;

use crate::error::{Error, Result};
use crate::keychain::{Credential, Keychain, KeychainFuture};

/// Largest kubeconfig file read.
const MAX_KUBECONFIG_BYTES: u64 = 4 << 20;
/// Largest secret list body accepted.
const MAX_LIST_BYTES: usize = 64 << 20;
/// Largest single watch event line accepted.
const MAX_EVENT_BYTES: usize = 4 << 20;
/// Most registry hosts taken from one secret.
const MAX_HOSTS_PER_SECRET: usize = 256;
/// Most secrets kept.
const MAX_SECRETS: usize = 100_000;
const SECRET_TYPE: &str = "kubernetes.io/dockerconfigjson";
const SECRETS_PATH: &str = "/api/v1/secrets";

/// How the keychain finds and talks to the API server.
#[derive(Clone, Debug)]
pub struct KubeconfigKeychainOptions {
    /// The kubeconfig file. `None`: the first entry of `$KUBECONFIG`, else
    /// `~/.kube/config` (the reference snapshotter's order).
    pub kubeconfig_path: Option<PathBuf>,
    /// How often to look for a kubeconfig that does not exist yet.
    pub poll_interval: Duration,
    /// Timeout of a list request.
    pub request_timeout: Duration,
    /// `timeoutSeconds` asked of each watch; the server ends the stream then and
    /// the keychain resumes from the last version seen.
    pub watch_timeout: Duration,
    /// Wait before retrying after an API server error (doubles up to 8x).
    pub retry_wait: Duration,
}

impl Default for KubeconfigKeychainOptions {
    fn default() -> Self {
        KubeconfigKeychainOptions {
            kubeconfig_path: None,
            poll_interval: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            watch_timeout: Duration::from_secs(300),
            retry_wait: Duration::from_secs(1),
        }
    }
}

impl KubeconfigKeychainOptions {
    /// The kubeconfig file used: the explicit path, `$KUBECONFIG`'s first
    /// entry, or `~/.kube/config`.
    pub fn resolved_path(&self) -> PathBuf {
        if let Some(p) = &self.kubeconfig_path {
            if !p.as_os_str().is_empty() {
                return p.clone();
            }
        }
        if let Some(k) = std::env::var_os("KUBECONFIG") {
            if let Some(first) = std::env::split_paths(&k).find(|p| !p.as_os_str().is_empty()) {
                return first;
            }
        }
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root"))
            .join(".kube/config")
    }
}

/// host -> credential, per secret (`namespace/name`).
type SecretMap = BTreeMap<String, BTreeMap<String, Credential>>;

struct Shared {
    path: PathBuf,
    secrets: RwLock<SecretMap>,
    /// Number of completed lists; tests and callers wait on it.
    synced: watch::Sender<u64>,
}

/// Credentials from `kubernetes.io/dockerconfigjson` secrets of every
/// namespace, kept current by a background list/watch task (aborted on drop).
///
/// Until the kubeconfig exists and the first list has completed, it resolves
/// nothing (anonymous), like the reference snapshotter.
pub struct KubeconfigKeychain {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for KubeconfigKeychain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self
            .shared
            .secrets
            .read()
            .map(|m| m.len())
            .unwrap_or_default();
        f.debug_struct("KubeconfigKeychain")
            .field("kubeconfig", &self.shared.path)
            .field("secrets", &n)
            .finish()
    }
}

impl KubeconfigKeychain {
    /// Starts the background task on the current tokio runtime.
    pub fn start(opts: KubeconfigKeychainOptions) -> Self {
        let path = opts.resolved_path();
        let (synced, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            path,
            secrets: RwLock::new(BTreeMap::new()),
            synced,
        });
        let task = tokio::spawn(run(shared.clone(), opts));
        KubeconfigKeychain { shared, task }
    }

    /// The kubeconfig file watched for.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// How many full lists have completed (relists after `410 Gone` included).
    pub fn lists_completed(&self) -> u64 {
        *self.shared.synced.borrow()
    }

    /// Waits until at least `n` lists have completed, or `timeout` passes.
    pub async fn wait_for_lists(&self, n: u64, timeout: Duration) -> bool {
        let mut rx = self.shared.synced.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|v| *v >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Names (`namespace/name`) of the secrets currently holding credentials.
    pub fn secret_names(&self) -> Vec<String> {
        self.shared
            .secrets
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}

impl Drop for KubeconfigKeychain {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Keychain for KubeconfigKeychain {
    fn resolve<'a>(&'a self, host: &'a str) -> KeychainFuture<'a> {
        let found = self.shared.secrets.read().ok().and_then(|m| {
            m.values()
                .find_map(|hosts| lookup_host(hosts, host).cloned())
        });
        Box::pin(async move { Ok(found) })
    }
    fn describe(&self) -> String {
        format!("kubernetes secrets via {}", self.shared.path.display())
    }
}

/// Finds `host` in a host map, treating Docker Hub's names as one.
pub(crate) fn lookup_host<'m>(
    hosts: &'m BTreeMap<String, Credential>,
    host: &str,
) -> Option<&'m Credential> {
    const HUB: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];
    if let Some(c) = hosts.get(host) {
        return Some(c);
    }
    if HUB.contains(&host) {
        return HUB.iter().find_map(|h| hosts.get(*h));
    }
    None
}

/// `auths` keys come as hosts or URLs (`https://index.docker.io/v1/`).
pub(crate) fn normalize_auth_key(key: &str) -> String {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    k.split('/').next().unwrap_or(k).to_ascii_lowercase()
}

#[derive(Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// Parses docker `config.json` content (`auths` only: a secret must not run
/// credential helpers) into host -> credential.
pub(crate) fn parse_docker_config(
    data: &[u8],
) -> std::result::Result<BTreeMap<String, Credential>, String> {
    let cfg: DockerConfigFile =
        serde_json::from_slice(data).map_err(|e| format!("not a docker config: {e}"))?;
    let mut out = BTreeMap::new();
    for (key, a) in cfg.auths.into_iter().take(MAX_HOSTS_PER_SECRET) {
        let host = normalize_auth_key(&key);
        if host.is_empty() {
            continue;
        }
        let cred = if let Some(t) = a.identitytoken.filter(|t| !t.is_empty()) {
            Credential::IdentityToken(t)
        } else if let Some(enc) = a.auth.filter(|s| !s.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(enc.trim())
                .map_err(|_| format!("auth for {host} is not base64"))?;
            let s = String::from_utf8(raw).map_err(|_| format!("auth for {host} is not UTF-8"))?;
            let (u, p) = s
                .split_once(':')
                .ok_or_else(|| format!("auth for {host} is not user:password"))?;
            Credential::Basic {
                username: u.to_string(),
                password: p.to_string(),
            }
        } else if let (Some(u), Some(p)) = (a.username, a.password) {
            Credential::Basic {
                username: u,
                password: p,
            }
        } else {
            continue;
        };
        out.insert(host, cred);
    }
    Ok(out)
}

// ---- kubeconfig -----------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(default)]
struct KubeConfigFile {
    clusters: Vec<NamedCluster>,
    users: Vec<NamedUser>,
    contexts: Vec<NamedContext>,
    #[serde(rename = "current-context")]
    current_context: String,
}

#[derive(Deserialize)]
struct NamedCluster {
    name: String,
    #[serde(default)]
    cluster: ClusterEntry,
}

#[derive(Deserialize)]
struct NamedUser {
    name: String,
    #[serde(default)]
    user: UserEntry,
}

#[derive(Deserialize)]
struct NamedContext {
    name: String,
    #[serde(default)]
    context: ContextEntry,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default, rename_all = "kebab-case")]
struct ClusterEntry {
    server: String,
    certificate_authority: Option<PathBuf>,
    certificate_authority_data: Option<String>,
    insecure_skip_tls_verify: bool,
    tls_server_name: Option<String>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default, rename_all = "kebab-case")]
struct UserEntry {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<PathBuf>,
    client_certificate: Option<PathBuf>,
    client_certificate_data: Option<String>,
    client_key: Option<PathBuf>,
    client_key_data: Option<String>,
    username: Option<String>,
    password: Option<String>,
    exec: Option<serde_yaml::Value>,
    #[serde(rename = "auth-provider")]
    auth_provider: Option<serde_yaml::Value>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct ContextEntry {
    cluster: String,
    user: String,
}

/// What the keychain needs from a kubeconfig: where the API server is, how to
/// trust it and how to authenticate. `Debug` hides the secrets.
#[derive(Clone)]
pub struct KubeApiTarget {
    /// API server base URL.
    pub server: Url,
    ca_pem: Option<Vec<u8>>,
    insecure_skip_tls_verify: bool,
    identity_pem: Option<Vec<u8>>,
    auth: Option<String>,
}

impl fmt::Debug for KubeApiTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeApiTarget")
            .field("server", &self.server.as_str())
            .field("custom_ca", &self.ca_pem.is_some())
            .field("insecure_skip_tls_verify", &self.insecure_skip_tls_verify)
            .field("client_certificate", &self.identity_pem.is_some())
            .field("authorization", &self.auth.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn kube_err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Credentials {
        source_name: format!("kubeconfig {}", path.display()),
        detail: detail.into(),
    }
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let io = |e| Error::Io {
        path: path.display().to_string(),
        source: e,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.len() > max {
        return Err(Error::Config(format!(
            "{} is larger than {max} bytes",
            path.display()
        )));
    }
    std::fs::read(path).map_err(io)
}

impl KubeApiTarget {
    /// Parses a kubeconfig file, following its current context. Relative
    /// file paths in it are relative to its directory.
    pub fn from_kubeconfig(path: &Path) -> Result<Self> {
        let data = read_bounded(path, MAX_KUBECONFIG_BYTES)?;
        Self::parse(&data, path)
    }

    fn parse(data: &[u8], src: &Path) -> Result<Self> {
        let base = src.parent().unwrap_or(Path::new("."));
        let src = src.to_path_buf();
        let cfg: KubeConfigFile =
            serde_yaml::from_slice(data).map_err(|e| kube_err(&src, format!("not YAML: {e}")))?;
        let ctx_name = if cfg.current_context.is_empty() {
            // A single context is unambiguous even without current-context.
            match cfg.contexts.as_slice() {
                [only] => only.name.clone(),
                _ => return Err(kube_err(&src, "no current-context")),
            }
        } else {
            cfg.current_context.clone()
        };
        let ctx = cfg
            .contexts
            .into_iter()
            .find(|c| c.name == ctx_name)
            .ok_or_else(|| kube_err(&src, format!("context {ctx_name:?} not found")))?
            .context;
        let cluster = cfg
            .clusters
            .into_iter()
            .find(|c| c.name == ctx.cluster)
            .ok_or_else(|| kube_err(&src, format!("cluster {:?} not found", ctx.cluster)))?
            .cluster;
        let user = if ctx.user.is_empty() {
            UserEntry::default()
        } else {
            cfg.users
                .into_iter()
                .find(|u| u.name == ctx.user)
                .ok_or_else(|| kube_err(&src, format!("user {:?} not found", ctx.user)))?
                .user
        };
        let server = Url::parse(cluster.server.trim_end_matches('/'))
            .map_err(|e| kube_err(&src, format!("bad server URL: {e}")))?;
        if !matches!(server.scheme(), "http" | "https") {
            return Err(kube_err(&src, "server URL must be http or https"));
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let decode = |what: &str, s: &str| {
            b64.decode(s.trim())
                .map_err(|_| kube_err(&src, format!("{what} is not base64")))
        };
        let file = |p: &Path| read_bounded(&base.join(p), MAX_KUBECONFIG_BYTES);
        let ca_pem = match (
            &cluster.certificate_authority_data,
            &cluster.certificate_authority,
        ) {
            (Some(d), _) if !d.is_empty() => Some(decode("certificate-authority-data", d)?),
            (_, Some(p)) => Some(file(p)?),
            _ => None,
        };
        let cert = match (&user.client_certificate_data, &user.client_certificate) {
            (Some(d), _) if !d.is_empty() => Some(decode("client-certificate-data", d)?),
            (_, Some(p)) => Some(file(p)?),
            _ => None,
        };
        let key = match (&user.client_key_data, &user.client_key) {
            (Some(d), _) if !d.is_empty() => Some(decode("client-key-data", d)?),
            (_, Some(p)) => Some(file(p)?),
            _ => None,
        };
        let identity_pem = match (cert, key) {
            (Some(mut c), Some(k)) => {
                c.push(b'\n');
                c.extend_from_slice(&k);
                Some(c)
            }
            (None, None) => None,
            _ => {
                return Err(kube_err(
                    &src,
                    "client certificate and key must be given together",
                ))
            }
        };
        let auth = if let Some(t) = user.token.filter(|t| !t.is_empty()) {
            Some(format!("Bearer {}", t.trim()))
        } else if let Some(p) = &user.token_file {
            let t = String::from_utf8(file(p)?)
                .map_err(|_| kube_err(&src, "token file is not UTF-8"))?;
            Some(format!("Bearer {}", t.trim()))
        } else if let (Some(u), Some(p)) = (&user.username, &user.password) {
            Some(format!("Basic {}", b64.encode(format!("{u}:{p}"))))
        } else {
            None
        };
        if auth.is_none()
            && identity_pem.is_none()
            && (user.exec.is_some() || user.auth_provider.is_some())
        {
            tracing::warn!(kubeconfig = %src.display(), "kubeconfig user uses exec/auth-provider plugins, which are not supported; going without credentials");
        }
        if cluster.tls_server_name.is_some() {
            tracing::warn!(kubeconfig = %src.display(), "tls-server-name in kubeconfig is not supported; ignoring it");
        }
        Ok(KubeApiTarget {
            server,
            ca_pem,
            insecure_skip_tls_verify: cluster.insecure_skip_tls_verify,
            identity_pem,
            auth,
        })
    }

    fn http_client(&self, read_timeout: Duration) -> Result<reqwest::Client> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(read_timeout)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = &self.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| Error::Config(format!("kubeconfig CA: {e}")))?;
            if certs.is_empty() {
                return Err(Error::Config("kubeconfig CA: no certificate".into()));
            }
            // The cluster CA alone decides trust, as with kubectl.
            b = b.tls_certs_only(certs);
        }
        if self.insecure_skip_tls_verify {
            b = b.danger_accept_invalid_certs(true);
        }
        if let Some(pem) = &self.identity_pem {
            let id = reqwest::Identity::from_pem(pem)
                .map_err(|e| Error::Config(format!("kubeconfig client certificate: {e}")))?;
            b = b.identity(id);
        }
        b.build()
            .map_err(|e| Error::Config(format!("HTTP client: {}", crate::error::error_chain(&e))))
    }

    fn secrets_url(&self, watch_from: Option<(&str, Duration)>) -> Result<Url> {
        let mut u = self
            .server
            .join(&format!(
                "{}{SECRETS_PATH}",
                self.server.path().trim_end_matches('/')
            ))
            .map_err(|e| Error::Config(format!("secrets URL: {e}")))?;
        {
            let mut q = u.query_pairs_mut();
            q.append_pair("fieldSelector", &format!("type={SECRET_TYPE}"));
            if let Some((rv, t)) = watch_from {
                q.append_pair("watch", "true")
                    .append_pair("resourceVersion", rv)
                    .append_pair("allowWatchBookmarks", "true")
                    .append_pair("timeoutSeconds", &t.as_secs().max(1).to_string());
            }
        }
        Ok(u)
    }
}

// ---- list / watch -----------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(default)]
struct ObjectMeta {
    name: String,
    namespace: String,
    #[serde(rename = "resourceVersion")]
    resource_version: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SecretObj {
    metadata: ObjectMeta,
    #[serde(rename = "type")]
    typ: String,
    data: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct SecretList {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    items: Vec<SecretObj>,
}

#[derive(Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    typ: String,
    object: serde_json::Value,
}

/// Why a watch ended.
enum WatchEnd {
    /// The stream closed normally: resume watching from the last version.
    Resume,
    /// The version is too old (410): list again.
    Relist,
}

fn secret_key(m: &ObjectMeta) -> String {
    format!("{}/{}", m.namespace, m.name)
}

/// The credentials of one secret; `None` for a secret of another type or
/// without usable content (logged without secret values).
fn secret_credentials(s: &SecretObj) -> Option<BTreeMap<String, Credential>> {
    if s.typ != SECRET_TYPE {
        return None;
    }
    let key = secret_key(&s.metadata);
    let raw = s.data.get(".dockerconfigjson")?;
    let bytes = match base64::engine::general_purpose::STANDARD.decode(raw.trim()) {
        Ok(b) => b,
        Err(_) => {
            tracing::warn!(secret = %key, "secret's .dockerconfigjson is not base64; ignoring it");
            return None;
        }
    };
    match parse_docker_config(&bytes) {
        Ok(m) if !m.is_empty() => Some(m),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(secret = %key, error = %e, "ignoring unusable image pull secret");
            None
        }
    }
}

async fn run(shared: Arc<Shared>, opts: KubeconfigKeychainOptions) {
    let path = shared.path.clone();
    let mut announced = false;
    while !path.exists() {
        if !announced {
            tracing::info!(kubeconfig = %path.display(), "kubeconfig not there yet; waiting for it");
            announced = true;
        }
        tokio::time::sleep(opts.poll_interval).await;
    }
    let mut failures: u32 = 0;
    loop {
        match sync_once(&shared, &opts).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(kubeconfig = %path.display(), error = %e, "kubernetes secret sync failed; retrying");
            }
        }
        let wait = opts.retry_wait.saturating_mul(1 << failures.min(3));
        tokio::time::sleep(wait).await;
    }
}

/// Loads the kubeconfig, lists, then watches until a relist is needed.
async fn sync_once(shared: &Shared, opts: &KubeconfigKeychainOptions) -> Result<()> {
    let target = KubeApiTarget::from_kubeconfig(&shared.path)?;
    // Watches stay quiet for long stretches; the server ends them at timeoutSeconds.
    let http = target.http_client(opts.watch_timeout + Duration::from_secs(30))?;
    let host = target.server.host_str().unwrap_or("").to_string();
    let mut rv = list(shared, &target, &http, &host, opts.request_timeout).await?;
    loop {
        match watch(shared, &target, &http, &host, &mut rv, opts.watch_timeout).await? {
            WatchEnd::Resume => continue,
            WatchEnd::Relist => {
                tracing::info!(api = %host, "watch version expired (410); listing secrets again");
                rv = list(shared, &target, &http, &host, opts.request_timeout).await?;
            }
        }
    }
}

fn request(
    http: &reqwest::Client,
    target: &KubeApiTarget,
    url: Url,
) -> Result<reqwest::RequestBuilder> {
    let mut rb = http
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json");
    if let Some(a) = &target.auth {
        let mut v = reqwest::header::HeaderValue::from_str(a)
            .map_err(|_| Error::Config("kubeconfig credential is not a valid header".into()))?;
        v.set_sensitive(true);
        rb = rb.header(reqwest::header::AUTHORIZATION, v);
    }
    Ok(rb)
}

async fn check_status(
    resp: reqwest::Response,
    host: &str,
    what: &str,
) -> Result<reqwest::Response> {
    let status = resp.status().as_u16();
    match status {
        200 => Ok(resp),
        401 => Err(Error::Unauthorized {
            host: host.to_string(),
            credentials_source: "kubeconfig".into(),
        }),
        403 => Err(Error::Forbidden {
            host: host.to_string(),
            what: format!("{what} (the kubeconfig user needs list/watch on secrets)"),
        }),
        _ => {
            let url = resp.url().clone();
            Err(Error::Status {
                method: "GET".into(),
                url: format!("{}://{}{}", url.scheme(), host, url.path()),
                status,
                body: snippet(resp).await,
            })
        }
    }
}

/// The start of an error body, read with a bound.
async fn snippet(mut resp: reqwest::Response) -> String {
    let mut b = Vec::new();
    while let Ok(Some(c)) = resp.chunk().await {
        b.extend_from_slice(&c);
        if b.len() >= 512 {
            break;
        }
    }
    String::from_utf8_lossy(&b[..b.len().min(512)])
        .trim()
        .to_string()
}

async fn list(
    shared: &Shared,
    target: &KubeApiTarget,
    http: &reqwest::Client,
    host: &str,
    timeout: Duration,
) -> Result<String> {
    let url = target.secrets_url(None)?;
    let resp = request(http, target, url)?
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| Error::from_reqwest(host, timeout, &e))?;
    let mut resp = check_status(resp, host, "secret list").await?;
    let mut body = BytesMut::new();
    while let Some(c) = resp
        .chunk()
        .await
        .map_err(|e| Error::from_reqwest(host, timeout, &e))?
    {
        if body.len() + c.len() > MAX_LIST_BYTES {
            return Err(Error::protocol(
                host,
                format!("secret list larger than {MAX_LIST_BYTES} bytes"),
            ));
        }
        body.extend_from_slice(&c);
    }
    let list: SecretList = serde_json::from_slice(&body)
        .map_err(|e| Error::protocol(host, format!("bad secret list: {e}")))?;
    let mut map = SecretMap::new();
    for s in list.items.iter().take(MAX_SECRETS) {
        if let Some(c) = secret_credentials(s) {
            map.insert(secret_key(&s.metadata), c);
        }
    }
    let n = map.len();
    if let Ok(mut m) = shared.secrets.write() {
        *m = map;
    }
    shared.synced.send_modify(|v| *v += 1);
    tracing::info!(api = %host, secrets = n, resource_version = %list.metadata.resource_version, "listed image pull secrets");
    Ok(list.metadata.resource_version)
}

async fn watch(
    shared: &Shared,
    target: &KubeApiTarget,
    http: &reqwest::Client,
    host: &str,
    rv: &mut String,
    watch_timeout: Duration,
) -> Result<WatchEnd> {
    let url = target.secrets_url(Some((rv.as_str(), watch_timeout)))?;
    let resp = request(http, target, url)?
        .send()
        .await
        .map_err(|e| Error::from_reqwest(host, watch_timeout, &e))?;
    if resp.status().as_u16() == 410 {
        return Ok(WatchEnd::Relist);
    }
    let mut resp = check_status(resp, host, "secret watch").await?;
    let mut buf = BytesMut::new();
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(WatchEnd::Resume),
            Err(e) => {
                tracing::debug!(api = %host, error = %crate::error::error_chain(&e), "watch stream broke; resuming");
                return Ok(WatchEnd::Resume);
            }
        };
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line = buf.split_to(nl + 1);
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            if let Some(end) = apply_event(shared, host, line, rv)? {
                return Ok(end);
            }
        }
        if buf.len() > MAX_EVENT_BYTES {
            return Err(Error::protocol(
                host,
                format!("watch event larger than {MAX_EVENT_BYTES} bytes"),
            ));
        }
    }
}

/// Applies one watch event; `Some` when the watch must end.
fn apply_event(
    shared: &Shared,
    host: &str,
    line: &[u8],
    rv: &mut String,
) -> Result<Option<WatchEnd>> {
    let ev: WatchEvent = serde_json::from_slice(line)
        .map_err(|e| Error::protocol(host, format!("bad watch event: {e}")))?;
    match ev.typ.as_str() {
        "ADDED" | "MODIFIED" | "DELETED" => {
            let s: SecretObj = serde_json::from_value(ev.object)
                .map_err(|e| Error::protocol(host, format!("bad secret in watch event: {e}")))?;
            let key = secret_key(&s.metadata);
            let creds = if ev.typ == "DELETED" {
                None
            } else {
                secret_credentials(&s)
            };
            if let Ok(mut m) = shared.secrets.write() {
                match creds {
                    Some(c) if m.len() < MAX_SECRETS || m.contains_key(&key) => {
                        m.insert(key.clone(), c);
                    }
                    Some(_) => {
                        tracing::warn!(secret = %key, "too many image pull secrets; ignoring this one")
                    }
                    None => {
                        m.remove(&key);
                    }
                }
            }
            tracing::debug!(secret = %key, event = %ev.typ, "image pull secret changed");
            if !s.metadata.resource_version.is_empty() {
                *rv = s.metadata.resource_version;
            }
            Ok(None)
        }
        "BOOKMARK" => {
            if let Some(v) = ev.object["metadata"]["resourceVersion"].as_str() {
                if !v.is_empty() {
                    *rv = v.to_string();
                }
            }
            Ok(None)
        }
        "ERROR" => {
            let code = ev.object["code"].as_u64().unwrap_or(0);
            if code == 410 {
                return Ok(Some(WatchEnd::Relist));
            }
            let msg: String = ev.object["message"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(256)
                .collect();
            Err(Error::protocol(host, format!("watch error {code}: {msg}")))
        }
        other => {
            tracing::debug!(api = %host, event = %other, "ignoring unknown watch event type");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_parsing() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ca.pem"), b"not used here").expect("ca");
        std::fs::write(dir.path().join("tok"), b"file-token\n").expect("tok");
        let yaml = br#"
apiVersion: v1
kind: Config
current-context: b
clusters:
- name: one
  cluster:
    server: https://10.0.0.1:6443/
    certificate-authority: ca.pem
- name: two
  cluster:
    server: http://127.0.0.1:8080
    insecure-skip-tls-verify: true
contexts:
- name: a
  context: {cluster: one, user: u1}
- name: b
  context: {cluster: two, user: u2}
users:
- name: u1
  user: {token: sekret-token}
- name: u2
  user: {tokenFile: tok}
"#;
        let t = KubeApiTarget::parse(yaml, &dir.path().join("config")).expect("parse");
        assert_eq!(t.server.as_str(), "http://127.0.0.1:8080/");
        assert!(t.insecure_skip_tls_verify);
        assert_eq!(t.auth.as_deref(), Some("Bearer file-token"));
        let dbg = format!("{t:?}");
        assert!(!dbg.contains("file-token"), "{dbg}");
        let u = t
            .secrets_url(Some(("42", Duration::from_secs(300))))
            .expect("url");
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:8080/api/v1/secrets?fieldSelector=type%3Dkubernetes.io%2Fdockerconfigjson&watch=true&resourceVersion=42&allowWatchBookmarks=true&timeoutSeconds=300"
        );
        let other =
            String::from_utf8_lossy(yaml).replace("current-context: b", "current-context: a");
        let t =
            KubeApiTarget::parse(other.as_bytes(), &dir.path().join("config")).expect("parse a");
        assert_eq!(t.ca_pem.as_deref(), Some(&b"not used here"[..]));
        assert_eq!(t.auth.as_deref(), Some("Bearer sekret-token"));
        let bad =
            String::from_utf8_lossy(yaml).replace("current-context: b", "current-context: zz");
        assert!(KubeApiTarget::parse(bad.as_bytes(), &dir.path().join("config")).is_err());
        assert!(KubeApiTarget::parse(b"[not: a, config", &dir.path().join("config")).is_err());
    }

    #[test]
    fn docker_config_secrets() {
        let b64 = base64::engine::general_purpose::STANDARD;
        let json = format!(
            r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{}"}},"Reg.Example:5000":{{"username":"u","password":"p"}},"tok.example":{{"identitytoken":"rt"}},"empty.example":{{}}}}}}"#,
            b64.encode("hub:pw:x")
        );
        let m = parse_docker_config(json.as_bytes()).expect("parse");
        assert_eq!(m.len(), 3);
        assert_eq!(
            lookup_host(&m, "docker.io"),
            Some(&Credential::Basic {
                username: "hub".into(),
                password: "pw:x".into()
            })
        );
        assert!(lookup_host(&m, "reg.example:5000").is_some());
        assert_eq!(
            lookup_host(&m, "tok.example"),
            Some(&Credential::IdentityToken("rt".into()))
        );
        assert!(lookup_host(&m, "other.example").is_none());
        assert!(parse_docker_config(br#"{"auths":{"h":{"auth":"!!"}}}"#).is_err());
    }
}
