//! Credentials: the [`Keychain`] trait and the keychains shipped with the
//! crate (docker `config.json` with helpers, static `user:pass`, chains).

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use crate::error::{Error, Result};

/// A secret for one registry host. `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// Username and password (or a personal access token as password).
    Basic { username: String, password: String },
    /// A refresh token for the OAuth2 token endpoint (docker's `identitytoken`).
    IdentityToken(String),
    /// A bearer token sent to the registry as is (docker's `registrytoken`, the
    /// CRI's `registry_token`): no token endpoint is asked.
    RegistryToken(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credential::IdentityToken(_) => write!(f, "IdentityToken(<redacted>)"),
            Credential::RegistryToken(_) => write!(f, "RegistryToken(<redacted>)"),
        }
    }
}

/// Boxed future returned by [`Keychain::resolve`].
pub type KeychainFuture<'a> = Pin<Box<dyn Future<Output = Result<Option<Credential>>> + Send + 'a>>;

/// Boxed future returned by [`Keychain::candidates`].
pub type CandidatesFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<Credential>>> + Send + 'a>>;

/// A source of credentials, looked up by registry host (`host[:port]`).
///
/// Object safe so keychains can be chained and plugged in at run time.
pub trait Keychain: Send + Sync {
    /// The credential for `host`, or `None` to go anonymous.
    fn resolve<'a>(&'a self, host: &'a str) -> KeychainFuture<'a>;

    /// The credential for pulling `repository` (`org/app`, no tag) from
    /// `host`. Sources that scope credentials finer than a host (kubelet
    /// credential providers match path prefixes) override this; the default
    /// asks [`Keychain::resolve`].
    fn resolve_image<'a>(&'a self, host: &'a str, repository: &'a str) -> KeychainFuture<'a> {
        let _ = repository;
        self.resolve(host)
    }

    /// Every credential the source has for `repository` on `host`, best first. The
    /// client asks for them only after the registry refused the first answer of
    /// [`Keychain::resolve_image`] (an expired token, a revoked password), to go on
    /// with the next source's. A single source has at most that one answer.
    fn candidates<'a>(&'a self, host: &'a str, repository: &'a str) -> CandidatesFuture<'a> {
        Box::pin(async move {
            Ok(self
                .resolve_image(host, repository)
                .await?
                .into_iter()
                .collect())
        })
    }

    /// A human-readable name of the source (a path, "command line"...),
    /// used in error messages; never contains secrets.
    fn describe(&self) -> String;
}

/// No credentials at all.
#[derive(Clone, Copy, Debug, Default)]
pub struct Anonymous;

impl Keychain for Anonymous {
    fn resolve<'a>(&'a self, _host: &'a str) -> KeychainFuture<'a> {
        Box::pin(async { Ok(None) })
    }
    fn describe(&self) -> String {
        "no credentials (anonymous)".into()
    }
}

/// Fixed credentials, e.g. from `--user user:pass`, optionally only for one host.
#[derive(Clone)]
pub struct StaticKeychain {
    host: Option<String>,
    credential: Credential,
}

impl StaticKeychain {
    /// Credentials for every host (`host = None`) or for one host.
    pub fn new(host: Option<&str>, credential: Credential) -> Self {
        StaticKeychain {
            host: host.map(str::to_string),
            credential,
        }
    }

    /// Parses `user:pass` (the password may contain ':').
    pub fn from_user_pass(host: Option<&str>, user_pass: &str) -> Result<Self> {
        let (u, p) = user_pass
            .split_once(':')
            .ok_or_else(|| Error::Config("credentials must be given as user:password".into()))?;
        if u.is_empty() {
            return Err(Error::Config("empty user name in user:password".into()));
        }
        Ok(Self::new(
            host,
            Credential::Basic {
                username: u.to_string(),
                password: p.to_string(),
            },
        ))
    }
}

impl fmt::Debug for StaticKeychain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKeychain")
            .field("host", &self.host)
            .field("credential", &self.credential)
            .finish()
    }
}

