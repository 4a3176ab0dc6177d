//! A fake Kubernetes API server speaking the list/watch wire format for
//! secrets (`GET /api/v1/secrets`, `?watch=true`), with bearer-token checks,
//! resource versions, `410 Gone` for expired versions, and calls for tests to
//! add, modify and delete secrets while watches are open.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::http::{respond, serve, Body, BoxError, Handler};

/// The secret type the kubeconfig keychain watches.
pub const DOCKERCONFIGJSON: &str = "kubernetes.io/dockerconfigjson";

/// A running fake API server; aborted on drop.
pub struct FakeKubeApi {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    state: Arc<State>,
}

#[derive(Clone, Debug)]
enum Msg {
    Event {
        rv: u64,
        line: Bytes,
    },
    /// Ends every open watch stream (as an API server restart or timeout would).
    Close,
}

struct Store {
    rv: u64,
    /// Versions at or below this are "too old" for a watch (compacted away).
    compacted: u64,
    secrets: BTreeMap<(String, String), Value>,
    /// (rv, type, object) of every change, for watches resuming from an older version.
    history: Vec<(u64, String, Value)>,
}

struct State {
    token: String,
    store: Mutex<Store>,
    tx: broadcast::Sender<Msg>,
    lists: AtomicUsize,
    watches: AtomicUsize,
    gone: AtomicUsize,
    unauthorized: AtomicUsize,
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl FakeKubeApi {
    /// Starts a server accepting `Authorization: Bearer <token>`.
    pub async fn start(token: &str) -> FakeKubeApi {
        let (tx, _) = broadcast::channel(1024);
        let state = Arc::new(State {
            token: token.to_string(),
            store: Mutex::new(Store {
                rv: 100,
                compacted: 0,
                secrets: BTreeMap::new(),
                history: Vec::new(),
            }),
            tx,
            lists: AtomicUsize::new(0),
            watches: AtomicUsize::new(0),
            gone: AtomicUsize::new(0),
            unauthorized: AtomicUsize::new(0),
        });
        let st = state.clone();
        let handler: Handler = Arc::new(move |req| {
            let st = st.clone();
            Box::pin(async move { handle(&st, req).await })
        });
        let (addr, task) = serve(handler).await;
        FakeKubeApi { addr, task, state }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig YAML pointing at this server with its token.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\nusers:\n- name: fake\n  user:\n    token: {}\ncurrent-context: fake\n",
            self.url(),
            self.state.token
        )
    }

    /// `.dockerconfigjson` content granting `user:pass` on `host`.
    pub fn docker_config_json(host: &str, user: &str, pass: &str) -> String {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        json!({"auths": {host: {"auth": auth}}}).to_string()
    }

    /// Creates or replaces a `kubernetes.io/dockerconfigjson` secret.
    pub fn put_docker_secret(&self, namespace: &str, name: &str, dockerconfigjson: &str) {
        self.put_secret(
            namespace,
            name,
            DOCKERCONFIGJSON,
            &[(".dockerconfigjson", dockerconfigjson.as_bytes())],
        );
    }

