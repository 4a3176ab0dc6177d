//! The CRI image service proxy of `[cri_keychain]`: kubelet, pointed at the daemon's
//! socket with `--image-service-endpoint`, calls `runtime.v1.ImageService` (and
//! `v1alpha2`, which containerd 1.6 still serves) here; every call is forwarded to
//! containerd's CRI plugin, and the credentials of each `PullImage` are kept in a
//! [`registry::CriKeychain`] before the call goes on, so the layers containerd then
//! asks the snapshotter to mount are fetched with them.
//!
//! Built on `k8s-cri` (the CRI's generated client and server traits) and `tonic`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use hyper_util::rt::TokioIo;
use k8s_cri::{v1, v1alpha2};
use registry::{Credential, CriKeychain, RecordedCredential};
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

/// Largest message relayed either way: containerd's own limit (a node's image list
/// is the big one).
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Forwards the CRI image service to containerd and records `PullImage` credentials.
pub struct CriProxy {
    backend: PathBuf,
    channel: Channel,
    store: Arc<CriKeychain>,
}

/// The fields of a CRI `AuthConfig` (the same in both API versions).
struct Auth<'a> {
    username: &'a str,
    password: &'a str,
    auth: &'a str,
    identity_token: &'a str,
    registry_token: &'a str,
}

/// The credential an `AuthConfig` carries, preferring what containerd's CRI plugin
/// prefers: user name and password, then the identity token, then `auth`
/// (base64 `user:password`); a registry token last (containerd ignores it).
fn credential(a: &Auth<'_>) -> Result<Option<Credential>, &'static str> {
    if !a.username.is_empty() {
        return Ok(Some(Credential::Basic {
            username: a.username.to_string(),
            password: a.password.to_string(),
        }));
    }
    if !a.identity_token.is_empty() {
        return Ok(Some(Credential::IdentityToken(
            a.identity_token.to_string(),
        )));
    }
    if !a.auth.is_empty() {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.auth.trim())
            .map_err(|_| "auth is not base64")?;
        let text = String::from_utf8(raw).map_err(|_| "auth is not UTF-8")?;
        let (u, p) = text.split_once(':').ok_or("auth is not user:password")?;
        return Ok(Some(Credential::Basic {
            username: u.to_string(),
            password: p.to_string(),
        }));
    }
    if !a.registry_token.is_empty() {
        return Ok(Some(Credential::RegistryToken(
            a.registry_token.to_string(),
        )));
    }
    Ok(None)
}

/// The request to send on: the caller's message and metadata (its deadline and
/// custom keys), without the transport headers of the incoming call.
fn forward<T>(req: Request<T>) -> Request<T> {
    let (meta, _, msg) = req.into_parts();
    let mut headers = meta.into_headers();
    let drop: Vec<_> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            k != "grpc-timeout"
                && (k.starts_with("grpc-")
                    || matches!(
                        k,
                        "te" | "content-type" | "content-length" | "user-agent" | "host"
                    ))
        })
        .cloned()
        .collect();
    for k in drop {
        headers.remove(k);
    }
    let mut out = Request::new(msg);
    *out.metadata_mut() = MetadataMap::from_headers(headers);
    out
}

