//! The FUSE manager's protocol: one JSON request line and one JSON answer line per
//! connection on its root-only unix socket. Mount requests carry the typed layer
//! description and failed mounts answer with the typed reason.

use std::path::PathBuf;

use remote_layer::{MountError, RemoteLayer};
use serde::{Deserialize, Serialize};

/// One request per connection.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness; answers with the manager's pid and config digest.
    Status,
    Mount {
        mountpoint: PathBuf,
        layer: RemoteLayer,
    },
    Check {
        mountpoint: PathBuf,
    },
    Unmount {
        mountpoint: PathBuf,
    },
    /// Mount points currently served.
    List,
    /// The manager's metrics in Prometheus text form.
    Metrics,
    /// Unmount everything and exit.
    Shutdown,
}

/// The answer to a [`Request`].
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// Why the request failed, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the request failed, typed; absent from managers that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<MountError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `status`: digest of the config file the manager was started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// `status`: how much per-layer state the manager holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<StateCounts>,
}

impl Response {
    /// A success with nothing else to say.
    pub fn ok() -> Response {
        Response {
            ok: true,
            ..Default::default()
        }
    }

    /// Success, or the failure with its text and its kind.
    pub fn from_result(r: Result<(), MountError>) -> Response {
        match r {
            Ok(()) => Response::ok(),
            Err(e) => Response {
                error: Some(e.to_string()),
                failure: Some(e),
                ..Default::default()
            },
        }
    }

    /// The typed failure of an answer that is not ok.
    pub fn failure(self) -> MountError {
        match (self.failure, self.error) {
            (Some(f), _) => f,
            (None, Some(text)) => MountError::Other(text),
            (None, None) => MountError::Other("FUSE manager: failed".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn protocol_lines() {
        let r: Request = serde_json::from_str(r#"{"op":"check","mountpoint":"/m"}"#).unwrap();
        assert!(matches!(r, Request::Check { mountpoint } if mountpoint == Path::new("/m")));
        let r: Request = serde_json::from_str(
            r#"{"op":"mount","mountpoint":"/m","layer":{"image_ref":"h/r:1","digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}}"#,
        )
        .unwrap();
        assert!(
            matches!(r, Request::Mount { ref layer, .. } if layer.image_ref == "h/r:1" && layer.digest.to_string() == "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            "{r:?}"
        );
        let text = serde_json::to_string(&Response::from_result(Err(MountError::NotMounted(
            "gone".into(),
        ))))
        .unwrap();
        assert_eq!(
            text,
            r#"{"ok":false,"error":"not mounted: gone","failure":{"kind":"not_mounted","detail":"gone"}}"#
        );
        let back: Response = serde_json::from_str(&text).unwrap();
        assert_eq!(back.failure(), MountError::NotMounted("gone".into()));
        // An answer with text only (an older manager) is an untyped failure.
        let old: Response = serde_json::from_str(r#"{"ok":false,"error":"gone"}"#).unwrap();
        assert_eq!(old.failure(), MountError::Other("gone".into()));
    }
}

/// Per-layer state this process holds, for checking that nothing outlives its layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateCounts {
    /// Mounted layers.
    pub mounts: usize,
    /// Mount points with an operation under way.
    pub busy: usize,
    /// Layers opened ahead of their mount, not yet claimed.
    pub opening: usize,
    /// Image manifests remembered for opening layers ahead.
    pub manifests: usize,
}
