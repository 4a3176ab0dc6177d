//! Shared pieces of the `ctr-remote` and `containerd-stargz-grpc` binaries: logging
//! set-up and the blob-level commands.

pub mod blob;
mod common;
pub mod doctor;
pub mod image;
pub mod mount;
pub mod optimize;

use std::sync::Arc;

use anyhow::Context as _;
use registry::{
    ChainKeychain, Client, DockerConfigKeychain, HostConfig, Keychain, MirrorConfig,
    RegistryConfig, StaticKeychain,
};

/// A registry client for the commands: plain HTTP for `plain_http_hosts`, and
/// credentials from `--user` (when given) before the docker config.
pub fn registry_client<'a>(
    plain_http_hosts: impl IntoIterator<Item = &'a str>,
    user: Option<&str>,
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

/// Starts `tracing` output on stderr at `level` (overridden by `RUST_LOG`).
pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
