//! Sorting the `fs` and `registry` crates' errors into the [`MountError`] kinds the
//! snapshotter decides its fallback by.

use std::io;

use remote_layer::MountError;

/// The kind of a failure to open or mount a layer.
pub fn fs_error(e: &fs::Error) -> MountError {
    let text = e.to_string();
    match e {
        fs::Error::Fetch { source, .. } => match registry_source(source) {
            Some(r) => registry_kind(r, text),
            None => io_kind(source, text),
        },
        fs::Error::Format { source, .. } => match source {
            estargz::Error::TocDigestMismatch { .. } | estargz::Error::DigestMismatch { .. } => {
                MountError::TocDigestMismatch(text)
            }
            estargz::Error::Io(source) | estargz::Error::IoAt { source, .. } => {
                match registry_source(source) {
                    Some(r) => registry_kind(r, text),
                    None => io_kind(source, text),
                }
            }
            // Footer, TOC and entries that do not parse: not a layer this daemon serves.
            _ => MountError::NotEstargz(text),
        },
        fs::Error::NoVerification { .. } => MountError::Unverifiable(text),
        _ => MountError::Other(text),
    }
}

/// The kind of a failed registry request.
pub fn registry_error(e: &registry::Error) -> MountError {
    registry_kind(e, e.to_string())
}

/// The kind of a failed blob read, which carries the registry's error when it has one.
pub fn io_error(e: &io::Error) -> MountError {
    let text = e.to_string();
    match registry_source(e) {
        Some(r) => registry_kind(r, text),
        None => io_kind(e, text),
    }
}

fn registry_source(e: &io::Error) -> Option<&registry::Error> {
    e.get_ref()?.downcast_ref::<registry::Error>()
}

fn registry_kind(e: &registry::Error, text: String) -> MountError {
    use registry::Error as R;
    match e {
        R::Unauthorized { .. } | R::Forbidden { .. } | R::Credentials { .. } => {
            MountError::AuthRefused(text)
        }
        R::NoCredentials { .. } => MountError::NoCredentials(text),
        R::Status {
            status: 401 | 403, ..
        } => MountError::AuthRefused(text),
        R::ManifestNotFound { .. } | R::BlobNotFound { .. } | R::PlatformNotFound { .. } => {
            MountError::NotFound(text)
        }
        R::Status { status: 404, .. } => MountError::NotFound(text),
        R::Timeout { .. } => MountError::Timeout(text),
        R::UnknownHost { .. }
        | R::ConnectionRefused { .. }
        | R::Tls { .. }
        | R::Connection { .. }
        | R::RateLimited { .. } => MountError::RegistryUnreachable(text),
        R::Status { status, .. } if *status >= 500 => MountError::RegistryUnreachable(text),
        R::InvalidReference { .. } | R::InvalidDigest(_) => MountError::InvalidLabels(text),
        _ => MountError::Other(text),
    }
}

fn io_kind(e: &io::Error, text: String) -> MountError {
    use io::ErrorKind as K;
    match e.kind() {
        K::TimedOut => MountError::Timeout(text),
        K::ConnectionRefused
        | K::ConnectionReset
        | K::ConnectionAborted
        | K::NotConnected
        | K::HostUnreachable
        | K::NetworkUnreachable => MountError::RegistryUnreachable(text),
        _ => MountError::Other(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remote_layer::Fallback;

    fn fetch(source: io::Error) -> fs::Error {
        fs::Error::Fetch {
            what: "footer of layer sha256:aa".into(),
            source,
        }
    }

    #[test]
    fn registry_errors_inside_fetches() {
        let host = || "127.0.0.1:5000".to_string();
        let cases = [
            (
                registry::Error::Unauthorized {
                    host: host(),
                    credentials_source: "none".into(),
                },
                "auth_refused",
            ),
            (
                registry::Error::NoCredentials {
                    host: host(),
                    credentials_source: "docker config".into(),
                },
                "no_credentials",
            ),
            (
                registry::Error::Forbidden {
                    host: host(),
                    what: "blob".into(),
                },
                "auth_refused",
            ),
            (
                registry::Error::Status {
                    method: "GET".into(),
                    url: "u".into(),
                    status: 401,
                    body: String::new(),
                },
                "auth_refused",
            ),
            (
                registry::Error::ConnectionRefused { host: host() },
                "registry_unreachable",
            ),
            (
                registry::Error::Timeout {
                    host: host(),
                    after: std::time::Duration::from_secs(1),
                },
                "timeout",
            ),
            (
                registry::Error::BlobNotFound {
                    host: host(),
                    repository: "r".into(),
                    digest: "sha256:aa".into(),
                },
                "not_found",
            ),
            (
                registry::Error::InvalidDigest("sha256:zz".into()),
                "invalid_labels",
            ),
        ];
        for (e, kind) in cases {
            assert_eq!(registry_error(&e).kind(), kind, "{e}");
            let wrapped = fetch(io::Error::other(e));
            assert_eq!(fs_error(&wrapped).kind(), kind, "{wrapped}");
        }
    }

    #[test]
    fn format_and_policy_errors() {
        let format = |source| fs::Error::Format {
            layer: "sha256:aa".into(),
            source,
        };
        let e = fs_error(&format(estargz::Error::NoFooter { checked: 51 }));
        assert_eq!(e.kind(), "not_estargz");
        assert_eq!(e.fallback(), Fallback::Pull);
        let e = fs_error(&format(estargz::Error::BadToc {
            offset: 0,
            reason: "x".into(),
        }));
        assert_eq!(e.kind(), "not_estargz");
        let e = fs_error(&format(estargz::Error::TocDigestMismatch {
            expected: "sha256:a".into(),
            actual: "sha256:b".into(),
        }));
        assert_eq!(e.kind(), "toc_digest_mismatch");
        let e = fs_error(&fs::Error::NoVerification {
            layer: "sha256:aa".into(),
        });
        assert_eq!(e.kind(), "unverifiable");
        let e = fs_error(&fetch(io::Error::new(io::ErrorKind::TimedOut, "slow")));
        assert_eq!((e.kind(), e.fallback()), ("timeout", Fallback::Retry));
        let e = fs_error(&fetch(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "short read",
        )));
        assert_eq!(e.kind(), "other");
    }
}
