//! Registry credentials for the store: the auth files Podman, Buildah and CRI-O write
//! (`podman login`), credentials handed over by the container engine through the
//! control socket, and the registry crate's keychains; combined per image repository,
//! since an auth file may scope a login to a namespace (`host/org`) of a registry.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use registry::{Credential, DockerConfigKeychain, Keychain, KeychainFuture, Reference};
use serde::Deserialize;

/// Most image references the hand-off remembers; the oldest go first.
const MAX_HANDOFF_ENTRIES: usize = 4096;

/// Why handed-over credentials were refused.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("credentials are not a JSON object of image references: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid image reference {reference:?}: {source}")]
    Reference {
        reference: String,
        #[source]
        source: registry::Error,
    },
}

/// One entry of a hand-off, in the shape containers/image sends.
#[derive(Deserialize)]
struct HandoffEntry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default, rename = "identityToken")]
    identity_token: String,
}

type RepoKey = (String, String);

/// Credentials the container engine handed over for the image references it pulls.
/// They are used for the reference's own registry only, never for its mirrors.
#[derive(Default)]
pub struct HandoffKeychain {
    inner: Mutex<Handoff>,
}

#[derive(Default)]
struct Handoff {
    creds: HashMap<RepoKey, Credential>,
    order: VecDeque<RepoKey>,
}

impl HandoffKeychain {
    /// Adds `{"<ref>": {"username","password","identityToken"}}`; an empty body adds
    /// nothing. Returns how many references were added.
    pub fn add_json(&self, data: &[u8]) -> Result<usize, HandoffError> {
        if data.iter().all(u8::is_ascii_whitespace) {
            return Ok(0);
        }
        let entries: HashMap<String, HandoffEntry> = serde_json::from_slice(data)?;
        let mut parsed = Vec::with_capacity(entries.len().min(MAX_HANDOFF_ENTRIES));
        for (r, e) in entries {
            let reference = Reference::parse(&r).map_err(|source| HandoffError::Reference {
                reference: r.clone(),
                source,
            })?;
            let cred = if !e.identity_token.is_empty() {
                Credential::IdentityToken(e.identity_token)
            } else if !e.username.is_empty() || !e.password.is_empty() {
                Credential::Basic {
                    username: e.username,
                    password: e.password,
                }
            } else {
                continue;
            };
            let key = (
                reference.registry().to_string(),
                reference.repository().to_string(),
            );
            parsed.push((key, cred));
        }
        let n = parsed.len();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (key, cred) in parsed {
            if inner.creds.insert(key.clone(), cred).is_none() {
                inner.order.push_back(key);
            }
            while inner.creds.len() > MAX_HANDOFF_ENTRIES {
                match inner.order.pop_front() {
                    Some(old) => {
                        inner.creds.remove(&old);
                    }
                    None => break,
                }
            }
        }
        Ok(n)
    }

    fn get(&self, registry: &str, repository: &str) -> Option<Credential> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .creds
            .get(&(registry.to_string(), repository.to_string()))
            .cloned()
    }
}

/// The auth files containers/image reads, in its order: `$REGISTRY_AUTH_FILE` alone
/// when set; else `$XDG_RUNTIME_DIR/containers/auth.json` (without it
/// `/run/containers/<uid>/auth.json`, and `/run/user/<uid>/containers/auth.json`,
/// where a login session of the same user writes it), then
/// `$XDG_CONFIG_HOME/containers/auth.json` (`~/.config` without it) and docker's
/// `config.json`.
pub fn default_auth_files() -> Vec<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(f) = env("REGISTRY_AUTH_FILE") {
        return vec![f];
    }
    let home = env("HOME").unwrap_or_else(|| PathBuf::from("/root"));
    let mut files = Vec::new();
    match env("XDG_RUNTIME_DIR") {
        Some(dir) => files.push(dir.join("containers/auth.json")),
        None => {
            // SAFETY: getuid(2) cannot fail and touches no memory.
            let uid = unsafe { libc::getuid() };
            files.push(PathBuf::from(format!("/run/containers/{uid}/auth.json")));
            files.push(PathBuf::from(format!(
                "/run/user/{uid}/containers/auth.json"
            )));
        }
    }
    let config = env("XDG_CONFIG_HOME").unwrap_or_else(|| home.join(".config"));
    let docker = env("DOCKER_CONFIG").unwrap_or_else(|| home.join(".docker"));
    files.push(config.join("containers/auth.json"));
    files.push(docker.join("config.json"));
    files
}

#[derive(Deserialize, Default)]
struct AuthFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: String,
    #[serde(default, alias = "identityToken")]
    identitytoken: String,
}

