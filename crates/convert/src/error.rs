//! The crate's error type.

use std::path::PathBuf;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a conversion, a lookup or an inspection failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Registry(#[from] registry::Error),
    #[error(transparent)]
    Estargz(#[from] estargz::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid image location {location:?}: {reason}")]
    Location { location: String, reason: String },
    #[error("OCI layout {}: {reason}", path.display())]
    Layout { path: PathBuf, reason: String },
    #[error("invalid options: {0}")]
    Options(String),
    #[error("{what}: {reason}")]
    BadImage { what: String, reason: String },
    #[error("no manifest of {image} matches the requested platforms ({wanted})")]
    NoPlatform { image: String, wanted: String },
    #[error("layer {digest} not found in the image")]
    LayerNotFound { digest: String },
    #[error("background task failed: {0}")]
    Task(String),
    #[error("optimizing runs the workload in a container and needs root (CAP_SYS_ADMIN for overlayfs, fanotify and runc)")]
    NotRoot,
    #[error("fanotify is unavailable: {0} (needs root and a kernel with CONFIG_FANOTIFY)")]
    Fanotify(String),
    #[error("container runtime: {0}")]
    Runtime(String),
    #[error("preparing the workload's sandbox: {0}")]
    Sandbox(String),
    #[error("the workload failed ({status}); its output ends with:\n{output}")]
    WorkloadFailed { status: String, output: String },
    #[error("interrupted")]
    Interrupted,
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("CNI networking: {0}")]
    Cni(String),
    #[error("CNI plugin {plugin} failed on {command}: {message}")]
    CniPlugin {
        plugin: String,
        command: String,
        message: String,
    },
    #[error("--gpus: {0}")]
    Cdi(String),
    /// An image store implemented outside this crate (containerd's) failed.
    #[error("{0}")]
    Backend(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn bad(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::BadImage {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
