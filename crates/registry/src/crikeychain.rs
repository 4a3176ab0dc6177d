//! [`CriKeychain`]: the credentials kubelet sent with CRI `PullImage` calls, kept per
//! image repository in a 0600 file, so a restart of the daemon (and the FUSE manager,
//! another process reading the same file) still has them for the layers it serves.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keychain::{Credential, Keychain, KeychainFuture};
use crate::reference::{Reference, DOCKER_HUB};

/// How long a captured credential is used after its last `PullImage`, by default.
pub const DEFAULT_CRI_CREDENTIAL_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Repositories remembered at most, by default; the least recently pulled go first.
pub const DEFAULT_CRI_MAX_ENTRIES: usize = 1024;
/// Longest file read back: far more than the entries allowed can take.
const MAX_FILE_BYTES: u64 = 64 << 20;
/// Longest secret (user name, password, token) accepted from a `PullImage`.
const MAX_SECRET_BYTES: usize = 16 << 10;
const FORMAT_VERSION: u32 = 1;

/// Where and how long [`CriKeychain`] keeps credentials.
#[derive(Clone, Debug)]
pub struct CriKeychainOptions {
    /// The file; `None` keeps them in memory only.
    pub path: Option<PathBuf>,
    /// Entries not refreshed by a `PullImage` for this long are dropped.
    pub ttl: Duration,
    /// Entries kept at most (least recently pulled dropped first).
    pub max_entries: usize,
}

impl Default for CriKeychainOptions {
    fn default() -> Self {
        CriKeychainOptions {
            path: None,
            ttl: DEFAULT_CRI_CREDENTIAL_TTL,
            max_entries: DEFAULT_CRI_MAX_ENTRIES,
        }
    }
}

/// A credential as stored; never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Stored {
    Basic { username: String, password: String },
    IdentityToken { token: String },
    RegistryToken { token: String },
}

impl From<&Credential> for Stored {
    fn from(c: &Credential) -> Self {
        match c.clone() {
            Credential::Basic { username, password } => Stored::Basic { username, password },
            Credential::IdentityToken(token) => Stored::IdentityToken { token },
            Credential::RegistryToken(token) => Stored::RegistryToken { token },
        }
    }
}

impl From<Stored> for Credential {
    fn from(s: Stored) -> Self {
        match s {
            Stored::Basic { username, password } => Credential::Basic { username, password },
            Stored::IdentityToken { token } => Credential::IdentityToken(token),
            Stored::RegistryToken { token } => Credential::RegistryToken(token),
        }
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    host: String,
    repository: String,
    #[serde(flatten)]
    credential: Stored,
    /// The CRI's `server_address`: the credential is for that host only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    server_host: Option<String>,
    /// Unix seconds of the `PullImage` that brought it.
    stored_at: u64,
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    entries: Vec<Entry>,
}

/// Identity of the file's content as last read or written.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
    len: u64,
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> FileId {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            len: m.len(),
        }
    }
}

type Key = (String, String);

#[derive(Default)]
struct State {
    entries: HashMap<Key, Entry>,
    /// What the entries were last read from or written to.
    file: Option<FileId>,
}

/// What [`CriKeychain::record`] replaced, to put back when the pull fails.
pub struct RecordedCredential {
    key: Key,
    entry: Entry,
    previous: Option<Entry>,
}

/// Credentials from CRI `PullImage` calls, per image repository: the keychain of the
/// reference's CRI proxy (`[cri_keychain]`), with the entries kept in a file.
///
/// Lookups are by the host and repository the client fetches from. A credential is
/// used only for the repository it was pulled with (never for the rest of its host),
/// and only for the host its `server_address` names when it names one.
pub struct CriKeychain {
    opts: CriKeychainOptions,
    state: Mutex<State>,
}

/// The key hosts are stored under: Docker Hub's names are one.
fn normalize_host(host: &str) -> String {
    let h = host.to_ascii_lowercase();
    match h.as_str() {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
        _ => h,
    }
}

