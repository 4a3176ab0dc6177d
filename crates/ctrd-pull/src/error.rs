//! The crate's error type.

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Registry(#[from] registry::Error),
    /// Fetching a layer through [`convert::Store`].
    #[error(transparent)]
    Convert(#[from] convert::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {reason}")]
    BadImage { what: String, reason: String },
    #[error("containerd: {0}")]
    Containerd(String),
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
