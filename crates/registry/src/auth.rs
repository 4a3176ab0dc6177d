//! Registry authentication: parsing `WWW-Authenticate` challenges, fetching
//! bearer tokens (anonymous, basic-authenticated, or OAuth2 refresh-token),
//! and caching them per (host, scope).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A parsed authentication challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// Parses a `WWW-Authenticate` value. Returns `None` for schemes we do not speak.
pub(crate) fn parse_challenge(v: &str) -> Option<Challenge> {
    let v = v.trim();
    let (scheme, rest) = v.split_once(char::is_whitespace).unwrap_or((v, ""));
    let params = parse_params(rest);
    if scheme.eq_ignore_ascii_case("bearer") {
        let realm = params.get("realm")?.clone();
        Some(Challenge::Bearer {
            realm,
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        })
    } else if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic)
    } else {
        None
    }
}

/// Parses `k="v", k2=v2` (values quoted or bare, commas inside quotes kept).
fn parse_params(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b',' || b[i].is_ascii_whitespace()) {
            i += 1;
        }
        let ks = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' {
            i += 1;
        }
        let key = s[ks..i].trim().to_ascii_lowercase();
        if i >= b.len() || b[i] != b'=' {
            continue;
        }
        i += 1;
        let mut val = String::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                // Push whole UTF-8 characters, not bytes.
                let ch_len = s[i..].chars().next().map(char::len_utf8).unwrap_or(1);
                val.push_str(&s[i..i + ch_len]);
                i += ch_len;
            }
            i += 1;
        } else {
            let vs = i;
            while i < b.len() && b[i] != b',' {
                i += 1;
            }
            val = s[vs..i].trim().to_string();
        }
        if !key.is_empty() {
            out.insert(key, val);
        }
    }
    out
}

/// The JSON a token endpoint answers with.
#[derive(serde::Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

/// Longest a token is reused, whatever `expires_in` the token server sends.
pub(crate) const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A bearer token and when to stop using it. No `Debug`: it is a secret.
#[derive(Clone)]
pub(crate) struct CachedToken {
    pub token: String,
    pub valid_until: Instant,
    /// The credential the token was obtained with: the one to set aside when the
    /// registry refuses what it grants.
    pub credential: Option<crate::Credential>,
}

impl CachedToken {
    /// Tokens are dropped a little before the server's expiry so a request
    /// does not race the deadline.
    ///
    /// The lifetime comes from the token server and is clamped to
    /// [`MAX_TOKEN_LIFETIME`], so no value can overflow a deadline.
    pub fn new(token: String, expires_in: Option<u64>) -> Self {
        let secs = expires_in
            .filter(|s| *s > 0)
            .unwrap_or(60)
            .min(MAX_TOKEN_LIFETIME.as_secs());
        let life = Duration::from_secs(secs);
        let margin = (life / 10).min(Duration::from_secs(10));
        let now = Instant::now();
        CachedToken {
            token,
            valid_until: now.checked_add(life - margin).unwrap_or(now),
            credential: None,
        }
    }

    pub fn is_valid(&self) -> bool {
        Instant::now() < self.valid_until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
        let c = parse_challenge("bearer realm=http://h/t, service=s");
        assert!(matches!(c, Some(Challenge::Bearer { ref realm, .. }) if realm == "http://h/t"));
    }

    #[test]
    fn token_lifetime() {
        let t = CachedToken::new("x".into(), Some(1));
        assert!(t.is_valid());
        let t = CachedToken::new("x".into(), None);
        assert!(t.valid_until > Instant::now() + Duration::from_secs(49));
        let t = CachedToken::new("x".into(), Some(u64::MAX));
        assert!(t.is_valid());
        assert!(t.valid_until <= Instant::now() + MAX_TOKEN_LIFETIME);
    }
}
