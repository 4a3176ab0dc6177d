//! The stargz snapshotter daemon as a library, behind two thin binaries:
//! `containerd-stargz-grpc` ([`daemon`]) and `stargz-fuse-manager`
//! ([`fuse_manager`]).
//!
//! Modules depend on each other one way only, from the bottom up:
//! [`keys`] and [`manager::protocol`] need nothing of this crate; [`config`] screens
//! the file with [`keys`]; [`manager::launch`]
//! reads [`config`]; [`manager::client`] speaks the protocol to a launched manager;
//! [`metrics`] scrapes this process or that client; [`cri`] forwards the CRI image
//! service and records its credentials (no other module of this crate); `classify` sorts `fs` and
//! `registry` errors into [`remote_layer::MountError`] kinds; `preopen` opens layers
//! with them and hands an image's open layers to `zeroconf`, which fetches the
//! files its container starts with, and to [`learned`] (record and prefetch what
//! workloads read first); [`remote`] mounts what `preopen` opened; [`fullpull`]
//! downloads and unpacks the layers that cannot be mounted lazily (needing nothing of
//! this crate); [`fuse_manager`] and [`daemon`] put these together into the two processes.

mod classify;
pub mod config;
pub mod cri;
pub mod daemon;
pub(crate) mod early_tail;
pub mod fullpull;
pub mod fuse_manager;
pub mod keys;
pub mod learned;
pub mod logging;
pub mod manager;
pub mod metrics;
mod preopen;
pub mod remote;
mod zeroconf;
