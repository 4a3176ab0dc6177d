//! `ctr-remote doctor`: checks a node's lazy-pulling set-up end to end (FUSE,
//! containerd's config and plugins, the snapshotter's socket, kubelet's image
//! endpoint, a test pull) and says what is wrong, and how to fix it, in plain words.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use containerd_client::services::v1::introspection_client::IntrospectionClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::ListSnapshotsRequest;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{
    images_client::ImagesClient, namespaces_client::NamespacesClient, DeleteImageRequest,
    DeleteNamespaceRequest, PluginsRequest,
};
use containerd_client::tonic::Request;

use crate::common::{client_for, RegistryArgs};
use crate::place::{Place, REGISTRY_PREFIX};

/// Where kubelet's flags or config may name its image service, in the layouts of
/// kubeadm, Debian/Ubuntu, RHEL and systemd drop-ins.
const KUBELET_FILES: &[&str] = &[
    "/var/lib/kubelet/config.yaml",
    "/var/lib/kubelet/kubeadm-flags.env",
    "/etc/default/kubelet",
    "/etc/sysconfig/kubelet",
    "/etc/kubernetes/kubelet.conf.d/stargz.conf",
];

/// The CRI plugin of containerd 1.x and its table in a version 2 config.
const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";

/// How long one probe of a socket may take before it counts as not answering.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// containerd's config file.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    pub containerd_config: PathBuf,
    /// The snapshotter's socket (containerd-stargz-grpc --address).
    #[arg(
        long,
        default_value = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
    )]
    pub snapshotter_address: PathBuf,
    /// The snapshotter's config file (containerd-stargz-grpc --config).
    #[arg(long, default_value = "/etc/containerd-stargz-grpc/config.toml")]
    pub snapshotter_config: PathBuf,
    /// The snapshotter's name in containerd.
    #[arg(long, default_value = "stargz")]
    pub snapshotter: String,
    /// kubelet config or flag files to read its image endpoint from (default: the
    /// usual kubeadm, Debian and RHEL places).
    #[arg(long = "kubelet-config")]
    pub kubelet_config: Vec<PathBuf>,
    /// Also pull this image lazily (in a throwaway containerd namespace, removed
    /// afterwards) and report how many layers were mounted remotely.
    #[arg(long)]
    pub image: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// The verdict of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
    Skip,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` keeps the width the report's columns ask for.
        f.pad(match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        })
    }
}

/// One check's verdict, what it found, and what to do about it.
#[derive(Debug)]
pub struct Finding {
    pub status: Status,
    pub check: &'static str,
    pub message: String,
    pub fix: Option<String>,
}

impl Finding {
    fn new(status: Status, check: &'static str, message: impl Into<String>) -> Finding {
        Finding {
            status,
            check,
            message: message.into(),
            fix: None,
        }
    }
    fn fix(mut self, fix: impl Into<String>) -> Finding {
        self.fix = Some(fix.into());
        self
    }
}

/// Runs every check, prints one line per finding, and fails when any check failed.
pub fn run(args: DoctorArgs, address: &str, namespace: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let findings = rt.block_on(check_all(&args, address, namespace));
    let mut failed = 0;
    for f in &findings {
        println!("{:<5} {:<12} {}", f.status, f.check, f.message);
        if let Some(fix) = &f.fix {
            println!("{:<18} fix: {fix}", "");
        }
        failed += usize::from(f.status == Status::Fail);
    }
    if failed > 0 {
        anyhow::bail!("{failed} problem(s) found");
    }
    println!("no problems found");
    Ok(())
}

async fn check_all(args: &DoctorArgs, address: &str, namespace: &str) -> Vec<Finding> {
    let mut out = vec![check_fuse()];
    out.extend(check_containerd_config(args));
    out.push(check_snapshotter_socket(args).await);
    out.extend(check_containerd(args, address).await);
    out.push(check_kubelet(args));
    if let Some(image) = &args.image {
        out.push(check_pull(args, image, address, namespace).await);
    }
    out
}

fn check_fuse() -> Finding {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => Finding::new(Status::Ok, "fuse", "/dev/fuse can be opened"),
        Err(e) => Finding::new(
            Status::Fail,
            "fuse",
            format!("/dev/fuse cannot be opened ({e}): layers cannot be mounted lazily"),
        )
        .fix("load the module (modprobe fuse) and run the snapshotter as root with /dev/fuse"),
    }
}

/// `table.a.b.c` of a parsed TOML document.
fn lookup<'a>(doc: &'a toml::Value, path: &[&str]) -> Option<&'a toml::Value> {
    path.iter().try_fold(doc, |v, k| v.get(*k))
}

fn check_containerd_config(args: &DoctorArgs) -> Vec<Finding> {
    const C: &str = "containerd";
    let path = args.containerd_config.display();
    let text = match std::fs::read_to_string(&args.containerd_config) {
        Ok(t) => t,
        Err(e) => {
            return vec![Finding::new(
                Status::Fail,
                C,
                format!(
                    "cannot read {path} ({e}): containerd runs without the stargz proxy plugin"
                ),
            )
            .fix(format!(
                "write {path} from deploy/containerd-config.toml and restart containerd"
            ))]
        }
    };
    let doc: toml::Value = match toml::from_str(&text) {
        Ok(d) => d,
        Err(e) => {
            return vec![Finding::new(
                Status::Fail,
                C,
                format!("{path} is not valid TOML: {e}"),
            )]
        }
    };
    let mut out = Vec::new();
    let name = args.snapshotter.as_str();
    let want_addr = args.snapshotter_address.display().to_string();
    match lookup(&doc, &["proxy_plugins", name]) {
        None => out.push(
            Finding::new(
                Status::Fail,
                C,
                format!("{path} has no [proxy_plugins.{name}]: containerd does not know the snapshotter"),
            )
            .fix(format!(
                "add [proxy_plugins.{name}] type = \"snapshot\", address = \"{want_addr}\", then restart containerd"
            )),
        ),
        Some(p) => {
            let kind = p.get("type").and_then(|v| v.as_str()).unwrap_or("");
            let addr = p.get("address").and_then(|v| v.as_str()).unwrap_or("");
            if kind != "snapshot" {
                out.push(Finding::new(
                    Status::Fail,
                    C,
                    format!("[proxy_plugins.{name}] has type = {kind:?}, not \"snapshot\""),
                ));
            } else if Path::new(addr) != args.snapshotter_address {
                out.push(
                    Finding::new(
                        Status::Fail,
                        C,
                        format!("[proxy_plugins.{name}] dials {addr:?}, but the snapshotter listens on {want_addr:?}"),
                    )
                    .fix("make the two addresses the same (containerd-stargz-grpc --address), then restart containerd"),
                );
            } else {
                out.push(Finding::new(
                    Status::Ok,
                    C,
                    format!("{path}: proxy plugin {name:?} dials {addr}"),
                ));
            }
        }
    }

    let version = doc.get("version").and_then(|v| v.as_integer()).unwrap_or(1);
    let disabled = doc
        .get("disabled_plugins")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .any(|p| matches!(p.as_str(), Some(CRI_PLUGIN) | Some("cri")))
        })
        .unwrap_or(false);
    if disabled {
        out.push(Finding::new(
            Status::Warn,
            C,
            "the CRI plugin is disabled: Kubernetes cannot use this containerd (ctr and nerdctl can)",
        ));
        return out;
    }
    let cri = match version {
        2 => lookup(&doc, &["plugins", CRI_PLUGIN, "containerd"]),
        3 => lookup(&doc, &["plugins", "io.containerd.cri.v1.images"]),
        _ => lookup(&doc, &["plugins", "cri", "containerd"]),
    };
    let snapshotter = cri
        .and_then(|c| c.get("snapshotter"))
        .and_then(|v| v.as_str())
        .unwrap_or("overlayfs");
    if snapshotter != name {
        out.push(
            Finding::new(
                Status::Fail,
                C,
                format!("Kubernetes pods are pulled with snapshotter {snapshotter:?}, not {name:?}: nothing is lazily pulled for them"),
            )
            .fix(format!("set snapshotter = \"{name}\" in the CRI plugin's containerd table, then restart containerd")),
        );
    }
    let annotations_off = cri
        .and_then(|c| c.get("disable_snapshot_annotations"))
        .and_then(|v| v.as_bool());
    if annotations_off != Some(false) {
        out.push(
            Finding::new(
                Status::Fail,
                C,
                "disable_snapshot_annotations is not false: the CRI plugin does not tell the snapshotter which layer it prepares, so every layer is downloaded in full",
            )
            .fix("set disable_snapshot_annotations = false next to snapshotter, then restart containerd"),
        );
    }
    if snapshotter == name && annotations_off == Some(false) {
        out.push(Finding::new(
            Status::Ok,
            C,
            format!("the CRI plugin pulls with {name:?} and passes layer labels"),
        ));
    }
    out
}

async fn check_snapshotter_socket(args: &DoctorArgs) -> Finding {
    const C: &str = "snapshotter";
    let sock = &args.snapshotter_address;
    let meta = match std::fs::metadata(sock) {
        Ok(m) => m,
        Err(e) => {
            return Finding::new(
                Status::Fail,
                C,
                format!("{} does not exist ({e}): the snapshotter is not running", sock.display()),
            )
            .fix("systemctl enable --now containerd-stargz-grpc; see journalctl -u containerd-stargz-grpc")
        }
    };
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    if !meta.file_type().is_socket() {
        return Finding::new(
            Status::Fail,
            C,
            format!("{} is not a socket", sock.display()),
        );
    }
    let answer = tokio::time::timeout(PROBE_TIMEOUT, async {
        let ch = containerd_client::connect(sock)
            .await
            .map_err(|e| e.to_string())?;
        let mut req = Request::new(ListSnapshotsRequest {
            snapshotter: args.snapshotter.clone(),
            filters: Vec::new(),
        });
        if let Ok(v) = "default".parse() {
            req.metadata_mut().insert("containerd-namespace", v);
        }
        let mut stream = SnapshotsClient::new(ch)
            .list(req)
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let mut n = 0usize;
        while let Some(page) = stream
            .message()
            .await
            .map_err(|s| s.message().to_string())?
        {
            n += page.info.len();
        }
        Ok::<usize, String>(n)
    })
    .await;
    match answer {
        Ok(Ok(n)) => {
            let mode = meta.permissions().mode();
            if mode & 0o007 != 0 {
                Finding::new(
                    Status::Warn,
                    C,
                    format!(
                        "{} answers ({n} snapshots) but anyone on the node may connect (mode {:o})",
                        sock.display(),
                        mode & 0o777
                    ),
                )
            } else {
                Finding::new(
                    Status::Ok,
                    C,
                    format!(
                        "{} answers ({n} snapshots in namespace default)",
                        sock.display()
                    ),
                )
            }
        }
        Ok(Err(e)) => Finding::new(
            Status::Fail,
            C,
            format!("{} does not answer the snapshots API: {e}", sock.display()),
        )
        .fix("restart containerd-stargz-grpc; see journalctl -u containerd-stargz-grpc"),
        Err(_) => Finding::new(
            Status::Fail,
            C,
            format!(
                "{} did not answer within {} s",
                sock.display(),
                PROBE_TIMEOUT.as_secs()
            ),
        ),
    }
}

async fn check_containerd(args: &DoctorArgs, address: &str) -> Vec<Finding> {
    const C: &str = "containerd";
    let probe = tokio::time::timeout(PROBE_TIMEOUT, async {
        let ch = containerd_client::connect(address)
            .await
            .map_err(|e| e.to_string())?;
        let version = VersionClient::new(ch.clone())
            .version(())
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let plugins = IntrospectionClient::new(ch)
            .plugins(PluginsRequest {
                filters: vec![format!(
                    "type==io.containerd.snapshotter.v1,id=={}",
                    args.snapshotter
                )],
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner()
            .plugins;
        Ok::<_, String>((version.version, plugins))
    })
    .await;
    let (version, plugins) = match probe {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            return vec![Finding::new(
                Status::Fail,
                C,
                format!("containerd at {address} does not answer: {e}"),
            )
            .fix("systemctl status containerd (or pass -a with containerd's socket)")]
        }
        Err(_) => {
            return vec![Finding::new(
                Status::Fail,
                C,
                format!(
                    "containerd at {address} did not answer within {} s",
                    PROBE_TIMEOUT.as_secs()
                ),
            )]
        }
    };
    let mut out = vec![Finding::new(
        Status::Ok,
        C,
        format!("containerd {version} answers at {address}"),
    )];
    match plugins.first() {
        None => out.push(
            Finding::new(
                Status::Fail,
                C,
                format!("the running containerd has no snapshotter {:?}: its config was changed but containerd not restarted, or it reads another config file", args.snapshotter),
            )
            .fix("systemctl restart containerd"),
        ),
        Some(p) => match &p.init_err {
            Some(e) => out.push(Finding::new(
                Status::Fail,
                C,
                format!("containerd could not load snapshotter {:?}: {}", args.snapshotter, e.message),
            )),
            None => out.push(Finding::new(
                Status::Ok,
                C,
                format!("the running containerd has snapshotter {:?}", args.snapshotter),
            )),
        },
    }
    out
}

/// kubelet's image service endpoint, from a config file (`imageServiceEndpoint:`) or
/// a flags file (`--image-service-endpoint=...`), without the `unix://` scheme.
pub fn kubelet_image_endpoint(text: &str) -> Option<String> {
    let strip = |v: &str| {
        let v = v.trim().trim_matches(|c| c == '"' || c == '\'');
        v.strip_prefix("unix://").unwrap_or(v).to_string()
    };
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("imageServiceEndpoint:") {
            return Some(strip(v));
        }
        let mut words = line.split(|c: char| c.is_whitespace() || c == '"' || c == '\'');
        const FLAG: &str = "--image-service-endpoint";
        while let Some(w) = words.next() {
            // The flag may follow a variable's `=` (`KUBELET_EXTRA_ARGS=--image-...`).
            let Some(at) = w.find(FLAG) else { continue };
            let rest = &w[at + FLAG.len()..];
            if let Some(v) = rest.strip_prefix('=') {
                return Some(strip(v));
            }
            if rest.is_empty() {
                return words.find(|w| !w.is_empty()).map(strip);
            }
        }
    }
    None
}

