//! CNI networking for the workload: a named network namespace, the plugin chain
//! of the first network configuration in the configuration directory run with
//! `ADD` into it, and `DEL` in reverse order plus the namespace's removal when
//! the attachment is dropped (success, failure or interruption alike).
//!
//! Plugins are invoked as the CNI specification describes: the command in
//! `CNI_COMMAND`, the rest of the runtime's arguments in `CNI_*` variables and
//! the network configuration (with `prevResult` threaded through a list) on
//! stdin; a failing plugin prints `{code, msg, details}` on stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The reference's default plugin directory.
pub const DEFAULT_PLUGIN_DIR: &str = "/opt/cni/bin";
/// Where Debian's `containernetworking-plugins` installs the plugins.
pub const DEBIAN_PLUGIN_DIR: &str = "/usr/lib/cni";
/// Where the named network namespaces live (as `ip netns` and containerd keep them).
pub const NETNS_DIR: &str = "/var/run/netns";
/// The interface the workload sees.
pub const IFNAME: &str = "eth0";

/// `dir`, or Debian's plugin directory when `dir` is the reference's default
/// and does not exist.
pub fn plugin_dir_or_fallback(dir: &Path) -> PathBuf {
    if dir == Path::new(DEFAULT_PLUGIN_DIR)
        && !dir.exists()
        && Path::new(DEBIAN_PLUGIN_DIR).is_dir()
    {
        PathBuf::from(DEBIAN_PLUGIN_DIR)
    } else {
        dir.to_path_buf()
    }
}

/// A network configuration: one plugin (`.conf`/`.json`) or a list (`.conflist`).
#[derive(Clone, Debug)]
pub struct NetworkConfig {
    pub file: PathBuf,
    pub name: String,
    pub cni_version: String,
    /// Each plugin's own configuration, in order.
    pub plugins: Vec<Map<String, Value>>,
}

impl NetworkConfig {
    /// Loads the first `.conflist`, `.conf` or `.json` file of `dir` in lexical
    /// order, as the reference does.
    pub fn load_first(dir: &Path) -> Result<NetworkConfig> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            Error::Cni(format!(
                "reading the CNI configuration directory {}: {e}",
                dir.display()
            ))
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .and_then(|x| x.to_str())
                        .is_some_and(|x| matches!(x, "conflist" | "conf" | "json"))
            })
            .collect();
        files.sort();
        let file = files.into_iter().next().ok_or_else(|| {
            Error::Cni(format!(
                "no network configuration (*.conflist, *.conf, *.json) in {}",
                dir.display()
            ))
        })?;
        let text = std::fs::read(&file)
            .map_err(|e| Error::Cni(format!("reading {}: {e}", file.display())))?;
        let value: Value = serde_json::from_slice(&text)
            .map_err(|e| Error::Cni(format!("{} is not JSON: {e}", file.display())))?;
        Self::parse(file, value)
    }

    fn parse(file: PathBuf, value: Value) -> Result<NetworkConfig> {
        let bad = |why: &str| Error::Cni(format!("{}: {why}", file.display()));
        let Value::Object(top) = value else {
            return Err(bad("not a JSON object"));
        };
        let name = top
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no network \"name\""))?
            .to_string();
        let cni_version = top
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("0.4.0")
            .to_string();
        let plugins = match top.get("plugins") {
            Some(Value::Array(list)) => list
                .iter()
                .map(|p| match p {
                    Value::Object(m) if m.get("type").and_then(Value::as_str).is_some() => {
                        Ok(m.clone())
                    }
                    _ => Err(bad("a plugin without a \"type\"")),
                })
                .collect::<Result<Vec<_>>>()?,
            Some(_) => return Err(bad("\"plugins\" is not a list")),
            None if top.get("type").and_then(Value::as_str).is_some() => vec![top.clone()],
            None => return Err(bad("neither \"plugins\" nor a plugin \"type\"")),
        };
        if plugins.is_empty() {
            return Err(bad("the plugin list is empty"));
        }
        Ok(NetworkConfig {
            file,
            name,
            cni_version,
            plugins,
        })
    }

    /// What plugin `i` reads on stdin.
    fn stdin_for(&self, i: usize, prev_result: Option<&Value>) -> Value {
        let mut conf = self.plugins[i].clone();
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        match prev_result {
            Some(r) => {
                conf.insert("prevResult".into(), r.clone());
            }
            None => {
                conf.remove("prevResult");
            }
        }
        Value::Object(conf)
    }
}

/// A network namespace bind-mounted at a file; unmounted and removed on drop.
#[derive(Debug)]
pub struct NetNs {
    path: PathBuf,
    removed: bool,
}

