//! A token server for the registry's `auth.token` mode: signs RS256 JWTs
//! (with the signing certificate in `x5c`) granting the requested scopes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use http_body_util::BodyExt;
use hyper::{Method, Request};

use crate::http::{respond, serve, Handler};
use crate::registry::TokenAuthConfig;
use crate::tls::TokenSigner;

/// Issuer behaviour.
#[derive(Clone, Default)]
pub struct IssuerOpts {
    /// Require basic auth with this user on GET (None: anonymous tokens).
    pub user: Option<(String, String)>,
    /// Refresh tokens accepted by the OAuth2 POST flow.
    pub refresh_tokens: Vec<String>,
    /// `expires_in` reported to clients (seconds; 0 means omit it).
    pub expires_in: u64,
    /// The first N tokens are already expired for the registry (even with its
    /// 60 s leeway) while claiming a long life, to exercise refresh on 401.
    pub stale_first: usize,
    /// Seconds after which the registry refuses each token (its 60 s leeway taken
    /// into account), whatever `expires_in` claims; 0: the claimed life. Tokens that
    /// expire under a client that still trusts them, as real ones do.
    pub registry_life: u64,
}

/// A running token issuer. Aborted on drop.
pub struct TokenIssuer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    requests: Arc<AtomicUsize>,
    pub service: String,
    pub issuer: String,
    signer_cert: std::path::PathBuf,
}

struct State {
    opts: IssuerOpts,
    signer: TokenSigner,
    service: String,
    issuer: String,
    requests: Arc<AtomicUsize>,
}

impl TokenIssuer {
    /// Starts an issuer; signing material goes into `dir`.
    pub async fn start(dir: &std::path::Path, opts: IssuerOpts) -> TokenIssuer {
        let signer = TokenSigner::create(dir);
        let signer_cert = signer.cert.clone();
        let requests = Arc::new(AtomicUsize::new(0));
        let state = Arc::new(State {
            opts,
            signer,
            service: "testenv-registry".into(),
            issuer: "testenv-issuer".into(),
            requests: requests.clone(),
        });
        let st = state.clone();
        let handler: Handler = Arc::new(move |req| {
            let st = st.clone();
            Box::pin(async move { handle(&st, req).await })
        });
        let (addr, task) = serve(handler).await;
        TokenIssuer {
            addr,
            task,
            requests,
            service: state.service.clone(),
            issuer: state.issuer.clone(),
            signer_cert,
        }
    }

    /// The registry configuration pointing at this issuer.
    pub fn registry_config(&self) -> TokenAuthConfig {
        TokenAuthConfig {
            realm: format!("http://{}/token", self.addr),
            service: self.service.clone(),
            issuer: self.issuer.clone(),
            root_cert_bundle: self.signer_cert.clone(),
        }
    }

    /// Token requests answered with a token so far.
    pub fn tokens_issued(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    st: &State,
    req: Request<hyper::body::Incoming>,
) -> hyper::Response<crate::http::Body> {
    let mut params: Vec<(String, String)> =
        url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let method = req.method().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let account;
    if method == Method::POST {
        params.extend(url::form_urlencoded::parse(&body).into_owned());
        let get = |k: &str| params.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
        if get("grant_type").as_deref() != Some("refresh_token") {
            return respond(400, "unsupported grant_type");
        }
        match get("refresh_token") {
            Some(t) if st.opts.refresh_tokens.contains(&t) => account = "refresh-user".to_string(),
            _ => return respond(401, r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#),
        }
    } else if let Some((u, p)) = &st.opts.user {
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        );
        if auth.as_deref() != Some(want.as_str()) {
            return respond(401, r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#);
        }
        account = u.clone();
    } else {
        account = "anonymous".into();
    }
    let mut access = Vec::new();
    for (k, v) in &params {
        if k != "scope" {
            continue;
        }
        for one in v.split(' ') {
            // repository:NAME:ACTIONS, where NAME may itself contain ':' (host:port) only in theory.
            let mut it = one.rsplitn(2, ':');
            let (Some(actions), Some(rest)) = (it.next(), it.next()) else {
                continue;
            };
            let Some((typ, name)) = rest.split_once(':') else {
                continue;
            };
            access.push(serde_json::json!({"type": typ, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}));
        }
    }
    let n = st.requests.fetch_add(1, Ordering::SeqCst);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let stale = n < st.opts.stale_first;
    let life = if st.opts.expires_in == 0 {
        300
    } else {
        st.opts.expires_in.max(1)
    };
    let (nbf, exp) = if stale {
        (now - 600, now - 300)
    } else if st.opts.registry_life > 0 {
        // distribution accepts a token until 60 s past its `exp`.
        (now - 5, (now + st.opts.registry_life).saturating_sub(60))
    } else {
        // The reply may claim any lifetime; the JWT itself stays within ten years.
        (now - 5, now + life.min(10 * 365 * 86400))
    };
    let claims = serde_json::json!({
        "iss": st.issuer, "sub": account, "aud": st.service,
        "exp": exp, "nbf": nbf, "iat": nbf, "jti": format!("jti-{n}-{now}"),
        "access": access,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.x5c = Some(vec![st.signer.cert_der_b64.clone()]);
    let key = match jsonwebtoken::EncodingKey::from_rsa_pem(&st.signer.key_pem) {
        Ok(k) => k,
        Err(e) => return respond(500, format!("key: {e}")),
    };
    let token = match jsonwebtoken::encode(&header, &claims, &key) {
        Ok(t) => t,
        Err(e) => return respond(500, format!("sign: {e}")),
    };
    let mut body: HashMap<&str, serde_json::Value> = HashMap::new();
    body.insert("token", token.clone().into());
    body.insert("access_token", token.into());
    if st.opts.expires_in > 0 {
        body.insert("expires_in", st.opts.expires_in.into());
    }
    let mut r = respond(200, serde_json::to_vec(&body).unwrap_or_default());
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}
