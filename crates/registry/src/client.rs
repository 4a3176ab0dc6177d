//! The registry client: endpoints (mirrors, then the host), one HTTP client
//! per endpoint configuration, authentication, retries with backoff, manual
//! redirects and per-host concurrency limits.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use rand::Rng;
use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Method, Response, StatusCode};
use tokio::sync::Semaphore;
use url::Url;

use crate::auth::{parse_challenge, CachedToken, Challenge, TokenResponse};
use crate::config::{is_local_host, BlobConfig, MirrorConfig, RegistryConfig};
use crate::error::{Error, Result};
use crate::keychain::{Anonymous, Credential, Keychain};
use crate::metrics::{RegistryMetrics, RequestKind};
use crate::reference::DOCKER_HUB;

const USER_AGENT: &str = concat!("stargz-rs-registry/", env!("CARGO_PKG_VERSION"));
const MAX_REDIRECTS: usize = 5;
/// 401s one request goes through: learning the challenge, a token that expired, and a
/// credential refused twice before the next source's is asked.
const MAX_AUTH_ROUNDS: usize = 5;
/// Bounds of the memory of refused credentials: (host, repository) pairs, and
/// credentials per pair.
const MAX_REJECTED_KEYS: usize = 1024;
const MAX_REJECTED_PER_KEY: usize = 8;

/// A client for OCI distribution registries. Cheap to clone; clones share
/// connections, tokens and learned host capabilities.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub config: RegistryConfig,
    pub blob: BlobConfig,
    keychain: Arc<dyn Keychain>,
    http: Mutex<HashMap<(bool, Vec<String>), reqwest::Client>>,
    tokens: Mutex<HashMap<(String, String), CachedToken>>,
    /// Credentials a registry refused, per (host, repository): later requests prefer
    /// the other sources' (see [`Keychain::candidates`]).
    rejected: Mutex<HashMap<(String, String), Vec<Credential>>>,
    challenges: Mutex<HashMap<String, Challenge>>,
    semaphores: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Hosts that answered a multi-range request badly; see the blob reader.
    pub no_multi_range: Mutex<HashSet<String>>,
    /// Mirrors probed for Range support (false: answered a ranged GET with 200).
    pub mirror_ranges: Mutex<HashMap<String, bool>>,
    metrics: RegistryMetrics,
}

/// One place a request for a registry can go: a mirror or the host itself.
#[derive(Clone)]
pub(crate) struct Endpoint {
    /// `host[:port]` actually contacted; credentials are looked up for it.
    pub host: String,
    /// `scheme://host/v2/`
    pub base: Url,
    pub client: reqwest::Client,
    pub timeout: Option<Duration>,
    pub headers: HeaderMap,
    pub semaphore: Arc<Semaphore>,
}

/// What a 404 means for a request, so the error names the right thing.
#[derive(Clone, Debug)]
pub(crate) enum Subject {
    Manifest(String),
    Blob { repository: String, digest: String },
    Other(String),
}

/// Access requested of the token server, e.g. `repository:a/b:pull`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Scope(pub Vec<String>);

impl Scope {
    pub fn pull(repo: &str) -> Self {
        Scope(vec![format!("repository:{repo}:pull")])
    }
    pub fn push(repo: &str) -> Self {
        Scope(vec![format!("repository:{repo}:pull,push")])
    }
    pub fn and_pull(mut self, repo: &str) -> Self {
        self.0.push(format!("repository:{repo}:pull"));
        self
    }
    fn key(&self) -> String {
        self.0.join(" ")
    }
    /// The repository the scope is first about (`org/app`): what per-image
    /// credentials are looked up by.
    fn repository(&self) -> Option<&str> {
        let s = self.0.first()?.strip_prefix("repository:")?;
        s.rsplit_once(':').map(|(r, _)| r)
    }
}

/// One request, rebuilt on every attempt.
pub(crate) struct Spec<'a> {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Option<Bytes>,
    pub subject: Subject,
    pub scope: &'a Scope,
    /// Total time for one attempt; defaults to the endpoint's request timeout.
    pub attempt_timeout: Option<Duration>,
    /// Wall-clock bound for all attempts.
    pub deadline: Instant,
    /// Follow 30x ourselves (never forwarding credentials), caching the target here.
    pub redirect_cache: Option<&'a Mutex<Option<(Url, Instant)>>>,
    /// Statuses handed to `read` instead of being turned into errors.
    pub pass_status: &'a [u16],
}

