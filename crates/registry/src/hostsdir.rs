//! containerd's registry hosts directory (`<dir>/<host>/hosts.toml`, and
//! `_default/hosts.toml`), mapped onto the crate's per-host configuration:
//! mirrors in file order, plain HTTP, CA files and headers. Fields with no
//! equivalent are reported as warnings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use url::Url;

use crate::config::{HostConfig, MirrorConfig, ResolverConfig, DEFAULT_HOST_KEY};
use crate::error::{Error, Result};

/// Largest `hosts.toml` read.
const MAX_HOSTS_TOML_BYTES: u64 = 1 << 20;
/// Most host directories read.
const MAX_HOST_DIRS: usize = 4096;
/// Most `[host."..."]` entries used from one file.
const MAX_HOST_ENTRIES: usize = 64;

/// What a hosts directory yielded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostsDir {
    /// Per registry host (`host[:port]`, or [`DEFAULT_HOST_KEY`]).
    pub hosts: BTreeMap<String, HostConfig>,
    /// Settings that were ignored or approximated, one sentence each (also logged).
    pub warnings: Vec<String>,
}

/// Directory name -> registry host: containerd writes `host:port` as
/// `host_port_` (colons are not allowed in Windows paths) and also accepts
/// `host:port` as is.
fn dir_to_host(name: &str) -> String {
    if let Some(stem) = name.strip_suffix('_') {
        if let Some((h, p)) = stem.rsplit_once('_') {
            if !h.is_empty() && !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) {
                return format!("{h}:{p}");
            }
        }
    }
    name.to_string()
}

/// Reads every `<dir>/<host>/hosts.toml`. A missing `dir` gives nothing.
pub fn load_hosts_dir(dir: &Path) -> Result<HostsDir> {
    let mut out = HostsDir::default();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(Error::Io {
                path: dir.display().to_string(),
                source: e,
            })
        }
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .take(MAX_HOST_DIRS + 1)
        .collect();
    if names.len() > MAX_HOST_DIRS {
        return Err(Error::Config(format!(
            "{}: more than {MAX_HOST_DIRS} host directories",
            dir.display()
        )));
    }
    names.sort();
    for name in names {
        let file = dir.join(&name).join("hosts.toml");
        if !file.is_file() {
            continue;
        }
        let host = dir_to_host(&name);
        let hc = load_hosts_toml(&file, &host, &mut out.warnings)?;
        out.hosts.insert(host, hc);
    }
    for w in &out.warnings {
        tracing::warn!(hosts_dir = %dir.display(), "{w}");
    }
    Ok(out)
}

impl ResolverConfig {
    /// Adds the hosts of a containerd hosts directory for registries that
    /// have no `[resolver.host."..."]` entry of their own (explicit entries
    /// win). Returns the warnings.
    pub fn merge_hosts_dir(&mut self, dir: &Path) -> Result<Vec<String>> {
        let d = load_hosts_dir(dir)?;
        for (host, hc) in d.hosts {
            self.host.entry(host).or_insert(hc);
        }
        Ok(d.warnings)
    }
}

fn strings(v: &toml::Value) -> Option<Vec<String>> {
    match v {
        toml::Value::String(s) => Some(vec![s.clone()]),
        toml::Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect(),
        _ => None,
    }
}

/// The settings shared by `server` and `[host."..."]` entries.
struct Entry {
    url: String,
    capabilities: Vec<String>,
    mirror: MirrorConfig,
}

fn load_hosts_toml(file: &Path, host: &str, warnings: &mut Vec<String>) -> Result<HostConfig> {
    let io = |e| Error::Io {
        path: file.display().to_string(),
        source: e,
    };
    if std::fs::metadata(file).map_err(io)?.len() > MAX_HOSTS_TOML_BYTES {
        return Err(Error::Config(format!("{} is too large", file.display())));
    }
    let text = std::fs::read_to_string(file).map_err(io)?;
    parse_hosts_toml(&text, file, host, warnings)
}