    /// Creates (ADDED) or replaces (MODIFIED) a secret of any type.
    pub fn put_secret(&self, namespace: &str, name: &str, typ: &str, data: &[(&str, &[u8])]) {
        let b64 = base64::engine::general_purpose::STANDARD;
        let data: serde_json::Map<String, Value> = data
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(b64.encode(v))))
            .collect();
        let mut s = self.state.lock();
        s.rv += 1;
        let rv = s.rv;
        let key = (namespace.to_string(), name.to_string());
        let kind = if s.secrets.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let obj = json!({
            "kind": "Secret", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": rv.to_string(),
                         "uid": format!("uid-{namespace}-{name}")},
            "type": typ, "data": data,
        });
        s.secrets.insert(key, obj.clone());
        self.record(&mut s, rv, kind, obj);
    }

    /// Deletes a secret (DELETED event); false when it did not exist.
    pub fn delete_secret(&self, namespace: &str, name: &str) -> bool {
        let mut s = self.state.lock();
        let Some(mut obj) = s.secrets.remove(&(namespace.to_string(), name.to_string())) else {
            return false;
        };
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        self.record(&mut s, rv, "DELETED", obj);
        true
    }

    /// Forgets the change history: every version issued so far becomes too
    /// old to watch from (`410 Gone`), and open watches are closed, so
    /// clients must list again.
    pub fn compact(&self) {
        let mut s = self.state.lock();
        s.compacted = s.rv;
        s.history.clear();
        s.rv += 1;
        let _ = self.state.tx.send(Msg::Close);
    }

    /// Closes open watches without expiring anything (clients resume watching).
    pub fn close_watches(&self) {
        let _ = self.state.tx.send(Msg::Close);
    }

    fn record(&self, s: &mut Store, rv: u64, kind: &str, obj: Value) {
        s.history.push((rv, kind.to_string(), obj.clone()));
        let line = event_line(kind, &obj);
        let _ = self.state.tx.send(Msg::Event { rv, line });
    }

    /// List requests answered.
    pub fn lists(&self) -> usize {
        self.state.lists.load(Ordering::SeqCst)
    }

    /// Watch requests answered (including those answered with 410).
    pub fn watches(&self) -> usize {
        self.state.watches.load(Ordering::SeqCst)
    }

    /// Watches answered with an expired-version (410) error event.
    pub fn gone(&self) -> usize {
        self.state.gone.load(Ordering::SeqCst)
    }

    /// Requests refused for a missing or wrong token.
    pub fn unauthorized(&self) -> usize {
        self.state.unauthorized.load(Ordering::SeqCst)
    }
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn event_line(kind: &str, obj: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let mut r = respond(code, serde_json::to_vec(v).unwrap_or_default());
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(st: &Arc<State>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let want = format!("Bearer {}", st.token);
    if req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        != Some(want.as_str())
    {
        st.unauthorized.fetch_add(1, Ordering::SeqCst);
        return json_response(401, &status(401, "Unauthorized", "Unauthorized"));
    }
    if req.uri().path() != "/api/v1/secrets" {
        return json_response(
            404,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    }
    let params: Vec<(String, String)> =
        url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let get = |k: &str| params.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    let type_filter = match get("fieldSelector") {
        None => None,
        Some(fs) => match fs.strip_prefix("type=") {
            Some(t) => Some(t.to_string()),
            None => {
                return json_response(
                    400,
                    &status(
                        400,
                        "BadRequest",
                        &format!("unsupported field selector {fs}"),
                    ),
                )
            }
        },
    };
    let matches = move |obj: &Value| {
        type_filter
            .as_deref()
            .is_none_or(|t| obj["type"].as_str() == Some(t))
    };
    if get("watch").as_deref() != Some("true") && get("watch").as_deref() != Some("1") {
        st.lists.fetch_add(1, Ordering::SeqCst);
        let s = st.lock();
        let items: Vec<Value> = s.secrets.values().filter(|o| matches(o)).cloned().collect();
        return json_response(
            200,
            &json!({"kind": "SecretList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
        );
    }
    st.watches.fetch_add(1, Ordering::SeqCst);
    let from: u64 = match get("resourceVersion").filter(|v| !v.is_empty()) {
        Some(v) => match v.parse() {
            Ok(n) => n,
            Err(_) => return json_response(400, &status(400, "BadRequest", "bad resourceVersion")),
        },
        None => 0,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let (backlog, mut sub, last) = {
        let s = st.lock();
        let sub = st.tx.subscribe();
        if from != 0 && from <= s.compacted {
            st.gone.fetch_add(1, Ordering::SeqCst);
            let msg = format!("too old resource version: {from} ({})", s.compacted + 1);
            let line = event_line("ERROR", &status(410, "Expired", &msg));
            drop(s);
            return stream_response(futures::stream::iter(vec![Ok::<_, BoxError>(Frame::data(
                line,
            ))]));
        }
        let backlog: Vec<Bytes> = if from == 0 {
            // No version: the current state as ADDED events, then changes.
            s.secrets
                .values()
                .filter(|o| matches(o))
                .map(|o| event_line("ADDED", o))
                .collect()
        } else {
            s.history
                .iter()
                .filter(|(rv, _, o)| *rv > from && matches(o))
                .map(|(_, k, o)| event_line(k, o))
                .collect()
        };
        (backlog, sub, s.rv)
    };
    let wants_bookmarks = get("allowWatchBookmarks").as_deref() == Some("true");
    tokio::spawn(async move {
        for line in backlog {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if wants_bookmarks {
            let bm = json!({"kind": "Secret", "apiVersion": "v1",
                            "metadata": {"resourceVersion": last.to_string()}});
            if tx.send(event_line("BOOKMARK", &bm)).await.is_err() {
                return;
            }
        }
        loop {
            match sub.recv().await {
                Ok(Msg::Event { rv, line }) => {
                    if rv <= last {
                        continue;
                    }
                    let obj: Value = serde_json::from_slice(&line).unwrap_or(Value::Null);
                    if !matches(&obj["object"]) {
                        continue;
                    }
                    if tx.send(line).await.is_err() {
                        return;
                    }
                }
                Ok(Msg::Close) | Err(broadcast::error::RecvError::Closed) => return,
                // A watcher that fell behind is cut off, as a real server would.
                Err(broadcast::error::RecvError::Lagged(_)) => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, BoxError>(Frame::data(b)), rx))
    });
    stream_response(stream)
}

fn stream_response(
    s: impl futures::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + Sync + 'static,
) -> Response<Body> {
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(s)));
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}
