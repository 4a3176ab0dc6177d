//! containerd's image store as a [`convert::ImageBackend`]: images are read from and
//! written to its content store and image service, so `ctr-remote image convert` and
//! `optimize` work on local images as the reference's do (`ctr-remote image pull SRC`,
//! `optimize SRC DST`, `ctr-remote image push DST`).
//!
//! Everything written carries the labels containerd's garbage collector follows
//! (`containerd.io/gc.ref.content.*`), and is written under the session's lease until
//! the image record names it.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use containerd_client::services::v1::Image;
use containerd_client::types::Descriptor as CDescriptor;
use futures::future::{FutureExt, LocalBoxFuture};
use registry::{Descriptor, Digest, FetchedManifest, Manifest};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use convert::{ImageBackend, LocalBlob, TOC_IMAGE_SUFFIX};

use crate::ctd::{ContentSource, Ctd};
use crate::error::{Error, Result};

/// Most bytes of a blob read whole into memory (configs, manifests, TOCs).
const MAX_SMALL_BLOB: u64 = 256 << 20;

/// One connection to containerd, under one lease, for the images a command reads
/// and writes. End it with [`ContainerdSession::close`] once the images are written.
pub struct ContainerdSession {
    ctd: Ctd,
    namespace: String,
}

impl ContainerdSession {
    /// Connects to containerd at `address` and starts a lease in `namespace`.
    pub async fn connect(address: &str, namespace: &str) -> Result<ContainerdSession> {
        let mut ctd = Ctd::connect(address, namespace).await?;
        ctd.start_lease("ctr-remote").await?;
        Ok(ContainerdSession {
            ctd,
            namespace: namespace.to_string(),
        })
    }

    /// Whether containerd has an image record named `name`.
    pub async fn has_image(&self, name: &str) -> Result<bool> {
        let ctd = self.ctd.clone();
        Ok(ctd.get_image(name).await?.is_some())
    }

    /// The image `name` (to read, or to write with `put_root`).
    pub fn image(&self, name: &str) -> ContainerdImage {
        ContainerdImage {
            ctd: self.ctd.clone(),
            namespace: self.namespace.clone(),
            name: name.to_string(),
        }
    }

    /// Size of a blob in the content store, `None` when absent.
    pub async fn content_size(&self, digest: &Digest) -> Result<Option<u64>> {
        let ctd = self.ctd.clone();
        Ok(ctd
            .content_info(&digest.to_string())
            .await?
            .map(|i| i.size.max(0) as u64))
    }

    /// Random access to a blob of the content store, for a blocking thread.
    pub fn content_source(
        &self,
        digest: &Digest,
        size: u64,
    ) -> Result<Box<dyn estargz::BlobSource>> {
        Ok(Box::new(ContentBlob {
            ctd: self.ctd.clone(),
            digest: digest.to_string(),
            size,
            handle: tokio::runtime::Handle::try_current()
                .map_err(|e| Error::Containerd(e.to_string()))?,
        }))
    }

    /// Ends the lease; what the command wrote is from now on kept by image records.
    pub async fn close(mut self) {
        self.ctd.end_lease().await;
    }
}

/// An image of containerd's image store.
pub struct ContainerdImage {
    ctd: Ctd,
    namespace: String,
    name: String,
}

fn err(e: Error) -> convert::Error {
    match e {
        Error::Convert(c) => c,
        Error::Registry(r) => convert::Error::Registry(r),
        other => convert::Error::Backend(other.to_string()),
    }
}

/// The name of an image's TOC image: its tag with [`TOC_IMAGE_SUFFIX`] appended
/// (`latest` when it has none).
pub fn toc_image_name(name: &str) -> std::result::Result<String, String> {
    if name.contains('@') {
        return Err(format!(
            "{name} names a digest: its TOC image is named after a tag ({TOC_IMAGE_SUFFIX} appended)"
        ));
    }
    let last = name.rfind('/').map(|i| i + 1).unwrap_or(0);
    Ok(if name[last..].contains(':') {
        format!("{name}{TOC_IMAGE_SUFFIX}")
    } else {
        format!("{name}:latest{TOC_IMAGE_SUFFIX}")
    })
}

/// Labels containerd's garbage collector follows from a manifest or an index to
/// what it names.
fn gc_labels(media_type: &str, data: &[u8]) -> convert::Result<HashMap<String, String>> {
    let fetched = FetchedManifest {
        bytes: Bytes::copy_from_slice(data),
        digest: Digest::sha256(data),
        media_type: media_type.to_string(),
    };
    let mut labels = HashMap::new();
    match fetched.parse()? {
        Manifest::Image(m) => {
            labels.insert(
                "containerd.io/gc.ref.content.config".to_string(),
                m.config.digest.to_string(),
            );
            for (i, l) in m.layers.iter().enumerate() {
                // Foreign layers live at their URLs, not in the store.
                if l.urls.as_ref().is_some_and(|u| !u.is_empty()) {
                    continue;
                }
                labels.insert(
                    format!("containerd.io/gc.ref.content.l.{i}"),
                    l.digest.to_string(),
                );
            }
        }
        Manifest::Index(idx) => {
            for (i, d) in idx.manifests.iter().enumerate() {
                labels.insert(
                    format!("containerd.io/gc.ref.content.m.{i}"),
                    d.digest.to_string(),
                );
            }
        }
    }
    Ok(labels)
}