fn parse_hosts_toml(
    text: &str,
    file: &Path,
    host: &str,
    warnings: &mut Vec<String>,
) -> Result<HostConfig> {
    let cfg_err = |d: String| Error::Config(format!("{}: {d}", file.display()));
    let root: toml::Table = toml::from_str(text).map_err(|e| cfg_err(e.to_string()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut hc = HostConfig::default();
    let is_default = host == DEFAULT_HOST_KEY;

    let mut entries: Vec<(usize, String, &toml::Table)> = Vec::new();
    if let Some(h) = root.get("host") {
        let t = h
            .as_table()
            .ok_or_else(|| cfg_err("`host` must be a table of URLs".into()))?;
        for (k, v) in t {
            let et = v
                .as_table()
                .ok_or_else(|| cfg_err(format!("host {k:?} must be a table")))?;
            // File order decides the order mirrors are tried in; TOML tables are unordered.
            let pos = [format!("\"{k}\""), format!("'{k}'")]
                .iter()
                .filter_map(|q| text.find(q.as_str()))
                .min()
                .unwrap_or(usize::MAX);
            entries.push((pos, k.clone(), et));
        }
    }
    entries.sort_by_key(|(pos, k, _)| (*pos, k.clone()));
    if entries.len() > MAX_HOST_ENTRIES {
        warnings.push(format!(
            "{}: only the first {MAX_HOST_ENTRIES} host entries are used",
            file.display()
        ));
        entries.truncate(MAX_HOST_ENTRIES);
    }
    for (_, url, t) in entries {
        let Some(e) = entry(&url, t, base, file, warnings)? else {
            continue;
        };
        if !e.capabilities.iter().any(|c| c == "pull") {
            warnings.push(format!(
                "{}: host {} lacks the pull capability; not used",
                file.display(),
                e.url
            ));
            continue;
        }
        if !e.capabilities.iter().any(|c| c == "resolve") {
            warnings.push(format!(
                "{}: host {} has no resolve capability, but mirrors are also asked for tags here (a miss falls through to the next host)",
                file.display(),
                e.url
            ));
        }
        hc.mirrors.push(e.mirror);
    }

    // Top-level keys describe the upstream server itself.
    let server = root
        .get("server")
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| cfg_err("`server` must be a string".into()))
        })
        .transpose()?;
    if is_default {
        if server.is_some() {
            warnings.push(format!(
                "{}: `server` in _default is ignored (each registry is its own server)",
                file.display()
            ));
        }
        return Ok(hc);
    }
    let server_url = server.unwrap_or_else(|| format!("https://{host}"));
    if let Some(e) = entry(&server_url, &root, base, file, warnings)? {
        let upstream = if host == "docker.io" {
            "registry-1.docker.io"
        } else {
            host
        };
        if e.mirror.host == upstream || e.mirror.host == host {
            let mut own = e.mirror;
            own.host = String::new();
            hc.self_ = Some(own);
        } else {
            warnings.push(format!(
                "{}: server {} differs from the registry host {host}; it is tried as the last mirror, before {host} itself",
                file.display(),
                server_url
            ));
            hc.mirrors.push(e.mirror);
        }
    }
    Ok(hc)
}

