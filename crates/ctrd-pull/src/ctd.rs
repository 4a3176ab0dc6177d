//! One connection to containerd for one command: its namespace, the lease every
//! request runs under (so the garbage collector keeps what the command writes until
//! an image record names it), and the content store and image service calls the
//! pulls and conversions make.

use std::collections::HashMap;
use std::path::PathBuf;

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::{
    CreateImageRequest, GetImageRequest, Image, Info, InfoRequest, ReadContentRequest,
    UpdateImageRequest, UpdateRequest, WriteAction, WriteContentRequest,
};
use containerd_client::services::v1::{
    CreateRequest as LeaseCreateRequest, DeleteRequest as LeaseDeleteRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request};
use futures::StreamExt;

use crate::error::{Error, Result};

pub(crate) fn rpc(what: &str, s: containerd_client::tonic::Status) -> Error {
    Error::Containerd(format!("{what}: {}", s.message()))
}

/// How long a lease outlives a crashed command, as `ctr` does.
const LEASE_EXPIRY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Bytes per message when streaming content in or out.
const CHUNK: usize = 1 << 20;

/// A connection to containerd in one namespace; clones share the channel and lease.
#[derive(Clone)]
pub(crate) struct Ctd {
    pub(crate) channel: Channel,
    namespace: String,
    /// The lease every request is made under.
    lease: Option<String>,
}

/// Where content to write comes from.
pub(crate) enum ContentSource {
    Bytes(bytes::Bytes),
    File(PathBuf),
}

impl Ctd {
    /// Connects to the socket at `address` (no lease yet).
    pub(crate) async fn connect(address: &str, namespace: &str) -> Result<Ctd> {
        let channel = containerd_client::connect(address)
            .await
            .map_err(|e| Error::Containerd(format!("connecting to {address}: {e}")))?;
        Ok(Ctd {
            channel,
            namespace: namespace.to_string(),
            lease: None,
        })
    }

    pub(crate) fn req<T>(&self, t: T) -> Request<T> {
        let mut r = Request::new(t);
        if let Ok(v) = self.namespace.parse() {
            r.metadata_mut().insert("containerd-namespace", v);
        }
        if let Some(Ok(v)) = self.lease.as_ref().map(|l| l.parse()) {
            r.metadata_mut().insert("containerd-lease", v);
        }
        r
    }