impl Keychain for StaticKeychain {
    fn resolve<'a>(&'a self, host: &'a str) -> KeychainFuture<'a> {
        let hit = self.host.as_deref().is_none_or(|h| h == host);
        let c = hit.then(|| self.credential.clone());
        Box::pin(async move { Ok(c) })
    }
    fn describe(&self) -> String {
        match &self.host {
            Some(h) => format!("static credentials for {h}"),
            None => "static credentials".into(),
        }
    }
}

/// Docker's `config.json`: `auths` (`auth`, `username`/`password`,
/// `identitytoken`), `credHelpers` and `credsStore` (running
/// `docker-credential-*` helpers).
#[derive(Clone, Debug)]
pub struct DockerConfigKeychain {
    path: PathBuf,
}

impl DockerConfigKeychain {
    /// Uses `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub fn from_env() -> Self {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("/root"))
                    .join(".docker")
            });
        DockerConfigKeychain {
            path: dir.join("config.json"),
        }
    }

    /// Uses an explicit config file.
    pub fn from_path(path: impl AsRef<Path>) -> Self {
        DockerConfigKeychain {
            path: path.as_ref().to_path_buf(),
        }
    }

    /// The file this keychain reads.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Names under which docker stores Docker Hub credentials.
fn lookup_keys(host: &str) -> Vec<String> {
    match host {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => {
            vec!["https://index.docker.io/v1/".into(), "docker.io".into()]
        }
        h => vec![h.to_string()],
    }
}

impl Keychain for DockerConfigKeychain {
    fn resolve<'a>(&'a self, host: &'a str) -> KeychainFuture<'a> {
        let path = self.path.clone();
        let host = host.to_string();
        Box::pin(async move {
            let data = match tokio::fs::read(&path).await {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => {
                    return Err(Error::Io {
                        path: path.display().to_string(),
                        source: e,
                    })
                }
            };
            let source_name = path.display().to_string();
            // Helpers are external programs run synchronously by docker_credential.
            tokio::task::spawn_blocking(move || {
                use docker_credential::{CredentialRetrievalError as E, DockerCredential as D};
                for key in lookup_keys(&host) {
                    match docker_credential::get_credential_from_reader(data.as_slice(), &key) {
                        Ok(D::UsernamePassword(username, password)) => {
                            return Ok(Some(Credential::Basic { username, password }));
                        }
                        Ok(D::IdentityToken(t)) => return Ok(Some(Credential::IdentityToken(t))),
                        Err(E::NoCredentialConfigured) => continue,
                        Err(E::HelperFailure { helper, stderr, .. }) => {
                            // A helper that knows nothing about the host is not an error.
                            if stderr.contains("not found") || stderr.is_empty() {
                                continue;
                            }
                            return Err(Error::Credentials {
                                source_name,
                                detail: format!(
                                    "helper docker-credential-{helper} failed: {}",
                                    stderr.trim()
                                ),
                            });
                        }
                        Err(e) => {
                            return Err(Error::Credentials {
                                source_name,
                                detail: e.to_string(),
                            })
                        }
                    }
                }
                Ok(None)
            })
            .await
            .map_err(|e| Error::Credentials {
                source_name: "docker config".into(),
                detail: e.to_string(),
            })?
        })
    }
    fn describe(&self) -> String {
        format!("docker config {}", self.path.display())
    }
}

/// Tries keychains in order; the first that has a credential wins.
#[derive(Clone, Default)]
pub struct ChainKeychain {
    chain: Vec<Arc<dyn Keychain>>,
}

impl ChainKeychain {
    /// An empty chain (anonymous).
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a keychain, builder style.
    pub fn with(mut self, k: Arc<dyn Keychain>) -> Self {
        self.chain.push(k);
        self
    }
}

impl ChainKeychain {
    async fn first(&self, host: &str, repository: Option<&str>) -> Result<Option<Credential>> {
        for k in &self.chain {
            let got = match repository {
                Some(r) => k.resolve_image(host, r).await,
                None => k.resolve(host).await,
            };
            match got {
                Ok(Some(c)) => return Ok(Some(c)),
                Ok(None) => {}
                // One broken source should not hide the others; say so and go on.
                Err(e) => {
                    tracing::warn!(source = %k.describe(), error = %e, "credential source failed")
                }
            }
        }
        Ok(None)
    }
}

