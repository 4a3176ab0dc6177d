//! `stargz-store`: an additional layer store for containers/storage (Podman, CRI-O,
//! Buildah) that serves eStargz and zstd:chunked layers lazily, as a library behind two
//! thin binaries, `stargz-store` ([`daemon`]) and `stargz-store-helper` (the credential
//! hand-off client, [`control::add_credential`]).
//!
//! containers/storage looks a layer up at
//! `<mountpoint>/<base64(image ref)>/<layer digest>/` before pulling it; when `diff`,
//! `info` and `blob` are there, it links the layer to `diff` instead of downloading.
//! [`storefs`] serves that tree over FUSE, with `diff` a symlink to the layer's own
//! mount by the `fs` crate (verified TOC, chunk cache, prefetch, background fetch),
//! which [`manager`] opens and mounts under `<root>/pool`. Layers that cannot be served
//! lazily (plain gzip, no TOC digest) are absent, so containers/storage pulls them.
//!
//! Modules depend on each other one way: [`config`] and [`auth`] need nothing of this
//! crate; [`control`] feeds [`auth`]'s hand-off; [`manager`] uses [`auth`]; [`storefs`]
//! serves [`manager`]; [`daemon`] puts them together.
//!
//! Built on `fuser`, `tokio`, `tonic` (the hand-off), `hyper` (metrics), `serde`,
//! `tracing` and the workspace's `fs`, `registry`, `estargz` and `remote-layer`.

pub mod auth;
pub mod config;
pub mod control;
pub mod daemon;
pub mod manager;
pub mod storefs;