/// Whether the snapshotter's config turns the CRI keychain on, and the socket it
/// then serves kubelet on when that is not the snapshotter's own (`listen_path`).
fn cri_keychain(path: &Path) -> (bool, Option<String>) {
    let Some(doc) = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| toml::from_str::<toml::Value>(&t).ok())
    else {
        return (false, None);
    };
    let enabled = lookup(&doc, &["cri_keychain", "enable_keychain"])
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let listen = lookup(&doc, &["listen_path"])
        .or_else(|| lookup(&doc, &["cri_keychain", "listen_path"]))
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    (enabled, listen)
}

fn check_kubelet(args: &DoctorArgs) -> Finding {
    const C: &str = "kubelet";
    let files: Vec<PathBuf> = if args.kubelet_config.is_empty() {
        KUBELET_FILES.iter().map(PathBuf::from).collect()
    } else {
        args.kubelet_config.clone()
    };
    let mut seen = false;
    let mut endpoint = None;
    for f in &files {
        if let Ok(text) = std::fs::read_to_string(f) {
            seen = true;
            if let Some(e) = kubelet_image_endpoint(&text) {
                endpoint = Some((e, f.clone()));
            }
        }
    }
    let (keychain, listen) = cri_keychain(&args.snapshotter_config);
    let ours = listen.unwrap_or_else(|| args.snapshotter_address.display().to_string());
    match (seen, endpoint, keychain) {
        (false, _, _) => Finding::new(Status::Skip, C, "no kubelet configuration on this node"),
        (true, Some((e, f)), true) if e == ours => Finding::new(
            Status::Ok,
            C,
            format!("kubelet pulls through the snapshotter ({}), so imagePullSecrets reach it", f.display()),
        ),
        (true, Some((e, f)), false) if e == ours => Finding::new(
            Status::Fail,
            C,
            format!("kubelet's image endpoint ({}) is the snapshotter's socket, but [cri_keychain] is off in {}: every kubelet image call fails", f.display(), args.snapshotter_config.display()),
        )
        .fix("set [cri_keychain] enable_keychain = true and image_service_path = containerd's socket, then restart containerd-stargz-grpc"),
        (true, e, true) => Finding::new(
            Status::Fail,
            C,
            format!(
                "[cri_keychain] is on, but kubelet sends image pulls to {}: credentials of private images never reach the snapshotter, so their layers are downloaded in full",
                e.map(|(e, _)| e).unwrap_or_else(|| "its container runtime".into())
            ),
        )
        .fix(format!("start kubelet with --image-service-endpoint=unix://{ours} (or imageServiceEndpoint in its config)")),
        (true, _, false) => Finding::new(
            Status::Ok,
            C,
            "kubelet pulls through containerd; private images need [cri_keychain], [kubeconfig_keychain] or node credentials",
        ),
    }
}

