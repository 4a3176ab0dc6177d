//! Content digests: the workspace's one [`Digest`] type (from `oci-digest`), and
//! verification that answers with this crate's errors.

pub use oci_digest::{Algorithm, Digest, DigestHasher, ParseDigestError};

use crate::error::{Error, Result};

impl From<ParseDigestError> for Error {
    fn from(e: ParseDigestError) -> Error {
        Error::InvalidDigest(e.0)
    }
}

/// Checks that `data` hashes to `expected`; `what` names the content in the error.
pub fn verify_digest(expected: &Digest, what: &str, data: &[u8]) -> Result<()> {
    let mut h = expected.hasher();
    h.update(data);
    finish_verify(h, expected, what)
}

/// Finishes `hasher` and compares with `expected`.
pub(crate) fn finish_verify(hasher: DigestHasher, expected: &Digest, what: &str) -> Result<()> {
    let actual = hasher.finish();
    if actual != *expected {
        return Err(Error::DigestMismatch {
            what: what.to_string(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_verify() {
        let d = Digest::sha256(b"abc");
        assert_eq!(d.to_string().len(), 71);
        assert_eq!(Digest::parse(&d.to_string()).ok(), Some(d.clone()));
        assert!(verify_digest(&d, "x", b"abc").is_ok());
        assert!(matches!(
            verify_digest(&d, "x", b"abd"),
            Err(Error::DigestMismatch { .. })
        ));
        assert!(Digest::parse("sha256:abc").is_err());
        assert!(Digest::parse("md5:00").is_err());
        assert!(Digest::parse("nocolon").is_err());
    }
}