impl NetNs {
    /// Creates the namespace `/var/run/netns/<name>` with `lo` up.
    pub fn create(name: &str) -> Result<NetNs> {
        let dir = Path::new(NETNS_DIR);
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Cni(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::Cni(format!("creating {}: {e}", path.display())))?;
        let mut ns = NetNs {
            path: path.clone(),
            removed: false,
        };
        // unshare(CLONE_NEWNET) moves only the calling thread, so a short-lived
        // thread creates the namespace and pins it with the bind mount.
        let target = path.clone();
        let made = std::thread::spawn(move || -> std::result::Result<(), String> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| format!("bind-mounting the namespace at {}: {e}", target.display()))?;
            loopback_up().map_err(|e| format!("bringing lo up: {e}"))
        })
        .join()
        .map_err(|_| Error::Cni("the namespace-creating thread panicked".into()))?;
        if let Err(e) = made {
            ns.remove_now();
            return Err(Error::Cni(e));
        }
        Ok(ns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn remove_now(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "removing the network namespace");
            }
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.remove_now();
    }
}

// SIOCGIFFLAGS/SIOCSIFFLAGS on an `ifreq`, as nix declares ioctls.
nix::ioctl_readwrite_bad!(get_if_flags, libc::SIOCGIFFLAGS, libc::ifreq);
nix::ioctl_write_ptr_bad!(set_if_flags, libc::SIOCSIFFLAGS, libc::ifreq);

/// Sets IFF_UP on `lo` of the calling thread's network namespace.
fn loopback_up() -> std::io::Result<()> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `sock` is an open socket and `req` a named, initialized ifreq we own
    // that the kernel reads and fills for the duration of the call.
    unsafe { get_if_flags(sock.as_raw_fd(), &mut req) }?;
    // SAFETY: reading the flags member the kernel just filled; the union holds
    // plain integers, so any bit pattern is valid.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above; the kernel only reads `req`.
    unsafe { set_if_flags(sock.as_raw_fd(), &req) }?;
    Ok(())
}

/// The workload's attachment to a CNI network: the namespace, the plugins that
/// were added and the result. Dropping it runs `DEL` and removes the namespace.
#[derive(Debug)]
pub struct Attachment {
    config: NetworkConfig,
    plugin_dir: PathBuf,
    container_id: String,
    /// How many plugins of the chain ran ADD (and so get DEL).
    added: usize,
    result: Option<Value>,
    netns: NetNs,
    detached: bool,
}

impl Attachment {
    /// Creates the namespace `id` and runs the chain's ADD into it. On failure
    /// the plugins already run are deleted and the namespace removed.
    pub fn attach(conf_dir: &Path, plugin_dir: &Path, id: &str) -> Result<Attachment> {
        let config = NetworkConfig::load_first(conf_dir)?;
        for p in &config.plugins {
            let ty = p.get("type").and_then(Value::as_str).unwrap_or_default();
            plugin_binary(plugin_dir, ty)?;
        }
        let netns = NetNs::create(id)?;
        let mut att = Attachment {
            config,
            plugin_dir: plugin_dir.to_path_buf(),
            container_id: id.to_string(),
            added: 0,
            result: None,
            netns,
            detached: false,
        };
        for i in 0..att.config.plugins.len() {
            // Counted before the call: a plugin that failed half-way may have
            // left state that only its DEL clears.
            att.added = i + 1;
            let stdin = att.config.stdin_for(i, att.result.as_ref());
            let out = att.invoke(i, "ADD", &stdin)?;
            att.result = Some(out);
        }
        let ips = att.ips();
        tracing::info!(
            network = %att.config.name,
            config = %att.config.file.display(),
            netns = %att.netns.path().display(),
            interface = %IFNAME,
            ips = %ips.join(", "),
            "CNI network attached"
        );
        Ok(att)
    }

    /// The namespace the workload joins.
    pub fn netns_path(&self) -> &Path {
        self.netns.path()
    }

    /// The addresses the result assigned (CIDR notation).
    pub fn ips(&self) -> Vec<String> {
        let Some(r) = &self.result else {
            return Vec::new();
        };
        let mut out: Vec<String> = r
            .get("ips")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|ip| ip.get("address")?.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        // Results of specification 0.2.0 and older.
        for k in ["ip4", "ip6"] {
            if let Some(a) = r.get(k).and_then(|v| v.get("ip")).and_then(Value::as_str) {
                out.push(a.to_string());
            }
        }
        out
    }

    /// Runs DEL for every plugin added, in reverse order, and removes the
    /// namespace; reports the first DEL that failed.
    pub fn detach(mut self) -> Result<()> {
        self.detach_now()
    }

    fn detach_now(&mut self) -> Result<()> {
        if self.detached {
            return Ok(());
        }
        self.detached = true;
        let mut first_err = None;
        for i in (0..self.added).rev() {
            let stdin = self.config.stdin_for(i, self.result.as_ref());
            if let Err(e) = self.invoke(i, "DEL", &stdin) {
                tracing::warn!(error = %e, "CNI DEL failed");
                first_err.get_or_insert(e);
            }
        }
        self.netns.remove_now();
        first_err.map_or(Ok(()), Err)
    }

