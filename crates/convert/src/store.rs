//! Where images are read from and written to: a registry repository, an OCI
//! image layout directory (`oci:DIR[:TAG]`), or a store implemented elsewhere
//! through [`ImageBackend`] (containerd's), behind one [`Store`] type.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::LocalBoxFuture;
use registry::{
    Client, Descriptor, Digest, FetchedManifest, PushBlobOptions, Reference, OCI_INDEX,
};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};

/// Annotation naming an entry of an OCI layout's `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

pub use remote_layer::TOC_IMAGE_SUFFIX;

/// An image store this crate does not implement itself (containerd's content and
/// image stores, for one), with the operations the built-in kinds have. Blobs read
/// through it are checked against their digests by the implementation. Its futures
/// need not be `Send`: like the registry client's, they run on the caller's task.
pub trait ImageBackend: Send + Sync {
    /// The image's name, for messages.
    fn describe(&self) -> String;
    /// The manifest or index the image names.
    fn root(&self) -> LocalBoxFuture<'_, Result<FetchedManifest>>;
    /// A small blob (config, manifest) whole.
    fn blob_bytes<'a>(&'a self, digest: &'a Digest) -> LocalBoxFuture<'a, Result<Bytes>>;
    /// A blob as a local file (a temporary copy in `workdir`).
    fn fetch_blob<'a>(
        &'a self,
        desc: &'a Descriptor,
        workdir: &'a Path,
    ) -> LocalBoxFuture<'a, Result<LocalBlob>>;
    fn has_blob<'a>(&'a self, digest: &'a Digest) -> LocalBoxFuture<'a, Result<bool>>;
    /// Stores a blob from a file unless present; returns whether bytes moved.
    fn put_blob_file<'a>(
        &'a self,
        digest: &'a Digest,
        path: &'a Path,
    ) -> LocalBoxFuture<'a, Result<bool>>;
    /// Stores a small blob; returns its digest.
    fn put_blob_bytes(&self, data: Bytes) -> LocalBoxFuture<'_, Result<Digest>>;
    /// Stores a manifest an index will name.
    fn put_manifest<'a>(
        &'a self,
        media_type: &'a str,
        data: Bytes,
    ) -> LocalBoxFuture<'a, Result<Digest>>;
    /// Stores the top manifest or index and names the image after it.
    fn put_root<'a>(
        &'a self,
        media_type: &'a str,
        data: Bytes,
    ) -> LocalBoxFuture<'a, Result<Digest>>;
    /// Random access to a blob; used from a blocking thread.
    fn blob_source(&self, desc: &Descriptor) -> Result<Box<dyn estargz::BlobSource>>;
    /// The same store under the name of this image's TOC image (see [`TOC_IMAGE_SUFFIX`]).
    fn toc_image(&self) -> Result<Arc<dyn ImageBackend>>;
}

/// `tag` with the TOC image suffix, checked against the tag grammar.
fn toc_tag(tag: &str) -> Result<String> {
    let t = format!("{tag}{TOC_IMAGE_SUFFIX}");
    if t.len() > 128 {
        return Err(Error::Options(format!(
            "the TOC image's tag {t:?} is longer than 128 characters"
        )));
    }
    Ok(t)
}

/// Uploads of blobs at least this large go out in PATCH chunks, so a failure
/// costs one chunk rather than the whole layer.
const CHUNKED_UPLOAD_THRESHOLD: u64 = 64 << 20;
const UPLOAD_CHUNK: usize = 16 << 20;

/// An image location as given on a command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A registry reference (`host/repo:tag`, `host/repo@sha256:...`).
    Registry(Reference),
    /// An OCI image layout directory and the tag (`org.opencontainers.image.ref.name`)
    /// of the image inside it.
    Layout { dir: PathBuf, tag: Option<String> },
}

impl Location {
    /// Parses `oci:DIR[:TAG]` or a registry reference.
    pub fn parse(s: &str) -> Result<Location> {
        if let Some(rest) = s.strip_prefix("oci:") {
            if rest.is_empty() {
                return Err(Error::Location {
                    location: s.into(),
                    reason: "no directory after oci:".into(),
                });
            }
            // A tag never holds '/', so a last ':' followed by one belongs to the path.
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !d.is_empty() && !t.is_empty() && !t.contains('/') => {
                    (d, Some(t.to_string()))
                }
                _ => (rest, None),
            };
            return Ok(Location::Layout {
                dir: PathBuf::from(dir),
                tag,
            });
        }
        Ok(Location::Registry(Reference::parse(s)?))
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Registry(r) => write!(f, "{r}"),
            Location::Layout { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            Location::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
        }
    }
}