/// The host a CRI `server_address` names (`https://host[:port]/path`, or a bare host).
fn server_host(address: &str) -> Option<String> {
    let a = address.trim();
    if a.is_empty() {
        return None;
    }
    let rest = a.split_once("://").map_or(a, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or(rest);
    (!host.is_empty()).then(|| normalize_host(host))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl CriKeychain {
    /// A keychain with the entries of `opts.path` (when it exists and is ours);
    /// an unreadable file is logged and left to be replaced by the next `PullImage`.
    pub fn open(opts: CriKeychainOptions) -> CriKeychain {
        let k = CriKeychain {
            opts,
            state: Mutex::default(),
        };
        {
            let mut st = k.locked();
            k.reload(&mut st);
            tracing::debug!(entries = st.entries.len(), "CRI credentials loaded");
        }
        k
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file backing this keychain, if any.
    pub fn path(&self) -> Option<&Path> {
        self.opts.path.as_deref()
    }

    /// Repositories with a credential right now.
    pub fn len(&self) -> usize {
        let mut st = self.locked();
        self.reload(&mut st);
        self.prune(&mut st);
        st.entries.len()
    }

    /// Whether no repository has a credential.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps `credential` for the repository of `image_ref` (as a CRI `PullImage`
    /// names it); `server_address` is the CRI's (empty: any host of the reference).
    /// Saved to the file before this returns, so the layers of the pull find it.
    pub fn record(
        &self,
        image_ref: &str,
        credential: &Credential,
        server_address: &str,
    ) -> Result<RecordedCredential> {
        let r = Reference::parse(image_ref)?;
        let too_long = match credential {
            Credential::Basic { username, password } => {
                username.len() > MAX_SECRET_BYTES || password.len() > MAX_SECRET_BYTES
            }
            Credential::IdentityToken(t) | Credential::RegistryToken(t) => {
                t.len() > MAX_SECRET_BYTES
            }
        };
        if too_long || server_address.len() > MAX_SECRET_BYTES {
            return Err(Error::Credentials {
                source_name: "CRI PullImage".into(),
                detail: format!("credentials longer than {MAX_SECRET_BYTES} bytes"),
            });
        }
        let entry = Entry {
            host: normalize_host(r.registry()),
            repository: r.repository().to_string(),
            credential: Stored::from(credential),
            server_host: server_host(server_address),
            stored_at: now_secs(),
        };
        let key = (entry.host.clone(), entry.repository.clone());
        let mut st = self.locked();
        self.reload(&mut st);
        let previous = st.entries.insert(key.clone(), entry.clone());
        self.prune(&mut st);
        self.persist(&mut st)?;
        Ok(RecordedCredential {
            key,
            entry,
            previous,
        })
    }

    /// Puts back what `rec` replaced, unless another `PullImage` replaced it since.
    pub fn undo(&self, rec: RecordedCredential) -> Result<()> {
        let mut st = self.locked();
        self.reload(&mut st);
        if st.entries.get(&rec.key) != Some(&rec.entry) {
            return Ok(());
        }
        match rec.previous {
            Some(p) => st.entries.insert(rec.key, p),
            None => st.entries.remove(&rec.key),
        };
        self.persist(&mut st)
    }

    /// Drops the credential of the repository of `image_ref` (its image was removed).
    pub fn forget(&self, image_ref: &str) -> Result<bool> {
        let r = Reference::parse(image_ref)?;
        let key = (normalize_host(r.registry()), r.repository().to_string());
        let mut st = self.locked();
        self.reload(&mut st);
        if st.entries.remove(&key).is_none() {
            return Ok(false);
        }
        self.persist(&mut st)?;
        Ok(true)
    }

    fn lookup(&self, host: &str, repository: &str) -> Option<Credential> {
        let host = normalize_host(host);
        let mut st = self.locked();
        self.reload(&mut st);
        let e = st.entries.get(&(host.clone(), repository.to_string()))?;
        if now_secs().saturating_sub(e.stored_at) > self.opts.ttl.as_secs() {
            return None;
        }
        if e.server_host.as_ref().is_some_and(|h| *h != host) {
            return None;
        }
        Some(e.credential.clone().into())
    }

    /// Drops expired entries, then the least recently pulled beyond the bound.
    fn prune(&self, st: &mut State) {
        let now = now_secs();
        let ttl = self.opts.ttl.as_secs();
        st.entries
            .retain(|_, e| now.saturating_sub(e.stored_at) <= ttl);
        let max = self.opts.max_entries.max(1);
        if st.entries.len() > max {
            let mut ages: Vec<(u64, Key)> = st
                .entries
                .iter()
                .map(|(k, e)| (e.stored_at, k.clone()))
                .collect();
            ages.sort();
            let excess = st.entries.len() - max;
            for (_, k) in ages.into_iter().take(excess) {
                st.entries.remove(&k);
            }
        }
    }

    /// Reads the file again when it changed since it was last read or written (the
    /// daemon writes it; a FUSE manager reads it).
    fn reload(&self, st: &mut State) {
        let Some(path) = &self.opts.path else {
            return;
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Removed by an administrator: what it held is gone.
                if st.file.take().is_some() {
                    st.entries.clear();
                }
                return;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "CRI credentials file unreadable");
                return;
            }
        };
        let id = FileId::of(&meta);
        if st.file == Some(id) {
            return;
        }
        st.file = Some(id);
        match read_file(path, &meta) {
            Ok(entries) => {
                st.entries = entries
                    .into_iter()
                    .map(|e| ((e.host.clone(), e.repository.clone()), e))
                    .collect();
                self.prune(st);
            }
            Err(why) => {
                tracing::warn!(path = %path.display(), reason = %why, "CRI credentials file ignored");
                st.entries.clear();
            }
        }
    }

    /// Writes the entries to a 0600 temp file beside the file and renames it over.
    fn persist(&self, st: &mut State) -> Result<()> {
        let Some(path) = &self.opts.path else {
            return Ok(());
        };
        let io = |e: std::io::Error| Error::Io {
            path: path.display().to_string(),
            source: e,
        };
        let mut entries: Vec<Entry> = st.entries.values().cloned().collect();
        entries.sort_by(|a, b| (&a.host, &a.repository).cmp(&(&b.host, &b.repository)));
        let body = serde_json::to_vec(&FileFormat {
            version: FORMAT_VERSION,
            entries,
        })
        .map_err(|e| io(std::io::Error::other(e)))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            name.as_deref().unwrap_or("cri-credentials"),
            std::process::id()
        ));
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            // A leftover temp file keeps its mode; this one is ours alone either way.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(&body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        st.file = std::fs::metadata(path).ok().map(|m| FileId::of(&m));
        Ok(())
    }
}

