//! containerd remote snapshotter: the Snapshots gRPC service over an overlayfs
//! layout, with layers that a [`RemoteFs`] can serve without downloading them.
//!
//! * the gRPC service ([`Service`], [`bind`], [`serve`]): `containerd.services.snapshots.v1.Snapshots`
//!   on a unix socket. The API is generated from containerd's own `snapshots.proto`
//!   (vendored in `proto/`, gogoproto options dropped) with `tonic-prost-build` 0.14,
//!   which emits the server trait; `containerd-client` was not used because it generates
//!   only clients, and `containerd-snapshots` pins the older tonic 0.9.
//! * metadata in `redb` (single-file, ACID, crash-safe), keyed by (namespace, key).
//! * [`Snapshotter`]: directories `ROOT/snapshots/<id>/{fs,work}` and the mounts
//!   containerd's overlayfs snapshotter would return for them.
//! * [`RemoteFs`]: the hook remote layers are mounted through. A Prepare's labels are
//!   parsed once into a [`remote_layer::RemoteLayer`]; a failed mount's
//!   [`remote_layer::MountError`] decides and names the fallback to an ordinary pull.
//! * containerd's filter syntax for List.
//!
//! Crates used: `tonic`/`prost` (gRPC), `redb` (metadata), `tokio`, `futures`,
//! `regex` (`~=` filters), `serde_json` (record encoding), `thiserror`, `tracing`, `nix`,
//! and the workspace's `remote-layer`.

mod error;
mod filter;
mod remote;
mod service;
mod snapshotter;
mod store;

/// Generated containerd API types, nested as their proto packages.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    pub mod containerd {
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
    }
    /// `containerd.services.snapshots.v1`.
    pub use containerd::services::snapshots::v1 as snapshots;
    /// `containerd.types`.
    pub use containerd::types;
}

pub use error::{Error, Result};
pub use remote::{NoRemote, RemoteFs, Served};
pub use service::{bind, serve, Service, NAMESPACE_HEADER};
pub use snapshotter::{Info, Mount, Options, Snapshotter};
pub use store::{Kind, Usage};