impl Keychain for ChainKeychain {
    fn resolve<'a>(&'a self, host: &'a str) -> KeychainFuture<'a> {
        Box::pin(self.first(host, None))
    }
    fn resolve_image<'a>(&'a self, host: &'a str, repository: &'a str) -> KeychainFuture<'a> {
        Box::pin(self.first(host, Some(repository)))
    }
    fn candidates<'a>(&'a self, host: &'a str, repository: &'a str) -> CandidatesFuture<'a> {
        Box::pin(async move {
            let mut out: Vec<Credential> = Vec::new();
            for k in &self.chain {
                match k.candidates(host, repository).await {
                    Ok(found) => {
                        for c in found {
                            if !out.contains(&c) {
                                out.push(c);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(source = %k.describe(), error = %e, "credential source failed")
                    }
                }
            }
            Ok(out)
        })
    }
    fn describe(&self) -> String {
        if self.chain.is_empty() {
            return Anonymous.describe();
        }
        self.chain
            .iter()
            .map(|k| k.describe())
            .collect::<Vec<_>>()
            .join(", then ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[tokio::test]
    async fn docker_config_auths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        std::fs::write(
            &p,
            format!(
                r#"{{"auths":{{"a.example":{{"auth":"{auth}"}},"b.example":{{"identitytoken":"tok"}},"https://index.docker.io/v1/":{{"username":"bob","password":"pw"}}}}}}"#
            ),
        )
        .expect("write");
        let k = DockerConfigKeychain::from_path(&p);
        let a = k.resolve("a.example").await.expect("a");
        assert_eq!(
            a,
            Some(Credential::Basic {
                username: "alice".into(),
                password: "s3cr:et".into()
            })
        );
        assert_eq!(
            k.resolve("b.example").await.expect("b"),
            Some(Credential::IdentityToken("tok".into()))
        );
        assert!(
            matches!(k.resolve("docker.io").await.expect("hub"), Some(Credential::Basic { username, .. }) if username == "bob")
        );
        assert_eq!(k.resolve("c.example").await.expect("c"), None);
        let dbg = format!("{a:?}");
        assert!(!dbg.contains("s3cr"), "{dbg}");
        let missing = DockerConfigKeychain::from_path(dir.path().join("nope.json"));
        assert_eq!(missing.resolve("a.example").await.expect("missing"), None);
    }

    #[tokio::test]
    async fn chain_and_static() {
        let s = StaticKeychain::from_user_pass(Some("h:1"), "u:p:q").expect("static");
        let chain = ChainKeychain::new()
            .with(Arc::new(Anonymous))
            .with(Arc::new(s));
        assert_eq!(
            chain.resolve("h:1").await.expect("h"),
            Some(Credential::Basic {
                username: "u".into(),
                password: "p:q".into()
            })
        );
        assert_eq!(chain.resolve("other").await.expect("o"), None);
        assert!(StaticKeychain::from_user_pass(None, "nocolon").is_err());
        // Every source's answer, in chain order, each once.
        let first = StaticKeychain::from_user_pass(Some("h:1"), "a:1").expect("first");
        let again = StaticKeychain::from_user_pass(None, "a:1").expect("again");
        let second = StaticKeychain::new(None, Credential::RegistryToken("t".into()));
        let chain = ChainKeychain::new()
            .with(Arc::new(first))
            .with(Arc::new(again))
            .with(Arc::new(second));
        let all = chain.candidates("h:1", "org/app").await.expect("all");
        assert_eq!(
            all,
            [
                Credential::Basic {
                    username: "a".into(),
                    password: "1".into()
                },
                Credential::RegistryToken("t".into())
            ]
        );
        assert_eq!(
            format!("{:?}", all[1]),
            "RegistryToken(<redacted>)",
            "no secret in Debug"
        );
    }
}