/// Most bytes read from one auth file.
const MAX_AUTH_FILE: u64 = 4 << 20;

/// What a key of `auths` names: a registry, or a namespace or repository in one.
/// Keys with a scheme are docker's legacy form and name the registry only.
fn normalize_key(key: &str) -> String {
    let (had_scheme, rest) = match key.split_once("://") {
        Some((_, rest)) => (true, rest),
        None => (false, key),
    };
    let key = if had_scheme {
        rest.split('/').next().unwrap_or(rest)
    } else {
        rest.trim_end_matches('/')
    };
    match key {
        "index.docker.io" | "registry-1.docker.io" => registry::DOCKER_HUB.to_string(),
        k => match k.split_once('/') {
            Some(("index.docker.io" | "registry-1.docker.io", path)) => {
                format!("{}/{path}", registry::DOCKER_HUB)
            }
            _ => k.to_string(),
        },
    }
}

fn decode_entry(e: &AuthEntry) -> Option<Credential> {
    if !e.identitytoken.is_empty() {
        return Some(Credential::IdentityToken(e.identitytoken.clone()));
    }
    if e.auth.is_empty() {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(e.auth.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some(Credential::Basic {
        username: u.to_string(),
        password: p.trim_end_matches('\0').to_string(),
    })
}

/// The most specific `auths` entry of `data` for `host/repository`: `host/a/b/c`,
/// then `host/a/b`, `host/a`, then `host`.
fn match_auths(data: &[u8], host: &str, repository: &str) -> Option<Credential> {
    let file: AuthFile = serde_json::from_slice(data).ok()?;
    let entries: HashMap<String, &AuthEntry> = file
        .auths
        .iter()
        .map(|(k, v)| (normalize_key(k), v))
        .collect();
    let host = normalize_key(host);
    let mut scope = if repository.is_empty() {
        host.clone()
    } else {
        format!("{host}/{repository}")
    };
    loop {
        if let Some(c) = entries.get(&scope).and_then(|e| decode_entry(e)) {
            return Some(c);
        }
        match scope.rsplit_once('/') {
            Some((parent, _)) if parent.len() >= host.len() => scope = parent.to_string(),
            _ => return None,
        }
    }
}

/// Reads the auth files in order; the first with an entry for the repository (or
/// its registry, or a credential helper that knows the registry) wins.
#[derive(Clone, Debug)]
pub struct AuthFilesKeychain {
    files: Vec<PathBuf>,
}

impl AuthFilesKeychain {
    pub fn new(files: Vec<PathBuf>) -> Self {
        AuthFilesKeychain { files }
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    async fn lookup(&self, host: &str, repository: &str) -> registry::Result<Option<Credential>> {
        for path in &self.files {
            let Some(data) = read_bounded(path).await else {
                continue;
            };
            if let Some(c) = match_auths(&data, host, repository) {
                return Ok(Some(c));
            }
            // credHelpers and credsStore (and host-level auths) as docker reads them.
            if let Some(c) = DockerConfigKeychain::from_path(path).resolve(host).await? {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }
}

async fn read_bounded(path: &Path) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let f = tokio::fs::File::open(path).await.ok()?;
    let mut data = Vec::new();
    f.take(MAX_AUTH_FILE).read_to_end(&mut data).await.ok()?;
    Some(data)
}

impl Keychain for AuthFilesKeychain {
    fn resolve<'a>(&'a self, host: &'a str) -> KeychainFuture<'a> {
        Box::pin(self.lookup(host, ""))
    }
    fn resolve_image<'a>(&'a self, host: &'a str, repository: &'a str) -> KeychainFuture<'a> {
        Box::pin(self.lookup(host, repository))
    }
    fn describe(&self) -> String {
        let names: Vec<String> = self.files.iter().map(|p| p.display().to_string()).collect();
        format!("auth files {}", names.join(", "))
    }
}

/// Every credential source of the store, asked for one repository: the hand-off (for
/// the reference's own registry only), the auth files, then the other keychains.
pub struct Credentials {
    pub handoff: Arc<HandoffKeychain>,
    pub files: AuthFilesKeychain,
    pub others: Vec<Arc<dyn Keychain>>,
}

impl Credentials {
    /// The keychain for pulling `repository` of `registry` (and its mirrors).
    pub fn for_repository(self: &Arc<Self>, registry: &str, repository: &str) -> RepoKeychain {
        RepoKeychain {
            all: self.clone(),
            registry: registry.to_string(),
            repository: repository.to_string(),
        }
    }
}

/// [`Credentials`] bound to one repository, as the registry client asks by host.
pub struct RepoKeychain {
    all: Arc<Credentials>,
    registry: String,
    repository: String,
}

impl Keychain for RepoKeychain {
    fn resolve<'a>(&'a self, host: &'a str) -> KeychainFuture<'a> {
        Box::pin(async move {
            if host == self.registry {
                if let Some(c) = self.all.handoff.get(&self.registry, &self.repository) {
                    return Ok(Some(c));
                }
            }
            if let Some(c) = self.all.files.lookup(host, &self.repository).await? {
                return Ok(Some(c));
            }
            for k in &self.all.others {
                if let Some(c) = k.resolve_image(host, &self.repository).await? {
                    return Ok(Some(c));
                }
            }
            Ok(None)
        })
    }
    fn describe(&self) -> String {
        let mut parts = vec![
            "credentials handed over by the engine".to_string(),
            self.all.files.describe(),
        ];
        parts.extend(self.all.others.iter().map(|k| k.describe()));
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    fn basic(u: &str, p: &str) -> Option<Credential> {
        Some(Credential::Basic {
            username: u.into(),
            password: p.into(),
        })
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn auth_file_scopes() {
        let data = serde_json::to_vec(&serde_json::json!({"auths": {
            "reg.example:5000": {"auth": b64("host:h")},
            "reg.example:5000/team": {"auth": b64("team:t")},
            "reg.example:5000/team/app": {"auth": b64("app:a:b")},
            "https://index.docker.io/v1/": {"auth": b64("hub:x")},
            "other.example": {"identitytoken": "tok"},
        }}))
        .unwrap();
        let m = |h, r| match_auths(&data, h, r);
        assert_eq!(m("reg.example:5000", "team/app"), basic("app", "a:b"));
        assert_eq!(m("reg.example:5000", "team/app2"), basic("team", "t"));
        assert_eq!(m("reg.example:5000", "teamx/app"), basic("host", "h"));
        assert_eq!(m("reg.example:5000", ""), basic("host", "h"));
        assert_eq!(m("docker.io", "library/alpine"), basic("hub", "x"));
        assert_eq!(
            m("other.example", "a"),
            Some(Credential::IdentityToken("tok".into()))
        );
        assert_eq!(m("reg.example", "team/app"), None);
    }

    #[test]
    fn handoff_is_per_repository() {
        let k = HandoffKeychain::default();
        let n = k
            .add_json(
                br#"{"127.0.0.1:5000/private/img:v1": {"username": "u", "password": "p"},
                     "docker.io/library/alpine:3": {"identityToken": "t"},
                     "127.0.0.1:5000/empty:v1": {}}"#,
            )
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(k.get("127.0.0.1:5000", "private/img"), basic("u", "p"));
        assert_eq!(k.get("127.0.0.1:5000", "private/other"), None);
        assert_eq!(
            k.get("docker.io", "library/alpine"),
            Some(Credential::IdentityToken("t".into()))
        );
        assert_eq!(k.add_json(b"  ").unwrap(), 0);
        assert!(k.add_json(b"[1]").is_err());
        assert!(k
            .add_json(br#"{"UPPER/Case:x": {"username": "u"}}"#)
            .is_err());
    }

    #[tokio::test]
    async fn repository_keychain_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth.json");
        std::fs::write(
            &file,
            serde_json::to_vec(&serde_json::json!({"auths": {
                "reg.example": {"auth": b64("file:f")},
                "mirror.example": {"auth": b64("mirror:m")},
            }}))
            .unwrap(),
        )
        .unwrap();
        let handoff = Arc::new(HandoffKeychain::default());
        handoff
            .add_json(br#"{"reg.example/app:1": {"username": "alice", "password": "s3cret"}}"#)
            .unwrap();
        let all = Arc::new(Credentials {
            handoff,
            files: AuthFilesKeychain::new(vec![dir.path().join("missing.json"), file]),
            others: Vec::new(),
        });
        let k = all.for_repository("reg.example", "app");
        assert_eq!(
            k.resolve("reg.example").await.unwrap(),
            basic("alice", "s3cret")
        );
        // Mirrors never get the handed-over credentials.
        assert_eq!(
            k.resolve("mirror.example").await.unwrap(),
            basic("mirror", "m")
        );
        let k = all.for_repository("reg.example", "other");
        assert_eq!(k.resolve("reg.example").await.unwrap(), basic("file", "f"));
        let d = k.describe();
        assert!(!d.contains("alice") && !d.contains("s3cret"), "{d}");
    }
}