impl ContainerdImage {
    async fn read_small(&self, digest: &Digest) -> Result<Bytes> {
        let ctd = self.ctd.clone();
        let d = digest.to_string();
        let info = ctd.content_info(&d).await?.ok_or_else(|| {
            Error::Containerd(format!(
                "content {d} of image {} is not in containerd's content store (namespace {}); \
                 pull the image (all of it, for --all-platforms) first",
                self.name, self.namespace
            ))
        })?;
        let size = info.size.max(0) as u64;
        if size > MAX_SMALL_BLOB {
            return Err(Error::bad(
                format!("content {d}"),
                format!("{size} bytes, over the {MAX_SMALL_BLOB} read whole"),
            ));
        }
        let data = ctd.read_range(&d, 0, size).await?;
        registry::verify_digest(digest, &format!("content {d}"), &data)?;
        Ok(Bytes::from(data))
    }

    async fn root_impl(&self) -> Result<FetchedManifest> {
        let ctd = self.ctd.clone();
        let image = ctd.get_image(&self.name).await?;
        let image = image.ok_or_else(|| {
            Error::Containerd(format!(
                "no image {} in containerd (namespace {})",
                self.name, self.namespace
            ))
        })?;
        let target = image
            .target
            .ok_or_else(|| Error::bad(format!("image {}", self.name), "no target"))?;
        let digest = Digest::parse(&target.digest)
            .map_err(|e| Error::bad(format!("image {}", self.name), e.to_string()))?;
        let bytes = self.read_small(&digest).await?;
        Ok(FetchedManifest {
            bytes,
            digest,
            media_type: target.media_type,
        })
    }

    async fn fetch_impl(&self, desc: &Descriptor, workdir: &Path) -> Result<LocalBlob> {
        let tmp = tempfile::NamedTempFile::new_in(workdir)
            .map_err(|e| Error::io("creating a temporary file", e))?;
        let std_file = tmp
            .reopen()
            .map_err(|e| Error::io("opening a temporary file", e))?;
        let mut f =
            tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(std_file));
        let d = desc.digest.to_string();
        let ctd = self.ctd.clone();
        let mut hash = Sha256::new();
        let mut n = 0u64;
        // Read in slices: memory stays at one slice whatever the layer's size.
        const SLICE: u64 = 16 << 20;
        while n < desc.size {
            let len = SLICE.min(desc.size - n);
            let data = ctd.read_range(&d, n, len).await?;
            hash.update(&data);
            f.write_all(&data)
                .await
                .map_err(|e| Error::io("writing a temporary file", e))?;
            n += len;
        }
        f.flush()
            .await
            .map_err(|e| Error::io("writing a temporary file", e))?;
        if n != desc.size {
            return Err(Error::bad(
                format!("content {d}"),
                format!(
                    "{n} bytes in the content store, {} in its descriptor",
                    desc.size
                ),
            ));
        }
        let got = format!("sha256:{}", hex::encode(hash.finalize()));
        if got != d {
            return Err(Error::bad(
                format!("content {d}"),
                format!("has digest {got}"),
            ));
        }
        Ok(LocalBlob::Temp(tmp))
    }

    async fn put_file_impl(&self, digest: &Digest, path: &Path) -> Result<bool> {
        let ctd = self.ctd.clone();
        let d = digest.to_string();
        if ctd.has_content(&d).await? {
            return Ok(false);
        }
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
            .len();
        ctd.write_content(
            &d,
            size,
            ContentSource::File(path.to_path_buf()),
            HashMap::new(),
        )
        .await?;
        Ok(true)
    }

    async fn put_bytes_impl(&self, data: Bytes, labels: HashMap<String, String>) -> Result<Digest> {
        let digest = Digest::sha256(&data);
        let size = data.len() as u64;
        let ctd = self.ctd.clone();
        ctd.write_content(
            &digest.to_string(),
            size,
            ContentSource::Bytes(data),
            labels,
        )
        .await?;
        Ok(digest)
    }

    async fn put_root_impl(&self, media_type: &str, data: Bytes) -> convert::Result<Digest> {
        let labels = gc_labels(media_type, &data)?;
        let size = data.len() as i64;
        let digest = self.put_bytes_impl(data, labels).await.map_err(err)?;
        let image = Image {
            name: self.name.clone(),
            labels: HashMap::new(),
            target: Some(CDescriptor {
                media_type: media_type.to_string(),
                digest: digest.to_string(),
                size,
                annotations: HashMap::new(),
            }),
            created_at: None,
            updated_at: None,
        };
        let ctd = self.ctd.clone();
        ctd.put_image(image).await.map_err(err)?;
        Ok(digest)
    }
}