/// A blob available as a local file: either a temporary download or a file
/// that already lives in a layout.
pub enum LocalBlob {
    Temp(tempfile::NamedTempFile),
    Path(PathBuf),
}

impl LocalBlob {
    pub fn path(&self) -> &Path {
        match self {
            LocalBlob::Temp(t) => t.path(),
            LocalBlob::Path(p) => p,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutIndex {
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    annotations: Option<std::collections::BTreeMap<String, String>>,
}

enum Kind {
    Registry {
        client: Client,
        reference: Reference,
    },
    Layout {
        dir: PathBuf,
        tag: Option<String>,
    },
    Backend(Arc<dyn ImageBackend>),
}

/// One image's home, read or written.
#[derive(Clone)]
pub struct Store {
    kind: Arc<Kind>,
}

impl Store {
    /// A store for a registry repository.
    pub fn registry(client: Client, reference: Reference) -> Store {
        Store {
            kind: Arc::new(Kind::Registry { client, reference }),
        }
    }

    /// A store implemented outside this crate.
    pub fn backend(backend: Arc<dyn ImageBackend>) -> Store {
        Store {
            kind: Arc::new(Kind::Backend(backend)),
        }
    }

    /// The store of this image's TOC image (`<tag>-esgztoc`, in the same place), which
    /// `--estargz-external-toc` writes and lazy pulls read.
    pub fn toc_image(&self) -> Result<Store> {
        let kind = match &*self.kind {
            Kind::Registry { client, reference } => {
                let tag = reference.tag().ok_or_else(|| {
                    Error::Options(format!(
                        "{reference} has no tag: its TOC image is named after the tag ({TOC_IMAGE_SUFFIX} appended)"
                    ))
                })?;
                Kind::Registry {
                    client: client.clone(),
                    reference: reference.at_tag(&toc_tag(tag)?)?,
                }
            }
            Kind::Layout { dir, tag } => {
                let tag = tag.as_deref().ok_or_else(|| Error::Layout {
                    path: dir.clone(),
                    reason: format!(
                        "name the image with oci:DIR:TAG: its TOC image is tagged TAG{TOC_IMAGE_SUFFIX}"
                    ),
                })?;
                Kind::Layout {
                    dir: dir.clone(),
                    tag: Some(toc_tag(tag)?),
                }
            }
            Kind::Backend(b) => Kind::Backend(b.toc_image()?),
        };
        Ok(Store {
            kind: Arc::new(kind),
        })
    }

    /// A store for a location; `client` serves registry locations.
    pub fn open(location: &Location, client: &Client) -> Store {
        match location {
            Location::Registry(r) => Store::registry(client.clone(), r.clone()),
            Location::Layout { dir, tag } => Store {
                kind: Arc::new(Kind::Layout {
                    dir: dir.clone(),
                    tag: tag.clone(),
                }),
            },
        }
    }

    /// The registry client and repository reference of a registry store.
    pub fn as_registry(&self) -> Option<(&Client, &Reference)> {
        match &*self.kind {
            Kind::Registry { client, reference } => Some((client, reference)),
            _ => None,
        }
    }

    /// For messages.
    pub fn describe(&self) -> String {
        match &*self.kind {
            Kind::Registry { reference, .. } => reference.to_string(),
            Kind::Layout { dir, tag: Some(t) } => format!("oci:{}:{t}", dir.display()),
            Kind::Layout { dir, tag: None } => format!("oci:{}", dir.display()),
            Kind::Backend(b) => b.describe(),
        }
    }

    fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
        dir.join("blobs")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    fn read_layout_index(dir: &Path) -> Result<LayoutIndex> {
        let p = dir.join("index.json");
        let bytes =
            std::fs::read(&p).map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Layout {
            path: dir.to_path_buf(),
            reason: format!("index.json: {e}"),
        })
    }

    /// The manifest or index the location names.
    pub async fn root(&self) -> Result<FetchedManifest> {
        match &*self.kind {
            Kind::Registry { client, reference } => Ok(client.get_manifest(reference).await?),
            Kind::Backend(b) => b.root().await,
            Kind::Layout { dir, tag } => {
                let idx = Self::read_layout_index(dir)?;
                let chosen: Vec<&Descriptor> = idx
                    .manifests
                    .iter()
                    .filter(|d| match tag {
                        Some(t) => d
                            .annotations
                            .as_ref()
                            .and_then(|a| a.get(REF_NAME_ANNOTATION))
                            .is_some_and(|n| n == t),
                        None => true,
                    })
                    .collect();
                let d = match chosen.as_slice() {
                    [one] => *one,
                    [] => {
                        return Err(Error::Layout {
                            path: dir.clone(),
                            reason: match tag {
                                Some(t) => format!("no image tagged {t:?}"),
                                None => "index.json lists no image".into(),
                            },
                        })
                    }
                    _ => {
                        return Err(Error::Layout {
                            path: dir.clone(),
                            reason: "several images; name one with oci:DIR:TAG".into(),
                        })
                    }
                };
                let bytes = self.blob_bytes(&d.digest).await?;
                Ok(FetchedManifest {
                    bytes,
                    digest: d.digest.clone(),
                    media_type: d.media_type.clone(),
                })
            }
        }
    }

    /// A manifest by digest (a child of an index).
    pub async fn manifest(&self, desc: &Descriptor) -> Result<FetchedManifest> {
        match &*self.kind {
            Kind::Registry { client, reference } => Ok(client
                .get_manifest(&reference.at_digest(desc.digest.clone()))
                .await?),
            Kind::Layout { .. } | Kind::Backend(_) => Ok(FetchedManifest {
                bytes: self.blob_bytes(&desc.digest).await?,
                digest: desc.digest.clone(),
                media_type: desc.media_type.clone(),
            }),
        }
    }

    /// A small blob (a config, a manifest) whole, digest verified.
    pub async fn blob_bytes(&self, digest: &Digest) -> Result<Bytes> {
        match &*self.kind {
            Kind::Registry { client, reference } => Ok(client.get_blob(reference, digest).await?),
            Kind::Backend(b) => b.blob_bytes(digest).await,
            Kind::Layout { dir, .. } => {
                let p = Self::blob_path(dir, digest);
                let data = tokio::fs::read(&p)
                    .await
                    .map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
                registry::verify_digest(digest, &format!("blob {}", p.display()), &data)?;
                Ok(Bytes::from(data))
            }
        }
    }

    /// A blob as a local file: downloaded (and verified) into `workdir` from a
    /// registry, or the layout's own file.
    pub async fn fetch_blob(&self, desc: &Descriptor, workdir: &Path) -> Result<LocalBlob> {
        match &*self.kind {
            Kind::Registry { client, reference } => {
                let tmp = tempfile::NamedTempFile::new_in(workdir)
                    .map_err(|e| Error::io("creating a temporary file", e))?;
                let std_file = tmp
                    .reopen()
                    .map_err(|e| Error::io("opening a temporary file", e))?;
                let mut f = tokio::io::BufWriter::with_capacity(
                    1 << 20,
                    tokio::fs::File::from_std(std_file),
                );
                client
                    .blob_reader(reference, desc.digest.clone(), Some(desc.size))
                    .copy_to(&mut f)
                    .await?;
                f.flush()
                    .await
                    .map_err(|e| Error::io("writing a temporary file", e))?;
                Ok(LocalBlob::Temp(tmp))
            }
            Kind::Backend(b) => b.fetch_blob(desc, workdir).await,
            Kind::Layout { dir, .. } => {
                let p = Self::blob_path(dir, &desc.digest);
                let meta = tokio::fs::metadata(&p)
                    .await
                    .map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
                if meta.len() != desc.size {
                    return Err(Error::Layout {
                        path: dir.clone(),
                        reason: format!(
                            "blob {} has {} bytes, its descriptor says {}",
                            desc.digest,
                            meta.len(),
                            desc.size
                        ),
                    });
                }
                Ok(LocalBlob::Path(p))
            }
        }
    }

    /// Whether the store already holds a blob.
    pub async fn has_blob(&self, digest: &Digest) -> Result<bool> {
        match &*self.kind {
            Kind::Registry { client, reference } => {
                Ok(client.blob_exists(reference, digest).await?.is_some())
            }
            Kind::Backend(b) => b.has_blob(digest).await,
            Kind::Layout { dir, .. } => Ok(tokio::fs::try_exists(Self::blob_path(dir, digest))
                .await
                .unwrap_or(false)),
        }
    }

    /// Stores a blob from a file unless the store has it. Returns whether bytes moved.
    pub async fn put_blob_file(&self, digest: &Digest, path: &Path) -> Result<bool> {
        if let Kind::Backend(b) = &*self.kind {
            return b.put_blob_file(digest, path).await;
        }
        if self.has_blob(digest).await? {
            return Ok(false);
        }
        match &*self.kind {
            Kind::Backend(b) => b.put_blob_file(digest, path).await,
            Kind::Registry { client, reference } => {
                let file = std::fs::File::open(path)
                    .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
                let size = file
                    .metadata()
                    .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
                    .len();
                let data = if size == 0 {
                    Bytes::new()
                } else {
                    // SAFETY: the file is a private temporary file or a layout blob
                    // that nothing rewrites while the upload runs. Mapping it keeps
                    // a multi-gigabyte layer out of anonymous memory: the pages are
                    // file-backed and the kernel can drop them at will.
                    let map = unsafe { memmap2::Mmap::map(&file) }
                        .map_err(|e| Error::io(format!("mapping {}", path.display()), e))?;
                    Bytes::from_owner(map)
                };
                let opts = PushBlobOptions {
                    chunk_size: (size >= CHUNKED_UPLOAD_THRESHOLD).then_some(UPLOAD_CHUNK),
                    mount_from: None,
                };
                let (pushed, _) = client.push_blob(reference, data, &opts).await?;
                if &pushed != digest {
                    return Err(Error::bad(
                        format!("blob {}", path.display()),
                        format!("has digest {pushed}, expected {digest}"),
                    ));
                }
                Ok(true)
            }
            Kind::Layout { dir, .. } => {
                let dest = Self::blob_path(dir, digest);
                let parent = dest.parent().unwrap_or(dir).to_path_buf();
                let src = path.to_path_buf();
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || -> Result<()> {
                    std::fs::create_dir_all(&parent)
                        .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
                    let tmp = tempfile::NamedTempFile::new_in(&parent).map_err(|e| {
                        Error::io(format!("creating a file in {}", parent.display()), e)
                    })?;
                    std::fs::copy(&src, tmp.path())
                        .map_err(|e| Error::io(format!("copying {}", src.display()), e))?;
                    tmp.persist(&dest).map_err(|e| Error::Layout {
                        path: dir,
                        reason: format!("storing {}: {}", dest.display(), e.error),
                    })?;
                    Ok(())
                })
                .await
                .map_err(|e| Error::Task(e.to_string()))??;
                Ok(true)
            }
        }
    }

    /// Stores a small blob (config) from memory; returns its digest.
    pub async fn put_blob_bytes(&self, data: Bytes) -> Result<Digest> {
        let digest = Digest::sha256(&data);
        match &*self.kind {
            Kind::Backend(b) => return b.put_blob_bytes(data).await,
            Kind::Registry { client, reference } => {
                client
                    .push_blob(reference, data, &PushBlobOptions::default())
                    .await?;
            }
            Kind::Layout { dir, .. } => {
                let dest = Self::blob_path(dir, &digest);
                if !tokio::fs::try_exists(&dest).await.unwrap_or(false) {
                    write_atomic(&dest, &data)?;
                }
            }
        }
        Ok(digest)
    }

    /// Stores a manifest addressed by digest (an index's child).
    pub async fn put_manifest(&self, media_type: &str, data: Bytes) -> Result<Digest> {
        match &*self.kind {
            Kind::Registry { client, reference } => {
                let digest = Digest::sha256(&data);
                Ok(client
                    .push_manifest(&reference.at_digest(digest), media_type, data)
                    .await?)
            }
            Kind::Backend(b) => b.put_manifest(media_type, data).await,
            Kind::Layout { .. } => self.put_blob_bytes(data).await,
        }
    }

    /// Stores the top manifest or index under the location's tag.
    pub async fn put_root(&self, media_type: &str, data: Bytes) -> Result<Digest> {
        match &*self.kind {
            Kind::Registry { client, reference } => {
                Ok(client.push_manifest(reference, media_type, data).await?)
            }
            Kind::Backend(b) => b.put_root(media_type, data).await,
            Kind::Layout { dir, tag } => {
                let size = data.len() as u64;
                let digest = self.put_blob_bytes(data).await?;
                write_atomic(
                    &dir.join("oci-layout"),
                    br#"{"imageLayoutVersion":"1.0.0"}"#,
                )?;
                let mut idx = if dir.join("index.json").exists() {
                    Self::read_layout_index(dir)?
                } else {
                    LayoutIndex::default()
                };
                idx.schema_version = 2;
                idx.media_type = Some(OCI_INDEX.to_string());
                // One entry per tag: the new image replaces an older one of the same name.
                if let Some(t) = tag {
                    idx.manifests.retain(|d| {
                        d.annotations
                            .as_ref()
                            .and_then(|a| a.get(REF_NAME_ANNOTATION))
                            .is_none_or(|n| n != t)
                    });
                } else {
                    idx.manifests.retain(|d| d.digest != digest);
                }
                idx.manifests.push(Descriptor {
                    media_type: media_type.to_string(),
                    digest: digest.clone(),
                    size,
                    urls: None,
                    annotations: tag.as_ref().map(|t| {
                        [(REF_NAME_ANNOTATION.to_string(), t.clone())]
                            .into_iter()
                            .collect()
                    }),
                    platform: None,
                    artifact_type: None,
                });
                let json = serde_json::to_vec(&idx).map_err(|e| Error::Layout {
                    path: dir.clone(),
                    reason: e.to_string(),
                })?;
                write_atomic(&dir.join("index.json"), &json)?;
                Ok(digest)
            }
        }
    }

    /// Random access to a blob for reading its TOC without downloading it whole.
    /// Must be used from a blocking thread (it waits on the runtime for remote reads).
    pub fn blob_source(&self, desc: &Descriptor) -> Result<Box<dyn estargz::BlobSource>> {
        match &*self.kind {
            Kind::Registry { client, reference } => Ok(Box::new(RemoteBlob {
                reader: client.blob_reader(reference, desc.digest.clone(), Some(desc.size)),
                size: desc.size,
                handle: tokio::runtime::Handle::try_current()
                    .map_err(|e| Error::Task(e.to_string()))?,
            })),
            Kind::Backend(b) => b.blob_source(desc),
            Kind::Layout { dir, .. } => {
                let p = Self::blob_path(dir, &desc.digest);
                Ok(Box::new(estargz::FileBlob::open(&p).map_err(|e| {
                    Error::io(format!("opening {}", p.display()), e)
                })?))
            }
        }
    }
}

fn write_atomic(dest: &Path, data: &[u8]) -> Result<()> {
    let parent = dest.parent().ok_or_else(|| {
        Error::io(
            dest.display().to_string(),
            io::ErrorKind::InvalidInput.into(),
        )
    })?;
    std::fs::create_dir_all(parent)
        .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
    let mut tmp = tempfile::NamedTempFile::new_in(parent)
        .map_err(|e| Error::io(format!("creating a file in {}", parent.display()), e))?;
    io::Write::write_all(&mut tmp, data)
        .map_err(|e| Error::io(format!("writing {}", dest.display()), e))?;
    tmp.persist(dest)
        .map_err(|e| Error::io(format!("storing {}", dest.display()), e.error))?;
    Ok(())
}

/// A registry blob read with ranged requests from a blocking thread.
struct RemoteBlob {
    reader: registry::BlobReader,
    size: u64,
    handle: tokio::runtime::Handle,
}

impl estargz::BlobSource for RemoteBlob {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let got = self
            .handle
            .block_on(self.reader.read_at(offset, len as u64))
            .map_err(io::Error::other)?;
        if got.len() != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short read from the registry",
            ));
        }
        Ok(got.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        assert_eq!(
            Location::parse("oci:/tmp/x:v1").ok(),
            Some(Location::Layout {
                dir: "/tmp/x".into(),
                tag: Some("v1".into())
            })
        );
        assert_eq!(
            Location::parse("oci:rel/dir").ok(),
            Some(Location::Layout {
                dir: "rel/dir".into(),
                tag: None
            })
        );
        assert!(matches!(
            Location::parse("127.0.0.1:5000/a/b:c"),
            Ok(Location::Registry(_))
        ));
        assert!(Location::parse("oci:").is_err());
    }
}