/// The entries of the file, if it is a file of ours nobody else can read or change.
fn read_file(path: &Path, meta: &std::fs::Metadata) -> std::result::Result<Vec<Entry>, String> {
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
    }
    // Whoever owns the daemon's root owns this file; another owner planted it.
    let dir_owner = path
        .parent()
        .and_then(|d| std::fs::metadata(d).ok())
        .map(|m| m.uid());
    if dir_owner.is_some_and(|uid| uid != meta.uid()) {
        return Err("owned by another user than its directory".into());
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.mode() & 0o777),
            "CRI credentials file was readable by others; made 0600");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("chmod: {e}"))?;
    }
    let data = std::fs::read(path).map_err(|e| e.to_string())?;
    let f: FileFormat =
        serde_json::from_slice(&data).map_err(|e| format!("not JSON of ours: {e}"))?;
    if f.version != FORMAT_VERSION {
        return Err(format!("format version {} unknown", f.version));
    }
    Ok(f.entries)
}

impl Keychain for CriKeychain {
    /// Credentials are per image: a host alone has none.
    fn resolve<'a>(&'a self, _host: &'a str) -> KeychainFuture<'a> {
        Box::pin(async { Ok(None) })
    }

    fn resolve_image<'a>(&'a self, host: &'a str, repository: &'a str) -> KeychainFuture<'a> {
        Box::pin(async move { Ok(self.lookup(host, repository)) })
    }

    fn describe(&self) -> String {
        match &self.opts.path {
            Some(p) => format!("CRI PullImage credentials ({})", p.display()),
            None => "CRI PullImage credentials".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> Credential {
        Credential::Basic {
            username: u.into(),
            password: p.into(),
        }
    }

    fn opts(path: &Path) -> CriKeychainOptions {
        CriKeychainOptions {
            path: Some(path.to_path_buf()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn per_repository_persisted_and_reloaded() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("cri-credentials.json");
        let k = CriKeychain::open(opts(&path));
        assert!(k.is_empty());
        k.record("127.0.0.1:5000/private/app:v1", &basic("alice", "pw1"), "")
            .expect("record");
        k.record(
            "nginx",
            &Credential::IdentityToken("id-tok".into()),
            "https://index.docker.io/v1/",
        )
        .expect("record hub");
        let mode = std::fs::metadata(&path).expect("file").mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            k.resolve_image("127.0.0.1:5000", "private/app")
                .await
                .expect("a"),
            Some(basic("alice", "pw1"))
        );
        // Never for another repository of the host, nor for the host alone.
        assert_eq!(
            k.resolve_image("127.0.0.1:5000", "other").await.expect("o"),
            None
        );
        assert_eq!(k.resolve("127.0.0.1:5000").await.expect("h"), None);
        // Docker Hub's endpoint name finds the credential of a short reference.
        assert_eq!(
            k.resolve_image("registry-1.docker.io", "library/nginx")
                .await
                .expect("hub"),
            Some(Credential::IdentityToken("id-tok".into()))
        );

        // Another process (the FUSE manager) reads the same file, and sees changes.
        let reader = CriKeychain::open(opts(&path));
        assert_eq!(reader.len(), 2);
        k.record("127.0.0.1:5000/private/app@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", &basic("alice", "pw2"), "")
            .expect("record again");
        assert_eq!(
            reader
                .resolve_image("127.0.0.1:5000", "private/app")
                .await
                .expect("r"),
            Some(basic("alice", "pw2"))
        );
        // A failed pull puts the earlier credential back.
        let rec = k
            .record(
                "127.0.0.1:5000/private/app:v2",
                &basic("alice", "wrong"),
                "",
            )
            .expect("record wrong");
        k.undo(rec).expect("undo");
        assert_eq!(
            reader
                .resolve_image("127.0.0.1:5000", "private/app")
                .await
                .expect("r"),
            Some(basic("alice", "pw2"))
        );
        assert!(k.forget("docker.io/library/nginx:latest").expect("forget"));
        assert_eq!(reader.len(), 1);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(!text.contains("id-tok"), "{text}");
    }

    #[tokio::test]
    async fn server_address_expiry_and_bounds() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("c.json");
        let k = CriKeychain::open(CriKeychainOptions {
            path: Some(path.clone()),
            ttl: Duration::from_secs(3600),
            max_entries: 2,
        });
        k.record("reg.example/a", &basic("u", "p"), "https://other.example")
            .expect("record");
        assert_eq!(k.resolve_image("reg.example", "a").await.expect("a"), None);
        k.record("reg.example/a", &basic("u", "p"), "reg.example")
            .expect("record");
        assert!(k
            .resolve_image("reg.example", "a")
            .await
            .expect("a")
            .is_some());
        k.record("reg.example/b", &basic("u", "p"), "").expect("b");
        k.record("reg.example/c", &basic("u", "p"), "").expect("c");
        assert_eq!(k.len(), 2, "bounded");
        assert!(k
            .record(
                "reg.example/d",
                &basic("u", &"x".repeat(MAX_SECRET_BYTES + 1)),
                ""
            )
            .is_err());
        assert!(k.record("not a reference!", &basic("u", "p"), "").is_err());

        // Entries older than the TTL are dropped when the file is read.
        let mut f: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        for e in f["entries"].as_array_mut().expect("entries") {
            e["stored_at"] = serde_json::json!(now_secs() - 7200);
        }
        std::fs::write(&path, serde_json::to_vec(&f).expect("json")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let k2 = CriKeychain::open(CriKeychainOptions {
            path: Some(path.clone()),
            ttl: Duration::from_secs(3600),
            max_entries: 2,
        });
        assert_eq!(k2.len(), 0);
        assert_eq!(
            std::fs::metadata(&path).expect("file").mode() & 0o777,
            0o600,
            "a readable file is closed"
        );
        // Garbage is ignored, not fatal.
        std::fs::write(&path, b"{not json").expect("write");
        assert!(CriKeychain::open(opts(&path)).is_empty());
    }
}