impl ImageBackend for ContainerdImage {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn root(&self) -> LocalBoxFuture<'_, convert::Result<FetchedManifest>> {
        async move { self.root_impl().await.map_err(err) }.boxed_local()
    }

    fn blob_bytes<'a>(&'a self, digest: &'a Digest) -> LocalBoxFuture<'a, convert::Result<Bytes>> {
        async move { self.read_small(digest).await.map_err(err) }.boxed_local()
    }

    fn fetch_blob<'a>(
        &'a self,
        desc: &'a Descriptor,
        workdir: &'a Path,
    ) -> LocalBoxFuture<'a, convert::Result<LocalBlob>> {
        async move { self.fetch_impl(desc, workdir).await.map_err(err) }.boxed_local()
    }

    fn has_blob<'a>(&'a self, digest: &'a Digest) -> LocalBoxFuture<'a, convert::Result<bool>> {
        let ctd = self.ctd.clone();
        let d = digest.to_string();
        async move { ctd.has_content(&d).await.map_err(err) }.boxed_local()
    }

    fn put_blob_file<'a>(
        &'a self,
        digest: &'a Digest,
        path: &'a Path,
    ) -> LocalBoxFuture<'a, convert::Result<bool>> {
        async move { self.put_file_impl(digest, path).await.map_err(err) }.boxed_local()
    }

    fn put_blob_bytes(&self, data: Bytes) -> LocalBoxFuture<'_, convert::Result<Digest>> {
        async move { self.put_bytes_impl(data, HashMap::new()).await.map_err(err) }.boxed_local()
    }

    fn put_manifest<'a>(
        &'a self,
        media_type: &'a str,
        data: Bytes,
    ) -> LocalBoxFuture<'a, convert::Result<Digest>> {
        async move {
            let labels = gc_labels(media_type, &data)?;
            self.put_bytes_impl(data, labels).await.map_err(err)
        }
        .boxed_local()
    }

    fn put_root<'a>(
        &'a self,
        media_type: &'a str,
        data: Bytes,
    ) -> LocalBoxFuture<'a, convert::Result<Digest>> {
        async move { self.put_root_impl(media_type, data).await }.boxed_local()
    }

    fn blob_source(&self, desc: &Descriptor) -> convert::Result<Box<dyn estargz::BlobSource>> {
        Ok(Box::new(ContentBlob {
            ctd: self.ctd.clone(),
            digest: desc.digest.to_string(),
            size: desc.size,
            handle: tokio::runtime::Handle::try_current()
                .map_err(|e| convert::Error::Task(e.to_string()))?,
        }))
    }

    fn toc_image(&self) -> convert::Result<Arc<dyn ImageBackend>> {
        let name = toc_image_name(&self.name).map_err(convert::Error::Options)?;
        Ok(Arc::new(ContainerdImage {
            ctd: self.ctd.clone(),
            namespace: self.namespace.clone(),
            name,
        }))
    }
}

/// A content-store blob read with ranged reads from a blocking thread.
struct ContentBlob {
    ctd: Ctd,
    digest: String,
    size: u64,
    handle: tokio::runtime::Handle,
}

impl estargz::BlobSource for ContentBlob {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        self.handle.block_on(async {
            self.ctd
                .read_range(&self.digest, offset, len as u64)
                .await
                .map_err(io::Error::other)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toc_image_names_follow_the_tag() {
        assert_eq!(
            toc_image_name("127.0.0.1:5000/a/b:v1").unwrap(),
            "127.0.0.1:5000/a/b:v1-esgztoc"
        );
        assert_eq!(
            toc_image_name("localhost:5000/a").unwrap(),
            "localhost:5000/a:latest-esgztoc"
        );
        assert!(toc_image_name("x/y@sha256:00").is_err());
    }

    #[test]
    fn gc_labels_name_children() {
        let m = serde_json::json!({"schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": format!("sha256:{}", "a".repeat(64)), "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": format!("sha256:{}", "b".repeat(64)), "size": 3}]});
        let l = gc_labels(
            "application/vnd.oci.image.manifest.v1+json",
            &serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        assert_eq!(
            l["containerd.io/gc.ref.content.config"],
            format!("sha256:{}", "a".repeat(64))
        );
        assert_eq!(
            l["containerd.io/gc.ref.content.l.0"],
            format!("sha256:{}", "b".repeat(64))
        );
    }
}
