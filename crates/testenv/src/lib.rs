//! Test fixtures shared by the workspace: a real CNCF distribution registry
//! process (`docker-registry`), TLS material, htpasswd files, a JWT token
//! issuer, fault-injecting HTTP fronts, and a fake Kubernetes API server
//! (secrets list/watch). Everything listens on loopback,
//! lives in temp dirs, and is torn down on `Drop`.
//!
//! Only tests link this crate, and a fixture that cannot be set up fails its
//! test on the spot (as its `assert!`s do), so it may unwrap like test code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test-only fixtures: a failed set-up is a failed test"
)]

mod front;
mod http;
mod issuer;
mod kubeapi;
mod registry;
mod tls;

pub use front::{Front, FrontOpts, FrontStats, Logged};
pub use issuer::{IssuerOpts, TokenIssuer};
pub use kubeapi::{FakeKubeApi, DOCKERCONFIGJSON};
pub use registry::{free_port, require_tool, Registry, RegistryOpts, TokenAuthConfig};
pub use tls::{Tls, TokenSigner};

mod push;
pub use push::{push_blob, push_image, random_bytes, PushedImage};
