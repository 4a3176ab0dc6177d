//! Content digests (`sha256:<hex>`): parsing, computing and verifying.

use std::fmt;

use sha2::{Digest as _, Sha256, Sha512};

use crate::error::{Error, Result};

/// A content digest such as `sha256:9f86...`. Only sha256 and sha512 are
/// accepted because those are the algorithms OCI registries use.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: String,
    hex: String,
}

impl Digest {
    /// Parses `algorithm:hex`, checking the hex length for the algorithm.
    pub fn parse(s: &str) -> Result<Self> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| Error::InvalidDigest(s.to_string()))?;
        let want_len = match alg {
            "sha256" => 64,
            "sha512" => 128,
            _ => return Err(Error::InvalidDigest(s.to_string())),
        };
        if hex.len() != want_len || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Error::InvalidDigest(s.to_string()));
        }
        Ok(Digest {
            algorithm: alg.to_string(),
            hex: hex.to_string(),
        })
    }

    /// The sha256 digest of `data`.
    pub fn sha256(data: &[u8]) -> Self {
        Digest {
            algorithm: "sha256".into(),
            hex: hex::encode(Sha256::digest(data)),
        }
    }

    /// The algorithm name, e.g. `sha256`.
    pub fn algorithm(&self) -> &str {
        &self.algorithm
    }

    /// The lowercase hex part.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// A hasher for this digest's algorithm, for streaming verification.
    pub fn hasher(&self) -> DigestHasher {
        match self.algorithm.as_str() {
            "sha512" => DigestHasher::Sha512(Sha512::new()),
            _ => DigestHasher::Sha256(Sha256::new()),
        }
    }

    /// Checks that `data` hashes to this digest; `what` names the content in the error.
    pub fn verify(&self, what: &str, data: &[u8]) -> Result<()> {
        let mut h = self.hasher();
        h.update(data);
        h.finish_verify(self, what)
    }
}

/// Incremental hasher matching a [`Digest`]'s algorithm.
pub enum DigestHasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl DigestHasher {
    /// Feeds more content.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            DigestHasher::Sha256(h) => h.update(data),
            DigestHasher::Sha512(h) => h.update(data),
        }
    }

    /// Finishes and compares with `expected`.
    pub fn finish_verify(self, expected: &Digest, what: &str) -> Result<()> {
        let (alg, hex) = match self {
            DigestHasher::Sha256(h) => ("sha256", hex::encode(h.finalize())),
            DigestHasher::Sha512(h) => ("sha512", hex::encode(h.finalize())),
        };
        if hex != expected.hex {
            return Err(Error::DigestMismatch {
                what: what.to_string(),
                expected: expected.to_string(),
                actual: format!("{alg}:{hex}"),
            });
        }
        Ok(())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Digest::parse(s)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_verify() {
        let d = Digest::sha256(b"abc");
        assert_eq!(d.to_string().len(), 71);
        assert_eq!(Digest::parse(&d.to_string()).ok(), Some(d.clone()));
        assert!(d.verify("x", b"abc").is_ok());
        assert!(matches!(
            d.verify("x", b"abd"),
            Err(Error::DigestMismatch { .. })
        ));
        assert!(Digest::parse("sha256:abc").is_err());
        assert!(Digest::parse("md5:00").is_err());
        assert!(Digest::parse("nocolon").is_err());
    }
}