/// Turns a response into a result; runs inside the retry loop so a body
/// that breaks off is retried like any transport error.
pub(crate) type Reader<'a, T> =
    &'a (dyn Fn(Response) -> BoxFuture<'static, Result<T>> + Send + Sync);

enum Failure {
    /// Worth another attempt after a backoff (optionally server-suggested).
    Retry(Error, Option<Duration>),
    Fatal(Error),
    /// 401 from the registry with this challenge header, to a request authorized
    /// with this credential (directly or through a token).
    Auth {
        challenge: Option<String>,
        used: Option<Credential>,
    },
    /// The token endpoint refused the credential (it was set aside).
    Refused(Error),
    /// 403 to a request authorized with this credential.
    Denied(Error, Credential),
}

impl Spec<'_> {
    fn kind(&self) -> RequestKind {
        match self.subject {
            Subject::Manifest(_) => RequestKind::Manifest,
            Subject::Blob { .. } if self.headers.contains_key(reqwest::header::RANGE) => {
                RequestKind::BlobRange
            }
            Subject::Blob { .. } => RequestKind::Blob,
            Subject::Other(_) => RequestKind::Other,
        }
    }
}

impl Client {
    /// A client with the given configuration and credential source.
    pub fn new(config: RegistryConfig, keychain: Arc<dyn Keychain>) -> Result<Self> {
        Self::with_metrics(config, keychain, RegistryMetrics::default())
    }

    /// [`Client::new`], counting its requests into `metrics`.
    pub fn with_metrics(
        config: RegistryConfig,
        keychain: Arc<dyn Keychain>,
        metrics: RegistryMetrics,
    ) -> Result<Self> {
        let blob = config.blob.normalized();
        Ok(Client {
            inner: Arc::new(Inner {
                config,
                blob,
                keychain,
                http: Mutex::new(HashMap::new()),
                tokens: Mutex::new(HashMap::new()),
                rejected: Mutex::new(HashMap::new()),
                challenges: Mutex::new(HashMap::new()),
                semaphores: Mutex::new(HashMap::new()),
                no_multi_range: Mutex::new(HashSet::new()),
                mirror_ranges: Mutex::new(HashMap::new()),
                metrics,
            }),
        })
    }

    /// A client with default configuration and no credentials.
    pub fn anonymous() -> Self {
        Client::new(RegistryConfig::default(), Arc::new(Anonymous))
            .unwrap_or_else(|_| unreachable!("default config is valid"))
    }