    /// Creates the command's lease (expiring by itself should the command never end it).
    pub(crate) async fn start_lease(&mut self, prefix: &str) -> Result<()> {
        let now = std::time::SystemTime::now();
        let id = format!(
            "{prefix}-{}",
            now.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let mut labels = HashMap::new();
        labels.insert(
            "containerd.io/gc.expire".to_string(),
            rfc3339_utc(now + LEASE_EXPIRY),
        );
        LeasesClient::new(self.channel.clone())
            .create(self.req(LeaseCreateRequest {
                id: id.clone(),
                labels,
            }))
            .await
            .map_err(|s| rpc("lease create", s))?;
        self.lease = Some(id);
        Ok(())
    }

    /// Ends the lease: from now on image records keep what the command made.
    pub(crate) async fn end_lease(&mut self) {
        let Some(id) = self.lease.take() else {
            return;
        };
        let res = LeasesClient::new(self.channel.clone())
            .delete(self.req(LeaseDeleteRequest {
                id: id.clone(),
                sync: false,
            }))
            .await;
        if let Err(s) = res {
            tracing::warn!(lease = %id, error = %s.message(), "could not end the lease; it expires by itself");
        }
    }

    /// The content store's record of a blob, `None` when it is not there.
    pub(crate) async fn content_info(&self, digest: &str) -> Result<Option<Info>> {
        let mut c = ContentClient::new(self.channel.clone());
        match c
            .info(self.req(InfoRequest {
                digest: digest.to_string(),
            }))
            .await
        {
            Ok(r) => Ok(r.into_inner().info),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(rpc("content info", s)),
        }
    }

    pub(crate) async fn has_content(&self, digest: &str) -> Result<bool> {
        Ok(self.content_info(digest).await?.is_some())
    }

    /// Adds or replaces labels on existing content.
    pub(crate) async fn set_labels(
        &self,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        ContentClient::new(self.channel.clone())
            .update(self.req(UpdateRequest {
                info: Some(Info {
                    digest: digest.to_string(),
                    size: 0,
                    created_at: None,
                    updated_at: None,
                    labels,
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(|s| rpc("content update", s))?;
        Ok(())
    }

    /// `len` bytes of a blob at `offset`, exactly.
    pub(crate) async fn read_range(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut c = ContentClient::new(self.channel.clone());
        let mut stream = c
            .read(self.req(ReadContentRequest {
                digest: digest.to_string(),
                offset: offset as i64,
                size: len as i64,
            }))
            .await
            .map_err(|s| match s.code() {
                Code::NotFound => Error::Containerd(format!(
                    "content {digest} is not in containerd's content store (namespace {})",
                    self.namespace
                )),
                _ => rpc("content read", s),
            })?
            .into_inner();
        // The length is the caller's (bounded) ask; what arrives is checked against it.
        let mut out = Vec::with_capacity(len.min(CHUNK as u64 * 16) as usize);
        while let Some(m) = stream.next().await {
            let m = m.map_err(|s| rpc("content read", s))?;
            if out.len() as u64 + m.data.len() as u64 > len {
                return Err(Error::Containerd(format!(
                    "content read of {digest}: more than the {len} bytes asked"
                )));
            }
            out.extend_from_slice(&m.data);
        }
        if out.len() as u64 != len {
            return Err(Error::Containerd(format!(
                "content read of {digest}: {} bytes at {offset}, {len} asked",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Writes `source` into the content store under `digest` with `labels`; content
    /// already there only gets the labels.
    pub(crate) async fn write_content(
        &self,
        digest: &str,
        size: u64,
        source: ContentSource,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        if self.has_content(digest).await? {
            return self.set_labels(digest, labels).await;
        }
        let reference = format!("ctr-remote-{digest}");
        let base = WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: reference.clone(),
            total: size as i64,
            expected: digest.to_string(),
            offset: 0,
            data: Vec::new(),
            labels: HashMap::new(),
        };
        // Files are streamed a chunk at a time; small documents go in one message.
        let stream: futures::stream::BoxStream<'static, WriteContentRequest> = match source {
            ContentSource::Bytes(b) => futures::stream::iter(vec![WriteContentRequest {
                action: WriteAction::Commit as i32,
                data: b.to_vec(),
                labels,
                ..base
            }])
            .boxed(),
            ContentSource::File(p) => {
                let f = std::fs::File::open(&p)
                    .map_err(|e| Error::io(format!("opening {}", p.display()), e))?;
                // A reader thread feeds a bounded channel, a chunk at a time.
                let (mut tx, rx) = futures::channel::mpsc::channel::<WriteContentRequest>(4);
                tokio::task::spawn_blocking(move || {
                    use std::io::Read as _;
                    let mut f = f;
                    let mut labels = labels;
                    let mut off = 0u64;
                    loop {
                        let mut buf = vec![0u8; CHUNK];
                        let n = match f.read(&mut buf) {
                            Ok(n) => n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            // Stopping early commits a short blob, which containerd refuses.
                            Err(_) => return,
                        };
                        let msg = if n == 0 {
                            WriteContentRequest {
                                action: WriteAction::Commit as i32,
                                offset: off as i64,
                                labels: std::mem::take(&mut labels),
                                ..base.clone()
                            }
                        } else {
                            buf.truncate(n);
                            WriteContentRequest {
                                offset: off as i64,
                                data: buf,
                                ..base.clone()
                            }
                        };
                        if futures::executor::block_on(futures::SinkExt::send(&mut tx, msg))
                            .is_err()
                            || n == 0
                        {
                            return;
                        }
                        off += n as u64;
                    }
                });
                rx.boxed()
            }
        };
        let mut c = ContentClient::new(self.channel.clone());
        let written = async {
            let mut s = c.write(self.req(stream)).await?.into_inner();
            while let Some(m) = s.next().await {
                m?;
            }
            Ok::<(), containerd_client::tonic::Status>(())
        }
        .await;
        match written {
            Ok(()) => {}
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => return Err(rpc("content write", s)),
        }
        // A file that ended early commits short; containerd then refuses the size.
        if !self.has_content(digest).await? {
            return Err(Error::Containerd(format!(
                "content write of {digest} did not commit"
            )));
        }
        Ok(())
    }

    /// The image record named `name`, `None` when there is none.
    pub(crate) async fn get_image(&self, name: &str) -> Result<Option<Image>> {
        match ImagesClient::new(self.channel.clone())
            .get(self.req(GetImageRequest {
                name: name.to_string(),
            }))
            .await
        {
            Ok(r) => Ok(r.into_inner().image),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(rpc("image get", s)),
        }
    }

    /// Creates the image record, or points an existing one at the new target.
    pub(crate) async fn put_image(&self, image: Image) -> Result<()> {
        let mut images = ImagesClient::new(self.channel.clone());
        match images
            .create(self.req(CreateImageRequest {
                image: Some(image.clone()),
                source_date_epoch: None,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                images
                    .update(self.req(UpdateImageRequest {
                        image: Some(image),
                        update_mask: None,
                        source_date_epoch: None,
                    }))
                    .await
                    .map_err(|s| rpc("image update", s))?;
                Ok(())
            }
            Err(s) => Err(rpc("image create", s)),
        }
    }
}

/// `t` as RFC 3339 in UTC (`2006-01-02T15:04:05Z`), the form containerd's lease
/// expiry label takes.
pub(crate) fn rfc3339_utc(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_expiry_is_rfc3339_utc() {
        let at = |s: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s);
        assert_eq!(rfc3339_utc(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(at(1_795_462_574)), "2026-11-23T19:36:14Z");
    }
}