impl CriProxy {
    /// A proxy to the CRI plugin on the unix socket `backend`, connected on first use
    /// (containerd may start after the daemon) and again after it restarts.
    pub fn new(backend: &Path, store: Arc<CriKeychain>) -> anyhow::Result<CriProxy> {
        let path = backend.to_path_buf();
        // The URI is never dialed: the connector opens the socket.
        let channel = Endpoint::try_from("http://[::1]:1")?.connect_with_connector_lazy(
            tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }),
        );
        Ok(CriProxy {
            backend: backend.to_path_buf(),
            channel,
            store,
        })
    }

    /// Keeps the credentials of a `PullImage` of `image` before it is forwarded.
    /// Pulls without credentials leave what earlier pulls brought: a pull that needs
    /// them fails at containerd anyway.
    async fn capture(
        self: &Arc<Self>,
        image: &str,
        auth: Result<Option<Credential>, &'static str>,
        server: String,
    ) -> Option<RecordedCredential> {
        let cred = match auth {
            Ok(c) => c?,
            Err(why) => {
                tracing::warn!(
                    image,
                    reason = why,
                    "PullImage credentials not understood; not kept"
                );
                return None;
            }
        };
        let (me, img) = (self.clone(), image.to_string());
        // The file is synced before the pull goes on: off the async workers.
        let res = tokio::task::spawn_blocking(move || me.store.record(&img, &cred, &server)).await;
        match res {
            Ok(Ok(r)) => {
                tracing::info!(image, "PullImage credentials kept for the image's layers");
                Some(r)
            }
            Ok(Err(e)) => {
                tracing::warn!(image, error = %e, "PullImage credentials not kept");
                None
            }
            Err(e) => {
                tracing::warn!(image, error = %e, "PullImage credentials not kept");
                None
            }
        }
    }

    /// After the forwarded `PullImage`: credentials of a failed pull are not kept
    /// (the earlier ones come back).
    async fn settle(self: &Arc<Self>, image: &str, recorded: Option<RecordedCredential>, ok: bool) {
        let (Some(r), false) = (recorded, ok) else {
            return;
        };
        let me = self.clone();
        let res = tokio::task::spawn_blocking(move || me.store.undo(r)).await;
        if !matches!(res, Ok(Ok(()))) {
            tracing::warn!(
                image,
                "putting back the credentials kept before a failed pull failed"
            );
        }
    }

    fn unavailable(&self, s: Status) -> Status {
        if s.code() == tonic::Code::Unavailable {
            tracing::warn!(backend = %self.backend.display(), error = %s.message(),
                "CRI image service unreachable");
        }
        s
    }

    /// The `runtime.v1.ImageService` server.
    pub fn v1(self: &Arc<Self>) -> v1::image_service_server::ImageServiceServer<V1> {
        v1::image_service_server::ImageServiceServer::new(V1(self.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The `runtime.v1alpha2.ImageService` server (kubelets before 1.26).
    pub fn v1alpha2(
        self: &Arc<Self>,
    ) -> v1alpha2::image_service_server::ImageServiceServer<V1alpha2> {
        v1alpha2::image_service_server::ImageServiceServer::new(V1alpha2(self.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// The proxy serving `runtime.v1`.
pub struct V1(Arc<CriProxy>);
/// The proxy serving `runtime.v1alpha2`.
pub struct V1alpha2(Arc<CriProxy>);

/// One implementation for both API versions: their image services have the same
/// calls and messages.
macro_rules! image_service {
    ($server:ident, $api:ident) => {
        impl $server {
            fn client(&self) -> $api::image_service_client::ImageServiceClient<Channel> {
                $api::image_service_client::ImageServiceClient::new(self.0.channel.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES)
            }
        }

        #[tonic::async_trait]
        impl $api::image_service_server::ImageService for $server {
            async fn list_images(
                &self,
                req: Request<$api::ListImagesRequest>,
            ) -> Result<Response<$api::ListImagesResponse>, Status> {
                self.client()
                    .list_images(forward(req))
                    .await
                    .map_err(|s| self.0.unavailable(s))
            }

            async fn image_status(
                &self,
                req: Request<$api::ImageStatusRequest>,
            ) -> Result<Response<$api::ImageStatusResponse>, Status> {
                self.client()
                    .image_status(forward(req))
                    .await
                    .map_err(|s| self.0.unavailable(s))
            }

            async fn pull_image(
                &self,
                req: Request<$api::PullImageRequest>,
            ) -> Result<Response<$api::PullImageResponse>, Status> {
                let m = req.get_ref();
                let image = m
                    .image
                    .as_ref()
                    .map(|i| i.image.clone())
                    .unwrap_or_default();
                let (auth, server) = match m.auth.as_ref() {
                    Some(a) => (
                        credential(&Auth {
                            username: &a.username,
                            password: &a.password,
                            auth: &a.auth,
                            identity_token: &a.identity_token,
                            registry_token: &a.registry_token,
                        }),
                        a.server_address.clone(),
                    ),
                    None => (Ok(None), String::new()),
                };
                let recorded = self.0.capture(&image, auth, server).await;
                let res = self.client().pull_image(forward(req)).await;
                self.0.settle(&image, recorded, res.is_ok()).await;
                if let Err(s) = &res {
                    tracing::info!(image, code = ?s.code(), error = %s.message(), "PullImage failed");
                }
                res.map_err(|s| self.0.unavailable(s))
            }

            async fn remove_image(
                &self,
                req: Request<$api::RemoveImageRequest>,
            ) -> Result<Response<$api::RemoveImageResponse>, Status> {
                // Credentials stay: they are kept per repository, and other tags of
                // it may still be mounted.
                self.client()
                    .remove_image(forward(req))
                    .await
                    .map_err(|s| self.0.unavailable(s))
            }

            async fn image_fs_info(
                &self,
                req: Request<$api::ImageFsInfoRequest>,
            ) -> Result<Response<$api::ImageFsInfoResponse>, Status> {
                self.client()
                    .image_fs_info(forward(req))
                    .await
                    .map_err(|s| self.0.unavailable(s))
            }
        }
    };
}

image_service!(V1, v1);
image_service!(V1alpha2, v1alpha2);

#[cfg(test)]
mod tests {
    use super::*;

    fn auth<'a>(u: &'a str, p: &'a str, a: &'a str, i: &'a str, r: &'a str) -> Auth<'a> {
        Auth {
            username: u,
            password: p,
            auth: a,
            identity_token: i,
            registry_token: r,
        }
    }

    #[test]
    fn auth_config_fields_in_containerds_order() {
        let basic = |u: &str, p: &str| {
            Some(Credential::Basic {
                username: u.into(),
                password: p.into(),
            })
        };
        assert_eq!(
            credential(&auth("u", "p", "", "id", "")),
            Ok(basic("u", "p"))
        );
        assert_eq!(
            credential(&auth("", "", "dTpwOnE=", "id", "")),
            Ok(Some(Credential::IdentityToken("id".into())))
        );
        // base64("u:p:q"): the password keeps its colons.
        assert_eq!(
            credential(&auth("", "", "dTpwOnE=", "", "")),
            Ok(basic("u", "p:q"))
        );
        assert_eq!(
            credential(&auth("", "", "", "", "rt")),
            Ok(Some(Credential::RegistryToken("rt".into())))
        );
        assert_eq!(credential(&auth("", "", "", "", "")), Ok(None));
        assert!(credential(&auth("", "", "!!", "", "")).is_err());
        // base64("nocolon")
        assert!(credential(&auth("", "", "bm9jb2xvbg==", "", "")).is_err());
    }

    #[test]
    fn forwarded_metadata_keeps_deadline_and_custom_keys() {
        let mut req = Request::new(());
        let m = req.metadata_mut();
        m.insert("grpc-timeout", "5S".parse().unwrap());
        m.insert("grpc-encoding", "gzip".parse().unwrap());
        m.insert("user-agent", "kubelet".parse().unwrap());
        m.insert("x-trace", "abc".parse().unwrap());
        let out = forward(req);
        let keys: Vec<String> = out
            .metadata()
            .keys()
            .map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => k.as_str().to_string(),
                tonic::metadata::KeyRef::Binary(k) => k.as_str().to_string(),
            })
            .collect();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, ["grpc-timeout", "x-trace"]);
    }
}