    /// Builds, on a thread of its own, the HTTP clients that the endpoints of every
    /// configured registry and of an unconfigured one use: building one loads the
    /// system's CA roots (some milliseconds), which the first pull after a start
    /// would otherwise wait for.
    pub fn warm_up(&self) {
        let client = self.clone();
        let spawned = std::thread::Builder::new()
            .name("registry-warm-up".into())
            .spawn(move || {
                let configured = client
                    .inner
                    .config
                    .resolver
                    .host
                    .keys()
                    .filter(|h| *h != crate::config::DEFAULT_HOST_KEY)
                    .cloned();
                // An unconfigured public host and a loopback one: the `_default`
                // settings over HTTPS and over plain HTTP.
                let unconfigured = ["registry.invalid", "localhost"].map(String::from);
                for host in configured.chain(unconfigured) {
                    if let Err(e) = client.endpoints(&host) {
                        tracing::debug!(host, error = %e, "HTTP client not built ahead");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "no thread to build HTTP clients ahead");
        }
    }

    /// How many HTTP clients (one per TLS setting) have been built.
    #[cfg(test)]
    fn http_clients_built(&self) -> usize {
        self.inner
            .http
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// The effective blob settings (defaults filled in).
    pub fn blob_config(&self) -> &BlobConfig {
        &self.inner.blob
    }

    /// The endpoints for a registry host: mirrors in order, then the host itself.
    pub(crate) fn endpoints(&self, registry: &str) -> Result<Vec<Endpoint>> {
        let hc = self.inner.config.resolver.host_config(registry);
        let mut list: Vec<MirrorConfig> = hc.map(|h| h.mirrors.clone()).unwrap_or_default();
        let mut own = hc.and_then(|h| h.self_.clone()).unwrap_or_default();
        own.host = if registry == DOCKER_HUB {
            "registry-1.docker.io".into()
        } else {
            registry.to_string()
        };
        list.push(own);
        let mut out = Vec::with_capacity(list.len());
        for m in list {
            let insecure = m.insecure.unwrap_or_else(|| is_local_host(&m.host));
            let scheme = if insecure { "http" } else { "https" };
            let base = Url::parse(&format!("{scheme}://{}/v2/", m.host))
                .map_err(|e| Error::Config(format!("bad host {:?}: {e}", m.host)))?;
            let mut cas: Vec<String> = Vec::new();
            for p in [
                &self.inner.config.resolver.ca_file,
                &hc.and_then(|h| h.ca_file.clone()),
                &m.ca_file,
            ]
            .into_iter()
            .flatten()
            {
                cas.push(p.display().to_string());
            }
            let client = self.http_client(insecure, cas)?;
            let mut headers = HeaderMap::new();
            for (k, vs) in &m.header {
                let name = HeaderName::from_bytes(k.as_bytes())
                    .map_err(|e| Error::Config(format!("header name {k:?}: {e}")))?;
                for v in vs {
                    let val = HeaderValue::from_str(v)
                        .map_err(|e| Error::Config(format!("header {k:?} value: {e}")))?;
                    headers.append(name.clone(), val);
                }
            }
            let semaphore = {
                let mut s = self
                    .inner
                    .semaphores
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                s.entry(m.host.clone())
                    .or_insert_with(|| {
                        Arc::new(Semaphore::new(
                            self.inner.blob.max_concurrent_requests_per_host,
                        ))
                    })
                    .clone()
            };
            out.push(Endpoint {
                host: m.host.clone(),
                base,
                client,
                timeout: m.request_timeout_with(self.inner.config.resolver.request_timeout_sec),
                headers,
                semaphore,
            });
        }
        Ok(out)
    }

    fn http_client(&self, insecure: bool, cas: Vec<String>) -> Result<reqwest::Client> {
        let key = (insecure, cas);
        let mut map = self.inner.http.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let b = &self.inner.blob;
        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            // Redirects are followed by hand so credentials never reach the target.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(b.connect_timeout_sec))
            .read_timeout(Duration::from_secs(b.read_idle_timeout_sec))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true);
        let mut certs = Vec::new();
        for path in &key.1 {
            let pem = std::fs::read(path).map_err(|e| Error::Io {
                path: path.clone(),
                source: e,
            })?;
            let mut parsed = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Error::Config(format!("CA file {path}: {e}")))?;
            if parsed.is_empty() {
                return Err(Error::Config(format!(
                    "CA file {path}: no certificate found"
                )));
            }
            certs.append(&mut parsed);
        }
        if !certs.is_empty() {
            builder = builder.tls_certs_merge(certs);
        }
        let tls = &self.inner.config.resolver.tls;
        if tls.skip_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        if let Some((cert, key)) = &tls.client_cert {
            let mut pem = Vec::new();
            for p in [cert, key] {
                pem.extend(std::fs::read(p).map_err(|e| Error::Io {
                    path: p.display().to_string(),
                    source: e,
                })?);
                pem.push(b'\n');
            }
            let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
                Error::Config(format!(
                    "client certificate {} / key {}: {}",
                    cert.display(),
                    key.display(),
                    crate::error::error_chain(&e)
                ))
            })?;
            builder = builder.identity(id);
        }
        let c = builder.build().map_err(|e| {
            Error::Config(format!("HTTP client: {}", crate::error::error_chain(&e)))
        })?;
        map.insert(key, c.clone());
        Ok(c)
    }

    fn backoff(&self, attempt: u32, hint: Option<Duration>) -> Duration {
        let b = &self.inner.blob;
        let base = b
            .min_wait_msec
            .saturating_mul(1u64 << attempt.min(30))
            .min(b.max_wait_msec);
        // Full-range jitter over the upper half keeps clients from retrying in lockstep.
        let ms = rand::rng().random_range(base / 2..=base.max(1));
        let d = Duration::from_millis(ms);
        match hint {
            // The server's Retry-After wins over our own schedule; the overall deadline still bounds it.
            Some(h) => h.max(d),
            None => d,
        }
    }

    /// Runs one logical request against one endpoint: authentication,
    /// redirects, retries. `read` sees only 2xx responses (or `pass_status`).
    pub(crate) async fn execute<T>(
        &self,
        ep: &Endpoint,
        spec: &Spec<'_>,
        read: Reader<'_, T>,
    ) -> Result<T> {
        let max_retries = self.inner.blob.max_retries;
        let mut attempt: u32 = 0;
        let mut auth_rounds = 0;
        let mut denied = false;
        let mut last_refused: Option<Credential> = None;
        let kind = spec.kind();
        let began = Instant::now();
        loop {
            self.inner.metrics.request(kind);
            let outcome = self.attempt(ep, spec, read).await;
            // Where a start-up's time goes, request by request (target `registry::timing`).
            tracing::debug!(target: "registry::timing", method = %spec.method,
                path = spec.url.path(), range = ?spec.headers.get(reqwest::header::RANGE),
                ok = outcome.is_ok(), attempt, ms = began.elapsed().as_millis() as u64,
                "request");
            if matches!(outcome, Err(Failure::Fatal(_)) | Err(Failure::Retry(..))) {
                self.inner.metrics.error(kind);
            }
            let (err, hint) = match outcome {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Auth { challenge, used }) => {
                    auth_rounds += 1;
                    // Basic credentials the registry refuses are wrong; a token is
                    // fetched again once (it may just have expired), and a credential
                    // whose fresh token is refused too is set aside: the next round
                    // asks the next credential source.
                    if let Some(c) = &used {
                        let basic = challenge
                            .as_deref()
                            .and_then(parse_challenge)
                            .is_some_and(|ch| ch == Challenge::Basic);
                        if basic || last_refused.as_ref() == Some(c) {
                            self.reject(ep, spec.scope, c);
                        }
                    }
                    if auth_rounds > MAX_AUTH_ROUNDS {
                        return Err(self.unauthorized(ep, used.is_some()));
                    }
                    self.authenticate(ep, spec.scope, challenge.as_deref(), used.is_some())?;
                    last_refused = used;
                    continue;
                }
                Err(Failure::Refused(e)) => {
                    auth_rounds += 1;
                    if auth_rounds > MAX_AUTH_ROUNDS {
                        return Err(e);
                    }
                    continue;
                }
                Err(Failure::Denied(e, used)) => {
                    // A 403 to a token of a credential that lost its access (or that a
                    // registry reports as 403 when it expired): the sources are asked
                    // again, once.
                    if denied {
                        return Err(e);
                    }
                    denied = true;
                    self.reject(ep, spec.scope, &used);
                    self.drop_token(ep, spec.scope);
                    continue;
                }
                Err(Failure::Retry(e, hint)) => (e, hint),
            };
            if attempt >= max_retries {
                return Err(err);
            }
            let wait = self.backoff(attempt, hint);
            if Instant::now()
                .checked_add(wait)
                .is_none_or(|t| t >= spec.deadline)
            {
                tracing::debug!(host = %ep.host, "no time left for another retry");
                return Err(err);
            }
            attempt += 1;
            tracing::warn!(host = %ep.host, url = %crate::redact::redact_url(&spec.url), attempt, ?wait, error = %err, "request failed, retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// The error for a registry that wants credentials it did not get (or refused).
    fn unauthorized(&self, ep: &Endpoint, had_credentials: bool) -> Error {
        let (host, credentials_source) = (ep.host.clone(), self.inner.keychain.describe());
        if had_credentials {
            Error::Unauthorized {
                host,
                credentials_source,
            }
        } else {
            Error::NoCredentials {
                host,
                credentials_source,
            }
        }
    }

    /// The credential to authenticate to `ep` for `scope` with: the keychain's answer
    /// for the scope's repository, unless the registry refused that one since; then the
    /// next source's. When every source's credential was refused, the first is tried
    /// again (it may have been fixed since).
    async fn credential(&self, ep: &Endpoint, scope: &Scope) -> Result<Option<Credential>> {
        let k = &self.inner.keychain;
        let Some(repo) = scope.repository() else {
            return k.resolve(&ep.host).await;
        };
        let Some(first) = k.resolve_image(&ep.host, repo).await? else {
            return Ok(None);
        };
        let rejected = self
            .inner
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(ep.host.clone(), repo.to_string()))
            .cloned()
            .unwrap_or_default();
        if !rejected.contains(&first) {
            return Ok(Some(first));
        }
        let next = k
            .candidates(&ep.host, repo)
            .await?
            .into_iter()
            .find(|c| !rejected.contains(c));
        if next.is_some() {
            tracing::info!(host = %ep.host, repository = repo,
                "the first source's credentials were refused; using the next source's");
        }
        Ok(Some(next.unwrap_or(first)))
    }

    /// Sets `c` aside for `scope` on `ep`: the registry refused it.
    fn reject(&self, ep: &Endpoint, scope: &Scope, c: &Credential) {
        let Some(repo) = scope.repository() else {
            return;
        };
        let key = (ep.host.clone(), repo.to_string());
        let mut map = self
            .inner
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_REJECTED_KEYS && !map.contains_key(&key) {
            map.clear();
        }
        let list = map.entry(key).or_default();
        if !list.contains(c) {
            if list.len() >= MAX_REJECTED_PER_KEY {
                list.remove(0);
            }
            list.push(c.clone());
            tracing::warn!(host = %ep.host, repository = repo,
                "registry refused the credentials; asking the credential sources again");
        }
    }

    fn drop_token(&self, ep: &Endpoint, scope: &Scope) {
        self.inner
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(ep.host.clone(), scope.key()));
    }

    async fn attempt<T>(
        &self,
        ep: &Endpoint,
        spec: &Spec<'_>,
        read: Reader<'_, T>,
    ) -> Result<T, Failure> {
        let _permit = ep
            .semaphore
            .acquire()
            .await
            .map_err(|_| Failure::Fatal(Error::protocol(&ep.host, "client shut down")))?;
        let timeout = spec.attempt_timeout.or(ep.timeout);

        // A cached redirect target is tried first; if it has expired we go back to the registry.
        if let Some(cache) = spec.redirect_cache {
            let cached = cache.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some((url, until)) = cached {
                if Instant::now() < until {
                    match self.follow(ep, spec, url.clone(), timeout, read).await {
                        Err(Failure::Fatal(Error::Forbidden { .. }))
                        | Err(Failure::Fatal(Error::Unauthorized { .. }))
                        | Err(Failure::Fatal(Error::BlobNotFound { .. }))
                        | Err(Failure::Fatal(Error::Status { status: 410, .. })) => {
                            tracing::debug!(host = %ep.host, "redirect target expired, asking the registry again");
                        }
                        other => return other,
                    }
                }
                *cache.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
        }

        let mut rb = ep
            .client
            .request(spec.method.clone(), spec.url.clone())
            .headers(ep.headers.clone())
            .headers(spec.headers.clone());
        let used = match self.auth_header(ep, spec.scope).await {
            Ok((Some(h), used)) => {
                rb = rb.header(AUTHORIZATION, h);
                used
            }
            Ok((None, used)) => used,
            Err(e @ Error::Unauthorized { .. }) => return Err(Failure::Refused(e)),
            Err(e) => return Err(Failure::Fatal(e)),
        };
        if let Some(body) = &spec.body {
            rb = rb.body(body.clone());
        }
        let resp = self.send(ep, rb, timeout).await?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED {
            let ch = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            return Err(Failure::Auth {
                challenge: ch,
                used,
            });
        }
        if status.is_redirection() && spec.redirect_cache.is_some() {
            let target = location(&resp, &spec.url).ok_or_else(|| {
                Failure::Fatal(Error::protocol(
                    &ep.host,
                    "redirect without a valid Location",
                ))
            })?;
            if let Some(cache) = spec.redirect_cache {
                let ttl = Duration::from_secs(self.inner.blob.redirect_cache_sec);
                *cache.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now()
                    .checked_add(ttl)
                    .map(|until| (target.clone(), until));
            }
            return self.follow(ep, spec, target, timeout, read).await;
        }
        match (self.finish(ep, spec, resp, read).await, used) {
            (Err(Failure::Fatal(e @ Error::Forbidden { .. })), Some(c)) => {
                Err(Failure::Denied(e, c))
            }
            (res, _) => res,
        }
    }

    /// Follows redirects from `url` with no credentials and no endpoint headers.
    async fn follow<T>(
        &self,
        ep: &Endpoint,
        spec: &Spec<'_>,
        mut url: Url,
        timeout: Option<Duration>,
        read: Reader<'_, T>,
    ) -> Result<T, Failure> {
        for _ in 0..MAX_REDIRECTS {
            tracing::debug!(host = %ep.host, target_host = url.host_str().unwrap_or(""), "following redirect");
            let rb = ep
                .client
                .request(spec.method.clone(), url.clone())
                .headers(spec.headers.clone());
            let resp = self.send(ep, rb, timeout).await?;
            if resp.status().is_redirection() {
                url = location(&resp, &url).ok_or_else(|| {
                    Failure::Fatal(Error::protocol(
                        &ep.host,
                        "redirect without a valid Location",
                    ))
                })?;
                if let Some(cache) = spec.redirect_cache {
                    let ttl = Duration::from_secs(self.inner.blob.redirect_cache_sec);
                    *cache.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now()
                        .checked_add(ttl)
                        .map(|until| (url.clone(), until));
                }
                continue;
            }
            if resp.status() == StatusCode::UNAUTHORIZED {
                return Err(Failure::Fatal(Error::Unauthorized {
                    host: url.host_str().unwrap_or("").to_string(),
                    credentials_source: "none (redirect target)".into(),
                }));
            }
            return self.finish(ep, spec, resp, read).await;
        }
        Err(Failure::Fatal(Error::protocol(
            &ep.host,
            "too many redirects",
        )))
    }

    async fn send(
        &self,
        ep: &Endpoint,
        mut rb: reqwest::RequestBuilder,
        timeout: Option<Duration>,
    ) -> Result<Response, Failure> {
        if let Some(t) = timeout {
            rb = rb.timeout(t);
        }
        let fut = rb.send();
        let res = match timeout {
            // reqwest's own timeout covers the body too; this one bounds waiting for headers.
            Some(t) => tokio::time::timeout(t, fut).await.map_err(|_| {
                Failure::Retry(
                    Error::Timeout {
                        host: ep.host.clone(),
                        after: t,
                    },
                    None,
                )
            })?,
            None => fut.await,
        };
        res.map_err(|e| {
            let err = Error::from_reqwest(&ep.host, timeout.unwrap_or_default(), &e);
            match err {
                Error::Tls { .. } | Error::UnknownHost { .. } | Error::Config(_) => {
                    Failure::Fatal(err)
                }
                e => Failure::Retry(e, None),
            }
        })
    }

    async fn finish<T>(
        &self,
        ep: &Endpoint,
        spec: &Spec<'_>,
        resp: Response,
        read: Reader<'_, T>,
    ) -> Result<T, Failure> {
        let status = resp.status();
        if status.is_success() || spec.pass_status.contains(&status.as_u16()) {
            return read(resp).await.map_err(|e| {
                if e.is_transient() {
                    Failure::Retry(e, None)
                } else {
                    Failure::Fatal(e)
                }
            });
        }
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let host = ep.host.clone();
        let url = crate::redact::redact_url(resp.url());
        let body = body_snippet(resp).await;
        let err = match status.as_u16() {
            404 => match &spec.subject {
                Subject::Manifest(r) => Error::ManifestNotFound {
                    reference: r.clone(),
                },
                Subject::Blob { repository, digest } => Error::BlobNotFound {
                    host,
                    repository: repository.clone(),
                    digest: digest.clone(),
                },
                Subject::Other(_) => Error::Status {
                    method: spec.method.to_string(),
                    url: url.to_string(),
                    status: 404,
                    body,
                },
            },
            403 => Error::Forbidden {
                host,
                what: match &spec.subject {
                    Subject::Manifest(r) => format!("manifest {r}"),
                    Subject::Blob { repository, digest } => {
                        format!("blob {digest} of {repository}")
                    }
                    Subject::Other(s) => s.clone(),
                },
            },
            429 => {
                return Err(Failure::Retry(
                    Error::RateLimited { host, retry_after },
                    retry_after,
                ))
            }
            s if s >= 500 => {
                return Err(Failure::Retry(
                    Error::Status {
                        method: spec.method.to_string(),
                        url: url.to_string(),
                        status: s,
                        body,
                    },
                    retry_after,
                ))
            }
            s => Error::Status {
                method: spec.method.to_string(),
                url: url.to_string(),
                status: s,
                body,
            },
        };
        Err(Failure::Fatal(err))
    }

    /// The Authorization value to send, from cached tokens or known basic-auth hosts,
    /// and the credential behind it.
    async fn auth_header(
        &self,
        ep: &Endpoint,
        scope: &Scope,
    ) -> Result<(Option<HeaderValue>, Option<Credential>)> {
        let key = (ep.host.clone(), scope.key());
        let cached = self
            .inner
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        if let Some(t) = cached {
            if t.is_valid() {
                return Ok((
                    Some(secret_header(&format!("Bearer {}", t.token))?),
                    t.credential,
                ));
            }
        }
        let challenge = self
            .inner
            .challenges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ep.host)
            .cloned();
        match challenge {
            // The host's scheme is known: get a token for this scope now instead of waiting for a 401.
            Some(Challenge::Bearer { realm, service, .. }) => {
                let (t, used) = self
                    .fetch_token(ep, &realm, service.as_deref(), scope)
                    .await?;
                Ok((Some(secret_header(&format!("Bearer {t}"))?), used))
            }
            Some(Challenge::Basic) => match self.credential(ep, scope).await? {
                Some(Credential::Basic { username, password }) => {
                    let h = basic_header(&username, &password)?;
                    Ok((Some(h), Some(Credential::Basic { username, password })))
                }
                // Tokens do not answer a basic challenge.
                Some(_) => Err(self.unauthorized(ep, true)),
                None => Err(self.unauthorized(ep, false)),
            },
            None => Ok((None, None)),
        }
    }

    /// Handles a 401: learns the challenge and drops the stale token.
    fn authenticate(
        &self,
        ep: &Endpoint,
        scope: &Scope,
        header: Option<&str>,
        had_credentials: bool,
    ) -> Result<()> {
        let ch = header
            .and_then(parse_challenge)
            .ok_or_else(|| self.unauthorized(ep, had_credentials))?;
        tracing::debug!(host = %ep.host, scheme = match ch { Challenge::Basic => "basic", _ => "bearer" }, "registry asked for authentication");
        self.drop_token(ep, scope);
        self.inner
            .challenges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ep.host.clone(), ch);
        Ok(())
    }

    async fn fetch_token(
        &self,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
        scope: &Scope,
    ) -> Result<(String, Option<Credential>)> {
        let cred = self.credential(ep, scope).await?;
        if let Some(Credential::RegistryToken(t)) = &cred {
            // Sent as is; kept like a fetched token, so a 401 drops it as well.
            let mut cached = CachedToken::new(t.clone(), None);
            cached.credential = cred.clone();
            self.inner
                .tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((ep.host.clone(), scope.key()), cached);
            return Ok((t.clone(), cred));
        }
        self.inner.metrics.request(RequestKind::Token);
        let res = self
            .fetch_token_once(ep, realm, service, scope, cred.as_ref())
            .await;
        if res.is_err() {
            self.inner.metrics.error(RequestKind::Token);
        }
        res.map(|t| (t, cred))
    }

    async fn fetch_token_once(
        &self,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
        scope: &Scope,
        cred: Option<&Credential>,
    ) -> Result<String> {
        let mut url = Url::parse(realm)
            .map_err(|e| Error::protocol(&ep.host, format!("bad token realm: {e}")))?;
        let timeout = ep.timeout.unwrap_or(Duration::from_secs(
            crate::config::DEFAULT_REQUEST_TIMEOUT_SEC as u64,
        ));
        let resp = match cred {
            Some(Credential::IdentityToken(rt)) => {
                // Built before the await: the serializer is not Send, and reads of
                // blobs run as spawned tasks on the runtime.
                let body = {
                    let mut form = url::form_urlencoded::Serializer::new(String::new());
                    form.append_pair("grant_type", "refresh_token")
                        .append_pair("refresh_token", rt)
                        .append_pair("client_id", "stargz-rs");
                    if let Some(s) = service {
                        form.append_pair("service", s);
                    }
                    for s in &scope.0 {
                        form.append_pair("scope", s);
                    }
                    form.finish()
                };
                ep.client
                    .post(url.clone())
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(body)
                    .timeout(timeout)
                    .send()
                    .await
            }
            other => {
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    for s in &scope.0 {
                        q.append_pair("scope", s);
                    }
                }
                let mut rb = ep.client.get(url.clone()).timeout(timeout);
                if let Some(Credential::Basic { username, password }) = other {
                    rb = rb.header(AUTHORIZATION, basic_header(username, password)?);
                }
                rb.send().await
            }
        };
        let realm_host = url.host_str().unwrap_or("").to_string();
        let resp = resp.map_err(|e| Error::from_reqwest(&realm_host, timeout, &e))?;
        match resp.status().as_u16() {
            200 => {}
            401 | 403 => {
                if let Some(c) = cred {
                    self.reject(ep, scope, c);
                }
                return Err(self.unauthorized(ep, cred.is_some()));
            }
            s => {
                return Err(Error::Status {
                    method: "token".into(),
                    url: format!("{}://{}{}", url.scheme(), realm_host, url.path()),
                    status: s,
                    body: body_snippet(resp).await,
                })
            }
        }
        let body = crate::body::read_limited(
            resp,
            &realm_host,
            crate::body::MAX_TOKEN_BYTES,
            "token response",
        )
        .await?;
        let tr: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| Error::protocol(&realm_host, format!("bad token response: {e}")))?;
        let token = tr
            .token
            .or(tr.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::protocol(&realm_host, "token response without a token"))?;
        tracing::debug!(host = %ep.host, scope = %scope.key(), expires_in = ?tr.expires_in, "got bearer token");
        self.inner
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((ep.host.clone(), scope.key()), {
                let mut t = CachedToken::new(token.clone(), tr.expires_in);
                t.credential = cred.cloned();
                t
            });
        Ok(token)
    }

    /// Runs `f` against each endpoint in turn until one succeeds; the last error wins.
    pub(crate) async fn with_endpoints<T, F, Fut>(&self, registry: &str, mut f: F) -> Result<T>
    where
        F: FnMut(Endpoint) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let eps = self.endpoints(registry)?;
        let n = eps.len();
        let mut last = None;
        for (i, ep) in eps.into_iter().enumerate() {
            let host = ep.host.clone();
            match f(ep).await {
                Ok(v) => return Ok(v),
                Err(e @ Error::DigestMismatch { .. }) => return Err(e),
                Err(e) => {
                    if i + 1 < n {
                        tracing::warn!(endpoint = %host, error = %e, "endpoint failed, trying the next one");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Config(format!("no endpoint for {registry}"))))
    }

    /// A deadline for a whole operation, from the blob fetching timeout.
    pub(crate) fn deadline(&self) -> Instant {
        let now = Instant::now();
        now.checked_add(Duration::from_secs(self.inner.blob.fetching_timeout_sec))
            .unwrap_or(now + MAX_RETRY_AFTER)
    }
}

