//! Where the images a command names live: containerd's image store, a registry, or
//! an OCI image layout. The rule, the same for `convert`, `optimize`, `inspect` and
//! `get-toc-digest`:
//!
//! - `oci:DIR[:TAG]`, `docker://REF` and `containerd://NAME` say it outright.
//! - A plain SOURCE is an image of containerd's image store, as with the reference's
//!   `ctr-remote` (`ctr-remote image pull SRC` first); `--from-registry` makes it a
//!   registry reference. A plain name containerd does not have is an error, never a
//!   silent registry pull.
//! - A plain TARGET goes where a plain name of the source's kind goes: containerd's
//!   store when the source is there, else the registry; `--to-registry` forces the
//!   registry.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use containerd_pull::ContainerdSession;
use convert::{Location, Store};
use registry::{Client, Reference};

/// Prefix of an explicit registry reference.
pub const REGISTRY_PREFIX: &str = "docker://";
/// Prefix of an explicit containerd image name.
pub const CONTAINERD_PREFIX: &str = "containerd://";

/// An image's home, resolved from its command-line name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    Registry(Reference),
    Layout { dir: PathBuf, tag: Option<String> },
    Containerd(String),
}

impl Place {
    /// The registry host, for `--plain-http`.
    pub fn registry_host(&self) -> Option<&str> {
        match self {
            Place::Registry(r) => Some(r.registry()),
            _ => None,
        }
    }

    pub fn is_containerd(&self) -> bool {
        matches!(self, Place::Containerd(_))
    }
}

/// Flags that make plain names registry references.
#[derive(Debug, Args, Clone, Default)]
pub struct PlaceArgs {
    /// A plain SOURCE is a registry reference, not an image in containerd's store
    /// (same as writing docker://SOURCE).
    #[arg(long)]
    pub from_registry: bool,
    /// A plain TARGET is a registry reference (same as docker://TARGET).
    #[arg(long)]
    pub to_registry: bool,
}

fn registry(s: &str) -> Result<Place> {
    Ok(Place::Registry(Reference::parse(s).with_context(|| {
        format!("parsing image reference {s:?}")
    })?))
}

/// The place a prefixed name gives, `None` for a plain name.
pub fn explicit(s: &str) -> Result<Option<Place>> {
    if let Some(rest) = s.strip_prefix(REGISTRY_PREFIX) {
        return registry(rest).map(Some);
    }
    if let Some(rest) = s.strip_prefix(CONTAINERD_PREFIX) {
        if rest.is_empty() {
            bail!("no image name after {CONTAINERD_PREFIX}");
        }
        return Ok(Some(Place::Containerd(rest.to_string())));
    }
    if s.starts_with("oci:") {
        return match Location::parse(s).with_context(|| format!("parsing {s:?}"))? {
            Location::Layout { dir, tag } => Ok(Some(Place::Layout { dir, tag })),
            Location::Registry(r) => Ok(Some(Place::Registry(r))),
        };
    }
    Ok(None)
}

/// The place of a source image (read only).
pub fn source(s: &str, from_registry: bool) -> Result<Place> {
    if let Some(p) = explicit(s)? {
        return Ok(p);
    }
    if from_registry {
        return registry(s);
    }
    Ok(Place::Containerd(s.to_string()))
}

/// The place of a target image, given where the source is.
pub fn target(s: &str, src: &Place, to_registry: bool) -> Result<Place> {
    if let Some(p) = explicit(s)? {
        return Ok(p);
    }
    if to_registry || !src.is_containerd() {
        return registry(s);
    }
    Ok(Place::Containerd(s.to_string()))
}

/// containerd connection settings given as global flags.
#[derive(Debug, Clone)]
pub struct Containerd {
    pub address: String,
    pub namespace: String,
}

/// Opens the stores of `places`, connecting to containerd (one session, one lease)
/// when one of them is there. The session must be closed once the work is done.
pub async fn open_stores(
    places: &[&Place],
    client: &Client,
    containerd: &Containerd,
) -> Result<(Vec<Store>, Option<ContainerdSession>)> {
    let session = if places.iter().any(|p| p.is_containerd()) {
        Some(
            ContainerdSession::connect(&containerd.address, &containerd.namespace)
                .await
                .with_context(|| {
                    format!(
                        "a plain image name means containerd's image store (as with the \
                         reference ctr-remote), but containerd at {} did not answer; for a \
                         registry image write {REGISTRY_PREFIX}NAME (or --from-registry / \
                         --to-registry), for an OCI layout oci:DIR[:TAG]",
                        containerd.address
                    )
                })?,
        )
    } else {
        None
    };
    let mut stores = Vec::with_capacity(places.len());
    for p in places {
        stores.push(match p {
            Place::Registry(r) => Store::registry(client.clone(), r.clone()),
            Place::Layout { dir, tag } => Store::open(
                &Location::Layout {
                    dir: dir.clone(),
                    tag: tag.clone(),
                },
                client,
            ),
            Place::Containerd(name) => {
                let Some(s) = &session else {
                    bail!("no containerd session");
                };
                Store::backend(Arc::new(s.image(name)))
            }
        });
    }
    Ok((stores, session))
}

/// Fails unless containerd has the source image `name`, naming the ways out.
pub async fn require_image(session: &ContainerdSession, name: &str, namespace: &str) -> Result<()> {
    if session.has_image(name).await? {
        return Ok(());
    }
    bail!(
        "{name} is not an image in containerd's image store (namespace {namespace}). A plain \
         name means containerd's store, as with the reference ctr-remote: pull it first \
         (ctr-remote image pull {name}), or read it from its registry with \
         {REGISTRY_PREFIX}{name} (or --from-registry)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        let c = |s: &str| Place::Containerd(s.into());
        let r = |s: &str| Place::Registry(Reference::parse(s).unwrap());
        assert_eq!(source("host:5000/a:1", false).unwrap(), c("host:5000/a:1"));
        assert_eq!(source("host:5000/a:1", true).unwrap(), r("host:5000/a:1"));
        assert_eq!(
            source("docker://host:5000/a:1", false).unwrap(),
            r("host:5000/a:1")
        );
        assert_eq!(source("containerd://x", true).unwrap(), c("x"));
        assert!(matches!(
            source("oci:/tmp/d:t", false).unwrap(),
            Place::Layout { tag: Some(t), .. } if t == "t"
        ));
        // A plain target follows a containerd source, else goes to the registry.
        assert_eq!(target("h/b:2", &c("x"), false).unwrap(), c("h/b:2"));
        assert_eq!(target("h/b:2", &c("x"), true).unwrap(), r("h/b:2"));
        assert_eq!(target("h/b:2", &r("h/a:1"), false).unwrap(), r("h/b:2"));
        let layout = source("oci:/tmp/d", false).unwrap();
        assert_eq!(target("h/b:2", &layout, false).unwrap(), r("h/b:2"));
        assert_eq!(
            target("containerd://h/b:2", &r("h/a:1"), false).unwrap(),
            c("h/b:2")
        );
        assert!(source("containerd://", false).is_err());
    }
}
