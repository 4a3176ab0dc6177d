//! A real `docker-registry` (CNCF distribution 2.8) process on a free loopback port.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tls::Tls;

/// Picks a currently free loopback TCP port.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// Finds a required tool. Missing: panics under `CI=true`, otherwise prints a
/// loud notice and returns `None` so the test can skip.
pub fn require_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|c| c.is_file())
        })
        .unwrap_or(None);
    if found.is_none() {
        let msg = format!("prerequisite `{name}` not found (apt-get install -y docker-registry apache2-utils openssl)");
        if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
            panic!("{msg}");
        }
        eprintln!("\n!!!!!!!! SKIPPING TEST: {msg} !!!!!!!!\n");
    }
    found
}

/// `auth.token` settings for the registry.
#[derive(Clone, Debug)]
pub struct TokenAuthConfig {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    pub root_cert_bundle: PathBuf,
}

/// How to run the registry.
#[derive(Default)]
pub struct RegistryOpts {
    /// Serve HTTPS with a fresh self-signed CA.
    pub tls: bool,
    /// Require this user (htpasswd, bcrypt).
    pub htpasswd: Option<(String, String)>,
    /// Require bearer tokens.
    pub token: Option<TokenAuthConfig>,
}

/// A running registry; killed and its storage removed on drop.
pub struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    pub tls: Option<Tls>,
}

impl Registry {
    /// Starts a registry. `None` (after a loud message) when `docker-registry`
    /// is missing outside CI.
    pub fn start(opts: RegistryOpts) -> Option<Registry> {
        let bin = require_tool("docker-registry")?;
        let dir = tempfile::Builder::new()
            .prefix("testenv-registry-")
            .tempdir()
            .expect("tempdir");
        let tls = opts.tls.then(|| {
            require_tool("openssl")
                .map(|_| Tls::create(dir.path(), "reg"))
                .unwrap_or_else(|| panic!("openssl required for TLS tests"))
        });
        let htpasswd = opts.htpasswd.as_ref().map(|(u, p)| {
            require_tool("htpasswd").unwrap_or_else(|| panic!("htpasswd (apache2-utils) required"));
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .expect("run htpasswd");
            assert!(out.status.success(), "htpasswd failed");
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, &out.stdout).expect("write htpasswd");
            path
        });
        for _ in 0..5 {
            let port = free_port();
            let storage = dir.path().join("storage");
            std::fs::create_dir_all(&storage).expect("storage dir");
            let mut yml = format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  cache:\n    blobdescriptor: inmemory\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: testenv-secret\n",
                storage.display()
            );
            if let Some(t) = &tls {
                yml.push_str(&format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    t.server_cert.display(),
                    t.server_key.display()
                ));
            }
            if let Some(p) = &htpasswd {
                yml.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: testenv\n    path: {}\n",
                    p.display()
                ));
            } else if let Some(t) = &opts.token {
                yml.push_str(&format!(
                    "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    t.realm,
                    t.service,
                    t.issuer,
                    t.root_cert_bundle.display()
                ));
            }
            let cfg = dir.path().join("config.yml");
            std::fs::write(&cfg, yml).expect("write config");
            let log = std::fs::File::create(dir.path().join("registry.log")).expect("log file");
            let mut child = Command::new(&bin)
                .arg("serve")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log"))
                .stderr(log)
                .spawn()
                .expect("spawn docker-registry");
            let started = Instant::now();
            let mut up = false;
            while started.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                // The port was free when picked, but another server of a parallel test
                // may have taken it since: only our process's own "listening" line,
                // with the process still alive, proves the port is ours.
                let listening = std::fs::read_to_string(dir.path().join("registry.log"))
                    .is_ok_and(|l| l.contains(&format!("listening on 127.0.0.1:{port}")));
                if listening
                    && TcpStream::connect(("127.0.0.1", port)).is_ok()
                    && matches!(child.try_wait(), Ok(None))
                {
                    up = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if up {
                return Some(Registry {
                    child,
                    port,
                    dir,
                    tls,
                });
            }
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
            eprintln!("registry failed to start on port {port}, retrying: {log}");
        }
        panic!("docker-registry did not start");
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT` or `https://...`
    pub fn base_url(&self) -> String {
        format!(
            "{}://127.0.0.1:{}",
            if self.tls.is_some() { "https" } else { "http" },
            self.port
        )
    }

    /// Root of the filesystem storage driver.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the stored bytes of a blob live (for corrupting them in tests).
    pub fn blob_data_path(&self, digest_hex: &str) -> PathBuf {
        self.storage_dir().join(format!(
            "docker/registry/v2/blobs/sha256/{}/{}/data",
            &digest_hex[..2],
            digest_hex
        ))
    }

    /// The temp dir holding config, logs, certificates and storage.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The registry's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Registry {
    /// Kills the registry process; its port then refuses connections. Storage stays.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the registry again on the same port with the same storage after [`stop`].
    ///
    /// [`stop`]: Registry::stop
    pub fn restart(&mut self) {
        let bin = require_tool("docker-registry").expect("docker-registry was there at start");
        let log_path = self.dir.path().join("registry.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        self.child = Command::new(&bin)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(15) {
            let listening = std::fs::read_to_string(&log_path)
                .is_ok_and(|l| l.contains(&format!("listening on 127.0.0.1:{}", self.port)));
            if listening && TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            assert!(
                matches!(self.child.try_wait(), Ok(None)),
                "docker-registry exited on restart: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("docker-registry did not come back: {}", self.log());
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