fn location(resp: &Response, base: &Url) -> Option<Url> {
    let loc = resp.headers().get(LOCATION)?.to_str().ok()?;
    base.join(loc).ok()
}

fn secret_header(v: &str) -> Result<HeaderValue> {
    let mut h = HeaderValue::from_str(v).map_err(|_| {
        Error::Config("credential contains characters not allowed in a header".into())
    })?;
    h.set_sensitive(true);
    Ok(h)
}

fn basic_header(user: &str, pass: &str) -> Result<HeaderValue> {
    use base64::Engine;
    secret_header(&format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    ))
}

/// Longest wait a registry's `Retry-After` can ask for; longer values are clamped.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

pub(crate) fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(s) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(s).min(MAX_RETRY_AFTER));
    }
    let t = httpdate::parse_http_date(v).ok()?;
    Some(
        t.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .min(MAX_RETRY_AFTER),
    )
}

/// The start of an error body, for messages; registries put their error JSON there.
/// Reads a bounded prefix only: an endless error body costs nothing.
pub(crate) async fn body_snippet(resp: Response) -> String {
    let b = crate::body::read_prefix(resp, crate::body::ERROR_SNIPPET_BYTES as u64).await;
    let s = String::from_utf8_lossy(&b[..b.len().min(crate::body::ERROR_SNIPPET_BYTES)])
        .trim()
        .to_string();
    if s.is_empty() {
        "(empty body)".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `warm_up` builds the clients of HTTPS and plain-HTTP endpoints in the
    /// background, and the endpoints a pull asks for later reuse them.
    #[test]
    fn warm_up_builds_the_http_clients_ahead() {
        let client = Client::anonymous();
        assert_eq!(client.http_clients_built(), 0);
        client.warm_up();
        let deadline = Instant::now() + Duration::from_secs(20);
        while client.http_clients_built() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(client.http_clients_built(), 2, "HTTPS and plain HTTP");
        client.endpoints("ghcr.io").expect("endpoints");
        client.endpoints("127.0.0.1:5000").expect("endpoints");
        assert_eq!(client.http_clients_built(), 2, "nothing new built");
    }

    #[test]
    fn retry_after() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("junk"), None);
        assert_eq!(
            parse_retry_after("18446744073709551615"),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT"),
            Some(MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn endpoints_order_and_scheme() {
        let cfg = RegistryConfig::from_toml(
            r#"
[[resolver.host."example.com".mirrors]]
host = "m1.example"
[[resolver.host."example.com".mirrors]]
host = "m2.example:8080"
insecure = true
"#,
        )
        .expect("cfg");
        let c = Client::new(cfg, Arc::new(Anonymous)).expect("client");
        let eps = c.endpoints("example.com").expect("eps");
        let urls: Vec<String> = eps.iter().map(|e| e.base.to_string()).collect();
        assert_eq!(
            urls,
            [
                "https://m1.example/v2/",
                "http://m2.example:8080/v2/",
                "https://example.com/v2/"
            ]
        );
        let eps = c.endpoints("docker.io").expect("hub");
        assert_eq!(eps[0].base.as_str(), "https://registry-1.docker.io/v2/");
        let eps = c.endpoints("localhost:5000").expect("local");
        assert_eq!(eps[0].base.as_str(), "http://localhost:5000/v2/");
    }
}