/// One `[host."URL"]` table (or the top level for `server`); `None` when
/// the entry cannot be represented (reported in `warnings`).
fn entry(
    url: &str,
    t: &toml::Table,
    base: &Path,
    file: &Path,
    warnings: &mut Vec<String>,
) -> Result<Option<Entry>> {
    let cfg_err = |d: String| Error::Config(format!("{}: {d}", file.display()));
    let full = if url.contains("://") {
        url.to_string()
    } else {
        format!("https://{url}")
    };
    let u = Url::parse(&full).map_err(|e| cfg_err(format!("bad host URL {url:?}: {e}")))?;
    let insecure = match u.scheme() {
        "http" => true,
        "https" => false,
        s => return Err(cfg_err(format!("host {url:?}: unsupported scheme {s}"))),
    };
    let h = u
        .host_str()
        .ok_or_else(|| cfg_err(format!("host {url:?} has no host name")))?;
    let hostport = match u.port() {
        Some(p) => format!("{h}:{p}"),
        None => h.to_string(),
    };
    let override_path = t
        .get("override_path")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let path = u.path().trim_end_matches('/');
    // Only the standard API root (`/v2`) is expressible: mirrors are addressed as host[:port].
    let root_ok = path.is_empty() || path == "/v2";
    if !root_ok {
        warnings.push(format!(
            "{}: host {url} uses an API path ({}{}); only /v2 at the root is supported, so it is not used",
            file.display(),
            path,
            if override_path { ", override_path" } else { "" }
        ));
        return Ok(None);
    }
    let capabilities = match t.get("capabilities") {
        Some(v) => strings(v)
            .ok_or_else(|| cfg_err(format!("host {url:?}: capabilities must be strings")))?,
        None => vec!["pull".into(), "resolve".into(), "push".into()],
    };
    let mut mirror = MirrorConfig {
        host: hostport,
        insecure: Some(insecure),
        ..Default::default()
    };
    if let Some(v) = t.get("ca") {
        let cas = strings(v).ok_or_else(|| {
            cfg_err(format!(
                "host {url:?}: ca must be a path or a list of paths"
            ))
        })?;
        if cas.len() > 1 {
            warnings.push(format!(
                "{}: host {url} lists {} CA files; only the first ({}) is used (concatenate them into one PEM bundle)",
                file.display(),
                cas.len(),
                cas[0]
            ));
        }
        if let Some(first) = cas.first() {
            let p = PathBuf::from(first);
            mirror.ca_file = Some(if p.is_absolute() { p } else { base.join(p) });
        }
    }
    if t.get("skip_verify").and_then(|v| v.as_bool()) == Some(true) {
        warnings.push(format!(
            "{}: host {url}: skip_verify is not supported; its certificate is verified (give it a ca instead)",
            file.display()
        ));
    }
    if t.get("client").is_some() {
        warnings.push(format!(
            "{}: host {url}: client certificates are not supported; connecting without one",
            file.display()
        ));
    }
    if t.get("dial_timeout").is_some() {
        warnings.push(format!(
            "{}: host {url}: dial_timeout is ignored ([blob] connect_timeout_sec applies)",
            file.display()
        ));
    }
    if let Some(hv) = t.get("header") {
        let ht = hv
            .as_table()
            .ok_or_else(|| cfg_err(format!("host {url:?}: header must be a table")))?;
        for (k, v) in ht {
            let vals = strings(v).ok_or_else(|| {
                cfg_err(format!(
                    "host {url:?}: header {k:?} must be a string or a list of strings"
                ))
            })?;
            mirror.header.insert(k.clone(), vals);
        }
    }
    Ok(Some(Entry {
        url: url.to_string(),
        capabilities,
        mirror,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_names() {
        assert_eq!(dir_to_host("docker.io"), "docker.io");
        assert_eq!(dir_to_host("127.0.0.1_5000_"), "127.0.0.1:5000");
        assert_eq!(dir_to_host("my_reg.example"), "my_reg.example");
        assert_eq!(dir_to_host("reg.example:5000"), "reg.example:5000");
    }

    #[test]
    fn parses_containerd_shape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("docker.io");
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(
            d.join("hosts.toml"),
            r#"
server = "https://registry-1.docker.io"
ca = "/etc/ssl/hub.pem"

[host."https://zz-first.example.com"]
  capabilities = ["pull", "resolve"]
  ca = ["mirror-ca.pem", "other.pem"]
  header = { x-team = "storage", x-multi = ["a", "b"] }

[host."http://aa-second.example.com:5000/v2"]
  capabilities = ["pull"]
  skip_verify = true

[host."https://pushonly.example.com"]
  capabilities = ["push"]

[host."https://pathy.example.com/custom/api"]
  override_path = true
"#,
        )
        .expect("write");
        let dd = dir.path().join("_default");
        std::fs::create_dir_all(&dd).expect("mkdir");
        std::fs::write(
            dd.join("hosts.toml"),
            "[host.\"http://127.0.0.1:9999\"]\ncapabilities = [\"pull\", \"resolve\"]\n",
        )
        .expect("write");
        let got = load_hosts_dir(dir.path()).expect("load");
        let hub = &got.hosts["docker.io"];
        let hosts: Vec<&str> = hub.mirrors.iter().map(|m| m.host.as_str()).collect();
        assert_eq!(
            hosts,
            ["zz-first.example.com", "aa-second.example.com:5000"]
        );
        assert_eq!(hub.mirrors[0].insecure, Some(false));
        assert_eq!(hub.mirrors[1].insecure, Some(true));
        assert_eq!(hub.mirrors[0].ca_file, Some(d.join("mirror-ca.pem")));
        assert_eq!(hub.mirrors[0].header["x-team"], ["storage"]);
        assert_eq!(hub.mirrors[0].header["x-multi"], ["a", "b"]);
        let own = hub.self_.as_ref().expect("server settings");
        assert_eq!(own.ca_file, Some(PathBuf::from("/etc/ssl/hub.pem")));
        assert_eq!(own.insecure, Some(false));
        let def = &got.hosts[DEFAULT_HOST_KEY];
        assert_eq!(def.mirrors[0].host, "127.0.0.1:9999");
        let w = got.warnings.join("\n");
        for needle in [
            "skip_verify",
            "pull capability",
            "override_path",
            "only the first",
            "no resolve",
        ] {
            assert!(w.contains(needle), "missing {needle:?} in {w}");
        }

        let mut rc = ResolverConfig::default();
        rc.host.insert("docker.io".into(), HostConfig::default());
        rc.merge_hosts_dir(dir.path()).expect("merge");
        assert!(
            rc.host["docker.io"].mirrors.is_empty(),
            "explicit config wins"
        );
        assert_eq!(rc.host_config("quay.io").map(|h| h.mirrors.len()), Some(1));
        assert!(load_hosts_dir(&dir.path().join("absent"))
            .expect("absent")
            .hosts
            .is_empty());
    }
}