async fn check_pull(args: &DoctorArgs, image: &str, address: &str, namespace: &str) -> Finding {
    const C: &str = "pull";
    // A namespace of its own: the test pull prepares every layer afresh, and removing
    // it afterwards leaves the node's images as they were.
    let ns = format!("{namespace}-stargz-doctor-{}", std::process::id());
    let res = test_pull(args, image, address, &ns).await;
    cleanup(address, &ns, image).await;
    match res {
        Err(e) => Finding::new(Status::Fail, C, format!("pulling {image} failed: {e:#}")),
        Ok(r) => {
            let total = r.remote + r.filled + r.unpacked + r.existing;
            let full = r.filled + r.unpacked;
            if full == 0 && r.remote > 0 {
                Finding::new(
                    Status::Ok,
                    C,
                    format!("{image}: all {total} layer(s) mounted lazily"),
                )
            } else if r.remote == 0 {
                Finding::new(
                    Status::Fail,
                    C,
                    format!("{image}: none of {total} layer(s) was mounted lazily: all were downloaded in full"),
                )
                .fix("check that the image is eStargz or zstd:chunked (ctr-remote image inspect); the snapshotter logs each layer that fell back with its reason and counts it in stargz_layer_fallbacks_total{reason}")
            } else {
                Finding::new(
                    Status::Warn,
                    C,
                    format!(
                        "{image}: {} of {total} layer(s) mounted lazily, {} downloaded in full (not eStargz, or they fell back: see the snapshotter's log)",
                        r.remote, full
                    ),
                )
            }
        }
    }
}