    fn invoke(&self, i: usize, command: &str, stdin: &Value) -> Result<Value> {
        let ty = self.config.plugins[i]
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let bin = plugin_binary(&self.plugin_dir, ty)?;
        let input = serde_json::to_vec(stdin)
            .map_err(|e| Error::Cni(format!("encoding the configuration for {ty}: {e}")))?;
        let mut child = Command::new(&bin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", self.netns.path())
            .env("CNI_IFNAME", IFNAME)
            .env("CNI_PATH", &self.plugin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Cni(format!("starting {}: {e}", bin.display())))?;
        if let Some(mut w) = child.stdin.take() {
            // A plugin that exits without reading its stdin is judged by its output.
            let _ = w.write_all(&input);
        }
        let out = child
            .wait_with_output()
            .map_err(|e| Error::Cni(format!("waiting for {}: {e}", bin.display())))?;
        let parsed: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        if !out.status.success() {
            return Err(Error::CniPlugin {
                plugin: ty.to_string(),
                command: command.to_string(),
                message: plugin_error_message(parsed.as_ref(), &out.stderr, &out.status),
            });
        }
        if command != "ADD" {
            return Ok(Value::Null);
        }
        parsed.ok_or_else(|| Error::CniPlugin {
            plugin: ty.to_string(),
            command: command.to_string(),
            message: format!(
                "its result is not JSON: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        })
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        // Synchronous on purpose: drop may run while unwinding an error or Ctrl-C.
        let _ = self.detach_now();
    }
}

/// The message of a failed plugin: its error object when it printed one.
fn plugin_error_message(
    parsed: Option<&Value>,
    stderr: &[u8],
    status: &std::process::ExitStatus,
) -> String {
    let mut msg = match parsed {
        Some(v) if v.get("msg").is_some() || v.get("code").is_some() => {
            let mut m = v
                .get("msg")
                .and_then(Value::as_str)
                .unwrap_or("no message")
                .to_string();
            if let Some(d) = v
                .get("details")
                .and_then(Value::as_str)
                .filter(|d| !d.is_empty())
            {
                m.push_str(&format!(" ({d})"));
            }
            if let Some(c) = v.get("code") {
                m.push_str(&format!(" [code {c}]"));
            }
            m
        }
        _ => format!("exited with {status}"),
    };
    let stderr = String::from_utf8_lossy(stderr);
    let stderr = stderr.trim();
    if !stderr.is_empty() {
        msg.push_str(&format!("; stderr: {stderr}"));
    }
    msg
}

/// The plugin `ty` in `dir`.
fn plugin_binary(dir: &Path, ty: &str) -> Result<PathBuf> {
    if ty.is_empty() || ty.contains('/') {
        return Err(Error::Cni(format!("invalid plugin type {ty:?}")));
    }
    let p = dir.join(ty);
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::Cni(format!(
            "CNI plugin {ty:?} not found in {} (--cni-plugin-dir)",
            dir.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn loads_the_first_configuration_in_lexical_order() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("README"), "not a config").unwrap();
        std::fs::write(
            d.path().join("20-b.conf"),
            r#"{"cniVersion":"0.4.0","name":"single","type":"bridge"}"#,
        )
        .unwrap();
        std::fs::write(
            d.path().join("10-a.conflist"),
            r#"{"cniVersion":"1.0.0","name":"chain","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        let c = NetworkConfig::load_first(d.path()).unwrap();
        assert_eq!(c.name, "chain");
        assert_eq!(c.cni_version, "1.0.0");
        assert_eq!(c.plugins.len(), 2);
        let prev = json!({"ips": [{"address": "10.0.0.2/24"}]});
        let s = c.stdin_for(1, Some(&prev));
        assert_eq!(s["type"], "portmap");
        assert_eq!(s["name"], "chain");
        assert_eq!(s["cniVersion"], "1.0.0");
        assert_eq!(s["prevResult"], prev);
        assert!(c.stdin_for(0, None).get("prevResult").is_none());

        std::fs::remove_file(d.path().join("10-a.conflist")).unwrap();
        let c = NetworkConfig::load_first(d.path()).unwrap();
        assert_eq!(c.name, "single");
        assert_eq!(c.plugins.len(), 1);
        assert_eq!(c.stdin_for(0, None)["type"], "bridge");
    }

    #[test]
    fn rejects_empty_dirs_and_bad_configs() {
        let d = tempfile::tempdir().unwrap();
        let e = NetworkConfig::load_first(d.path()).unwrap_err().to_string();
        assert!(e.contains("no network configuration"), "{e}");
        std::fs::write(
            d.path().join("a.conflist"),
            r#"{"name":"x","plugins":[{}]}"#,
        )
        .unwrap();
        let e = NetworkConfig::load_first(d.path()).unwrap_err().to_string();
        assert!(e.contains("without a \"type\""), "{e}");
    }

    #[test]
    fn plugin_errors_carry_the_message() {
        let st = std::process::Command::new("false").status().unwrap();
        let v = json!({"code": 11, "msg": "no IP addresses available", "details": "range full"});
        let m = plugin_error_message(Some(&v), b"", &st);
        assert_eq!(m, "no IP addresses available (range full) [code 11]");
        let m = plugin_error_message(None, b"boom\n", &st);
        assert!(
            m.contains("exited with") && m.ends_with("stderr: boom"),
            "{m}"
        );
    }
}
