//! The `containerd.services.snapshots.v1.Snapshots` gRPC service and serving it on a unix socket.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::Stream;
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::proto::snapshots as pb;
use crate::proto::types as pbt;
use crate::remote::RemoteFs;
use crate::snapshotter::{Info, Mount, Snapshotter};
use crate::store::Kind;

/// gRPC metadata key carrying the containerd namespace.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";
/// Infos per List response message.
const LIST_BATCH: usize = 100;

/// The gRPC face of a [`Snapshotter`].
pub struct Service<R: RemoteFs> {
    sn: Arc<Snapshotter<R>>,
}

impl<R: RemoteFs> Service<R> {
    pub fn new(sn: Arc<Snapshotter<R>>) -> Service<R> {
        Service { sn }
    }

    /// The tonic server wrapper, ready for `Server::add_service`.
    pub fn into_server(self) -> pb::snapshots_server::SnapshotsServer<Service<R>> {
        pb::snapshots_server::SnapshotsServer::new(self)
    }
}

/// The keyspace a request works in: always the one keyspace of this snapshotter.
///
/// containerd's metadata layer already puts the namespace into the keys it gives a
/// backend (`k8s.io/12/extract-...`), while the committed names of layers (chain ids) are
/// shared by every namespace. And it calls a proxy snapshotter sometimes with the
/// `containerd-namespace` header (the CRI plugin's Prepare) and sometimes without (its
/// Stat of a remote snapshot's target): partitioning by the header made a CRI pull's
/// remote snapshot invisible to that Stat. So the header is checked for validity and
/// otherwise ignored, as containerd's own snapshotters and the reference's do.
fn namespace<T>(req: &Request<T>) -> Result<String, Status> {
    match req.metadata().get(NAMESPACE_HEADER) {
        Some(v) if v.to_str().is_err() => Err(Status::invalid_argument(
            "containerd-namespace is not valid text",
        )),
        _ => Ok(String::new()),
    }
}

fn mounts(m: Vec<Mount>) -> Vec<pbt::Mount> {
    m.into_iter()
        .map(|m| pbt::Mount {
            r#type: m.kind,
            source: m.source,
            target: m.target,
            options: m.options,
        })
        .collect()
}

fn ts(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn kind(k: Kind) -> pb::Kind {
    match k {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

fn info(i: Info) -> pb::Info {
    pb::Info {
        name: i.name,
        parent: i.parent,
        kind: kind(i.kind) as i32,
        created_at: Some(ts(i.created)),
        updated_at: Some(ts(i.updated)),
        labels: i.labels,
    }
}

fn log_err(op: &'static str, key: &str, e: Error) -> Status {
    match e {
        Error::NotFound(_) | Error::AlreadyExists(_) | Error::FailedPrecondition(_) => {
            tracing::debug!(op, key, error = %e, "request refused")
        }
        _ => tracing::warn!(op, key, error = %e, "request failed"),
    }
    e.into()
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<R: RemoteFs> pb::snapshots_server::Snapshots for Service<R> {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        tracing::debug!(ns, key = r.key, parent = r.parent, "prepare");
        let m = self
            .sn
            .prepare(&ns, &r.key, &r.parent, r.labels)
            .await
            .map_err(|e| log_err("prepare", &r.key, e))?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        tracing::debug!(ns, key = r.key, parent = r.parent, "view");
        let m = self
            .sn
            .view(&ns, &r.key, &r.parent, r.labels)
            .await
            .map_err(|e| log_err("view", &r.key, e))?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let m = self
            .sn
            .mounts(&ns, &r.key)
            .await
            .map_err(|e| log_err("mounts", &r.key, e))?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        tracing::debug!(ns, key = r.key, name = r.name, "commit");
        self.sn
            .commit(&ns, &r.name, &r.key, r.labels)
            .await
            .map_err(|e| log_err("commit", &r.key, e))?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        tracing::debug!(ns, key = r.key, "remove");
        self.sn
            .remove(&ns, &r.key)
            .await
            .map_err(|e| log_err("remove", &r.key, e))?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let i = self
            .sn
            .stat(&ns, &r.key)
            .await
            .map_err(|e| log_err("stat", &r.key, e))?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let i = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let want = Info {
            name: i.name.clone(),
            parent: i.parent,
            kind: Kind::Active,
            labels: i.labels,
            created: UNIX_EPOCH,
            updated: UNIX_EPOCH,
        };
        let out = self
            .sn
            .update(&ns, want, paths)
            .await
            .map_err(|e| log_err("update", &i.name, e))?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(out)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let infos = self
            .sn
            .list(&ns, &r.filters)
            .await
            .map_err(|e| log_err("list", "", e))?;
        let mut batches = Vec::new();
        let mut it = infos.into_iter().map(info).peekable();
        while it.peek().is_some() {
            let info: Vec<pb::Info> = it.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(pb::ListSnapshotsResponse { info }));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let ns = namespace(&req)?;
        let r = req.into_inner();
        let u = self
            .sn
            .usage(&ns, &r.key)
            .await
            .map_err(|e| log_err("usage", &r.key, e))?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let _ = namespace(&req)?;
        let n = self
            .sn
            .cleanup()
            .await
            .map_err(|e| log_err("cleanup", "", e))?;
        tracing::info!(removed = n, "cleanup");
        Ok(Response::new(()))
    }
}

/// Binds a unix socket at `path` (replacing a stale one) with mode 0660,
/// its directory created 0700 when missing.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io("chmod", dir, e))?;
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove stale socket", path, e)),
    }
    let l = tokio::net::UnixListener::bind(path).map_err(|e| Error::io("bind", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| Error::io("chmod", path, e))?;
    Ok(l)
}

/// Serves `sn` on `listener` until `shutdown` completes.
pub async fn serve<R: RemoteFs>(
    sn: Arc<Snapshotter<R>>,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(Service::new(sn).into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::Internal(format!("gRPC server: {e}")))
}
