//! Shared pieces of the `ctr-remote` and `containerd-stargz-grpc` binaries: logging
//! set-up and the blob-level commands.

pub mod blob;
mod common;
pub mod doctor;
pub mod image;
pub mod mount;
pub mod optimize;
pub mod place;
pub mod prefetch_record;

use std::sync::Arc;

use anyhow::Context as _;
use registry::{
    ChainKeychain, Client, DockerConfigKeychain, HostConfig, Keychain, MirrorConfig,
    RegistryConfig, StaticKeychain,
};

/// TLS and host settings for a command's registry client (`ctr`'s registry flags).
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// Accept any server certificate.
    pub skip_verify: bool,
    /// CA bundle (PEM) trusted on top of the system roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM).
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// containerd's hosts directory (`<dir>/<host>/hosts.toml`).
    pub hosts_dir: Option<std::path::PathBuf>,
}

/// A registry client for the commands: plain HTTP for `plain_http_hosts`, and
/// credentials from `--user` (when given) before the docker config.
pub fn registry_client<'a>(
    plain_http_hosts: impl IntoIterator<Item = &'a str>,
    user: Option<&str>,
) -> anyhow::Result<Client> {
    registry_client_with(plain_http_hosts, user, &ClientOptions::default())
}

/// As [`registry_client`], with TLS and hosts-directory settings.
pub fn registry_client_with<'a>(
    plain_http_hosts: impl IntoIterator<Item = &'a str>,
    user: Option<&str>,
    opts: &ClientOptions,
) -> anyhow::Result<Client> {
    let mut config = RegistryConfig::default();
    for host in plain_http_hosts {
        config.resolver.host.insert(
            host.to_string(),
            HostConfig {
                self_: Some(MirrorConfig {
                    insecure: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
    }
    config.resolver.ca_file = opts.ca_file.clone();
    config.resolver.tls = registry::ClientTls {
        skip_verify: opts.skip_verify,
        client_cert: opts.client_cert.clone(),
    };
    if let Some(dir) = &opts.hosts_dir {
        config
            .resolver
            .merge_hosts_dir(dir)
            .with_context(|| format!("reading --hosts-dir {}", dir.display()))?;
    }
    let docker: Arc<dyn Keychain> = Arc::new(DockerConfigKeychain::from_env());
    let keychain: Arc<dyn Keychain> = match user {
        Some(up) => Arc::new(
            ChainKeychain::new()
                .with(Arc::new(
                    StaticKeychain::from_user_pass(None, up).context("parsing --user")?,
                ))
                .with(docker),
        ),
        None => docker,
    };
    Client::new(config, keychain).context("setting up the registry client")
}

/// Starts `tracing` output on stderr at `level` (overridden by `RUST_LOG`). Colour
/// only when stderr is a terminal and `NO_COLOR` is unset: escape codes in a pipe or
/// a log file are noise.
pub fn init_logging(level: &str) {
    use std::io::IsTerminal;
    // fuser logs a reply that finds its FUSE connection gone (optimize's trace mounts
    // at unmount) as an error, though nothing is lost: kept out of the default output.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{level},fuser::reply=off"))
    });
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .try_init();
}