async fn test_pull(
    args: &DoctorArgs,
    image: &str,
    address: &str,
    ns: &str,
) -> Result<containerd_pull::RpullReport> {
    let name = image.strip_prefix(REGISTRY_PREFIX).unwrap_or(image);
    let reference = registry::Reference::parse(name)
        .with_context(|| format!("--image takes a registry reference, not {image:?}"))?;
    let place = Place::Registry(reference.clone());
    let client = client_for(&args.registry, None, &[&place])?;
    let opts = containerd_pull::RpullOptions {
        address: address.to_string(),
        namespace: ns.to_string(),
        snapshotter: args.snapshotter.clone(),
        platform: registry::Platform::host(),
        skip_content_verify: false,
        containerd_labels: false,
        image_labels: Default::default(),
        prefetch_size: containerd_pull::DEFAULT_PREFETCH_SIZE,
    };
    let workdir = tempfile::tempdir().context("a work directory")?;
    Ok(containerd_pull::rpull(&client, &reference, &opts, workdir.path()).await?)
}

/// Removes the test pull's image (containerd's garbage collector then removes its
/// snapshots and content) and its namespace.
async fn cleanup(address: &str, ns: &str, image: &str) {
    let Ok(ch) = containerd_client::connect(address).await else {
        return;
    };
    let mut images = ImagesClient::new(ch.clone());
    let list = {
        let mut r = Request::new(containerd_client::services::v1::ListImagesRequest {
            filters: Vec::new(),
        });
        if let Ok(v) = ns.parse() {
            r.metadata_mut().insert("containerd-namespace", v);
        }
        images.list(r).await.map(|r| r.into_inner().images)
    };
    let names: Vec<String> = match list {
        Ok(l) => l.into_iter().map(|i| i.name).collect(),
        Err(_) => vec![image.to_string()],
    };
    for name in names {
        let mut r = Request::new(DeleteImageRequest {
            name,
            sync: true,
            target: None,
        });
        if let Ok(v) = ns.parse() {
            r.metadata_mut().insert("containerd-namespace", v);
        }
        let _ = images.delete(r).await;
    }
    // The collector may still be removing the namespace's last snapshots.
    let mut namespaces = NamespacesClient::new(ch);
    for _ in 0..50 {
        let gone = namespaces
            .delete(DeleteNamespaceRequest {
                name: ns.to_string(),
            })
            .await;
        match gone {
            Ok(_) => return,
            Err(s) if s.code() == containerd_client::tonic::Code::NotFound => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    tracing::warn!(
        namespace = ns,
        "the test pull's namespace could not be removed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_endpoint_from_each_file_form() {
        let sock = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock";
        for text in [
            format!("kind: KubeletConfiguration\nimageServiceEndpoint: unix://{sock}\n"),
            format!("KUBELET_KUBEADM_ARGS=\"--container-runtime-endpoint=unix:///run/containerd/containerd.sock --image-service-endpoint=unix://{sock}\"\n"),
            format!("KUBELET_EXTRA_ARGS=--image-service-endpoint {sock}\n"),
        ] {
            assert_eq!(kubelet_image_endpoint(&text).as_deref(), Some(sock), "{text}");
        }
        assert_eq!(
            kubelet_image_endpoint("KUBELET_EXTRA_ARGS=--container-runtime-endpoint=unix:///x\n"),
            None
        );
    }
}
