//! [`MountError`]: why a remote filesystem could not mount, check or unmount a layer,
//! and the [`Fallback`] each reason calls for.

use serde::{Deserialize, Serialize};

/// What the snapshotter does after a failed remote mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Download the layer (an ordinary pull): this layer cannot be served remotely
    /// as it is, and mounting it again would fail the same way.
    Pull,
    /// Download the layer now, but the cause is passing (network, timeout, the
    /// filesystem's server): mounting again later may succeed, so a remote snapshot
    /// that already exists is worth remounting on a later request.
    Retry,
}

impl Fallback {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Pull => "pull",
            Fallback::Retry => "retry",
        }
    }
}

/// Why a remote mount (or check, or unmount) failed. Serialized with a `kind` tag so
/// the FUSE manager can hand the reason to the daemon.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum MountError {
    /// The labels do not describe a fetchable layer (bad reference or digest).
    #[error("invalid remote layer labels: {0}")]
    InvalidLabels(String),
    /// The blob has no eStargz (or zstd:chunked) footer, or its TOC does not parse.
    #[error("not an eStargz layer: {0}")]
    NotEstargz(String),
    /// The TOC does not hash to the digest the labels give.
    #[error("TOC digest mismatch: {0}")]
    TocDigestMismatch(String),
    /// No TOC digest to verify against, and the configuration requires one.
    #[error("layer cannot be verified: {0}")]
    Unverifiable(String),
    /// The registry could not be reached (DNS, connection, TLS, rate limits, 5xx).
    #[error("registry unreachable: {0}")]
    RegistryUnreachable(String),
    /// The registry refused the credentials (401, 403) or they could not be read.
    #[error("registry refused the credentials: {0}")]
    AuthRefused(String),
    /// The registry wants credentials and no credential source had any for it.
    #[error("no credentials for the registry: {0}")]
    NoCredentials(String),
    /// The image, its manifest or the blob does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A fetch, or the remote filesystem's server, did not answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The remote filesystem's server (the FUSE manager) is not there.
    #[error("remote filesystem unavailable: {0}")]
    Unavailable(String),
    /// The mount point is not (or no longer) served.
    #[error("not mounted: {0}")]
    NotMounted(String),
    /// Remote snapshots are turned off.
    #[error("remote snapshots are disabled")]
    Disabled,
    /// A layer that cannot be mounted lazily could not be downloaded and unpacked by
    /// the snapshotter itself (digest mismatch, hostile archive, fetch error...).
    #[error("full pull failed: {0}")]
    FullPull(String),
    /// Anything else (the FUSE mount itself, local I/O...).
    #[error("{0}")]
    Other(String),
}

impl MountError {
    /// The variant's name, as serialized: what logs print as `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            MountError::InvalidLabels(_) => "invalid_labels",
            MountError::NotEstargz(_) => "not_estargz",
            MountError::TocDigestMismatch(_) => "toc_digest_mismatch",
            MountError::Unverifiable(_) => "unverifiable",
            MountError::RegistryUnreachable(_) => "registry_unreachable",
            MountError::AuthRefused(_) => "auth_refused",
            MountError::NoCredentials(_) => "no_credentials",
            MountError::NotFound(_) => "not_found",
            MountError::Timeout(_) => "timeout",
            MountError::Unavailable(_) => "unavailable",
            MountError::NotMounted(_) => "not_mounted",
            MountError::Disabled => "disabled",
            MountError::FullPull(_) => "full_pull",
            MountError::Other(_) => "other",
        }
    }

    /// The same failure with `context` put before its detail.
    pub fn context(mut self, context: impl std::fmt::Display) -> MountError {
        if let Some(detail) = self.detail_mut() {
            *detail = format!("{context}: {detail}");
        }
        self
    }

    fn detail_mut(&mut self) -> Option<&mut String> {
        match self {
            MountError::InvalidLabels(d)
            | MountError::NotEstargz(d)
            | MountError::TocDigestMismatch(d)
            | MountError::Unverifiable(d)
            | MountError::RegistryUnreachable(d)
            | MountError::AuthRefused(d)
            | MountError::NoCredentials(d)
            | MountError::NotFound(d)
            | MountError::Timeout(d)
            | MountError::Unavailable(d)
            | MountError::NotMounted(d)
            | MountError::FullPull(d)
            | MountError::Other(d) => Some(d),
            MountError::Disabled => None,
        }
    }

    /// What the snapshotter does about this failure: every failure of a Prepare's
    /// mount ends in an ordinary pull, and the passing ones are worth a later retry.
    /// Refused credentials count as lasting: they change only when the user acts.
    pub fn fallback(&self) -> Fallback {
        match self {
            MountError::RegistryUnreachable(_)
            | MountError::Timeout(_)
            | MountError::Unavailable(_)
            | MountError::NotMounted(_) => Fallback::Retry,
            MountError::InvalidLabels(_)
            | MountError::NotEstargz(_)
            | MountError::TocDigestMismatch(_)
            | MountError::Unverifiable(_)
            | MountError::AuthRefused(_)
            | MountError::NoCredentials(_)
            | MountError::NotFound(_)
            | MountError::Disabled
            | MountError::FullPull(_)
            | MountError::Other(_) => Fallback::Pull,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<MountError> {
        let s = || "x".to_string();
        vec![
            MountError::InvalidLabels(s()),
            MountError::NotEstargz(s()),
            MountError::TocDigestMismatch(s()),
            MountError::Unverifiable(s()),
            MountError::RegistryUnreachable(s()),
            MountError::AuthRefused(s()),
            MountError::NoCredentials(s()),
            MountError::NotFound(s()),
            MountError::Timeout(s()),
            MountError::Unavailable(s()),
            MountError::NotMounted(s()),
            MountError::Disabled,
            MountError::FullPull(s()),
            MountError::Other(s()),
        ]
    }

    #[test]
    fn fallback_decision() {
        let retry: Vec<&str> = all()
            .iter()
            .filter(|e| e.fallback() == Fallback::Retry)
            .map(MountError::kind)
            .collect();
        assert_eq!(
            retry,
            [
                "registry_unreachable",
                "timeout",
                "unavailable",
                "not_mounted"
            ]
        );
        for e in [
            MountError::NotEstargz("no footer".into()),
            MountError::TocDigestMismatch("sha256:a != sha256:b".into()),
            MountError::AuthRefused("401".into()),
            MountError::NoCredentials("401".into()),
            MountError::InvalidLabels("bad digest".into()),
            MountError::Disabled,
        ] {
            assert_eq!(e.fallback(), Fallback::Pull, "{e}");
        }
    }

    #[test]
    fn context_keeps_the_kind() {
        let e = MountError::Timeout("slow".into()).context("blob sha256:aa");
        assert_eq!(e, MountError::Timeout("blob sha256:aa: slow".into()));
        assert_eq!(MountError::Disabled.context("x"), MountError::Disabled);
    }

    #[test]
    fn kind_is_the_serialized_tag() {
        for e in all() {
            let text = serde_json::to_string(&e).unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["kind"], e.kind(), "{text}");
            assert_eq!(serde_json::from_str::<MountError>(&text).unwrap(), e);
        }
        assert_eq!(
            serde_json::to_string(&MountError::NotEstargz("no footer".into())).unwrap(),
            r#"{"kind":"not_estargz","detail":"no footer"}"#
        );
    }
}
