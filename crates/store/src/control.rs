//! The credential hand-off: a gRPC `Controller` service on a unix socket (`--addr`)
//! whose `AddCredential` takes the JSON containers/image passes to its
//! `additional-layer-store-auth-helper`, and the client side used by
//! `stargz-store-helper`. Same service, method and message as the reference, so either
//! side works with the other's counterpart.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use tonic::{Request, Response, Status};

use crate::auth::HandoffKeychain;

/// Generated from `proto/control.proto`.
#[allow(
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "generated code"
)]
pub mod pb {
    tonic::include_proto!("_");
}

/// Largest hand-off accepted (a JSON map of references to credentials).
const MAX_MESSAGE: usize = 1 << 20;

struct Controller {
    handoff: Arc<HandoffKeychain>,
}

#[tonic::async_trait]
impl pb::controller_server::Controller for Controller {
    async fn add_credential(
        &self,
        req: Request<pb::AddCredentialRequest>,
    ) -> Result<Response<pb::AddCredentialResponse>, Status> {
        let data = req.into_inner().data;
        match self.handoff.add_json(&data) {
            Ok(n) => {
                tracing::info!(references = n, "registry credentials handed over");
                Ok(Response::new(pb::AddCredentialResponse {}))
            }
            Err(e) => Err(Status::invalid_argument(e.to_string())),
        }
    }
}

/// Binds `path` (replacing a stale socket; only the owner may connect) and serves the
/// hand-off until the runtime ends.
pub fn serve(path: &Path, handoff: Arc<HandoffKeychain>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let svc = pb::controller_server::ControllerServer::new(Controller { handoff })
        .max_decoding_message_size(MAX_MESSAGE);
    let shown = path.display().to_string();
    tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(socket = %shown, error = %e, "credential hand-off server stopped");
        }
    });
    tracing::info!(socket = %path.display(), "credential hand-off listening");
    Ok(())
}

/// Sends `data` (the JSON containers/image pipes to its auth helper) to the store
/// listening on `path`.
pub async fn add_credential(path: &Path, data: Vec<u8>) -> Result<()> {
    let path: PathBuf = path.to_path_buf();
    let shown = path.display().to_string();
    // The URI is required by the API and unused: the connector dials the socket.
    let channel = tonic::transport::Endpoint::try_from("http://stargz-store")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .with_context(|| format!("connecting to {shown}"))?;
    pb::controller_client::ControllerClient::new(channel)
        .add_credential(pb::AddCredentialRequest { data })
        .await
        .with_context(|| format!("AddCredential on {shown}"))?;
    Ok(())
}
