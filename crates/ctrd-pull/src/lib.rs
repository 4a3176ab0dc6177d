//! Talking to containerd: [`rpull`] puts an image's manifest and config into
//! containerd's content store and prepares each layer's snapshot with the labels a
//! remote snapshotter (the stargz one) reads, so eStargz layers are mounted lazily;
//! layers the snapshotter refuses are fetched and unpacked. [`ContainerdSession`]
//! exposes containerd's image store as a [`convert::ImageBackend`], so images are
//! converted and optimized where `ctr` pulled them.
//!
//! Built on `containerd-client` (tonic) for the gRPC side and on `registry` and
//! `convert`'s [`convert::Store`] for the image side.

mod ctd;
mod error;
mod rpull;
mod store;

pub use error::{Error, Result};
pub use rpull::{
    rpull, RpullOptions, RpullReport, DEFAULT_PREFETCH_SIZE, SNAPSHOT_REF_LABEL,
    STARGZ_DIGEST_LABEL, STARGZ_LAYERS_LABEL, STARGZ_REFERENCE_LABEL, STARGZ_SKIP_VERIFY_LABEL,
};
pub use store::{toc_image_name, ContainerdImage, ContainerdSession};
