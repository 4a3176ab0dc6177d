//! Snapshots API over a real unix-socket gRPC connection: lifecycle, errors, filters, remote layers.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use remote_layer::label::{
    CRI_IMAGE_REF as LABEL_CRI_IMAGE_REF, CRI_LAYER_DIGEST as LABEL_CRI_LAYER_DIGEST,
    REMOTE as LABEL_REMOTE, TARGET_SNAPSHOT_REF as LABEL_TARGET,
};
use remote_layer::{MountError, RemoteLayer};
use snapshotter::proto::snapshots as pb;
use snapshotter::{Options, RemoteFs, Snapshotter};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Code;

type Client = pb::snapshots_client::SnapshotsClient<Channel>;

/// Marks a "mount" with a file so tests see it without FUSE.
#[derive(Default)]
struct FakeRemote {
    mounts: AtomicUsize,
    healthy: std::sync::atomic::AtomicBool,
    /// Reported by `mounted` as served by a process that outlived the snapshotter.
    extra_mounts: std::sync::Mutex<Vec<PathBuf>>,
    unmounted: std::sync::Mutex<Vec<PathBuf>>,
    /// Every mount times out.
    timing_out: std::sync::atomic::AtomicBool,
    /// How long a mount takes, in milliseconds. The mount runs on a task of its own, as
    /// in a FUSE manager process: dropping the caller does not stop it.
    mount_ms: std::sync::atomic::AtomicU64,
    /// How long an unmount takes, in milliseconds.
    unmount_ms: std::sync::atomic::AtomicU64,
    /// Held by a mount under way; unmount waits for it, as the trait requires.
    busy: Arc<tokio::sync::Mutex<()>>,
}

/// Labels from key/value pairs.
fn labels<const N: usize>(kv: [(&str, &str); N]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl RemoteFs for FakeRemote {
    async fn mount(&self, mp: &Path, layer: &RemoteLayer) -> Result<(), MountError> {
        if self.timing_out.load(Ordering::SeqCst) {
            return Err(MountError::Timeout("no answer".into()));
        }
        if layer.digest.to_string()
            == "sha256:2f05d4b689d270cafb02285f35f44866f7dc8a2d368a3f9d1124373eeab31fb1"
        {
            return Err(MountError::RegistryUnreachable("unreachable layer".into()));
        }
        let busy = self.busy.clone().lock_owned().await;
        let ms = self.mount_ms.load(Ordering::SeqCst);
        let mp = mp.to_path_buf();
        let work = tokio::spawn(async move {
            let _busy = busy;
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            std::fs::write(mp.join("remote-file"), b"x")
                .map_err(|e| MountError::Other(e.to_string()))
        });
        work.await.map_err(|e| MountError::Other(e.to_string()))??;
        self.mounts.fetch_add(1, Ordering::SeqCst);
        self.healthy.store(true, Ordering::SeqCst);
        Ok(())
    }
    async fn check(&self, _: &Path) -> Result<(), MountError> {
        if self.healthy.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(MountError::NotMounted("gone".into()))
        }
    }
    async fn unmount(&self, mp: &Path) -> Result<(), MountError> {
        let _busy = self.busy.lock().await;
        let ms = self.unmount_ms.load(Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        if std::fs::remove_file(mp.join("remote-file")).is_ok() {
            self.healthy.store(false, Ordering::SeqCst);
        }
        self.unmounted.lock().unwrap().push(mp.to_path_buf());
        Ok(())
    }
    async fn mounted(&self) -> Result<Vec<PathBuf>, MountError> {
        Ok(self.extra_mounts.lock().unwrap().clone())
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    root: PathBuf,
    client: Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.abort();
    }
}

async fn start(remote: Arc<FakeRemote>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let sock = dir.path().join("run/snap.sock");
    let sn = Arc::new(Snapshotter::open(Options::new(&root), remote).unwrap());
    let l = snapshotter::bind(&sock).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        snapshotter::serve(sn, l, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let s2 = sock.clone();
    let ch = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let s = s2.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(s).await?))
            }
        }))
        .await
        .unwrap();
    Harness {
        _dir: dir,
        root,
        client: Client::new(ch),
        stop: Some(tx),
        task,
    }
}

fn req<T>(ns: &str, m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("containerd-namespace", ns.parse().unwrap());
    r
}

async fn prepare(
    c: &mut Client,
    ns: &str,
    key: &str,
    parent: &str,
    labels: HashMap<String, String>,
) -> Result<Vec<snapshotter::proto::types::Mount>, tonic::Status> {
    c.prepare(req(
        ns,
        pb::PrepareSnapshotRequest {
            snapshotter: "stargz".into(),
            key: key.into(),
            parent: parent.into(),
            labels,
        },
    ))
    .await
    .map(|r| r.into_inner().mounts)
}

async fn commit(c: &mut Client, ns: &str, name: &str, key: &str) -> Result<(), tonic::Status> {
    c.commit(req(
        ns,
        pb::CommitSnapshotRequest {
            snapshotter: String::new(),
            name: name.into(),
            key: key.into(),
            labels: HashMap::new(),
        },
    ))
    .await
    .map(|_| ())
}

async fn remove(c: &mut Client, ns: &str, key: &str) -> Result<(), tonic::Status> {
    c.remove(req(
        ns,
        pb::RemoveSnapshotRequest {
            snapshotter: String::new(),
            key: key.into(),
        },
    ))
    .await
    .map(|_| ())
}

async fn list(c: &mut Client, ns: &str, filters: &[&str]) -> Vec<pb::Info> {
    let mut s = c
        .list(req(
            ns,
            pb::ListSnapshotsRequest {
                snapshotter: String::new(),
                filters: filters.iter().map(|s| s.to_string()).collect(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        out.extend(m.info);
    }
    out
}

fn snapshot_dirs(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn lifecycle_and_errors() {
    let h = start(Arc::default()).await;
    let mut c = h.client.clone();
    let ns = "t1";

    let m = prepare(&mut c, ns, "a", "", HashMap::new()).await.unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(m[0].options, vec!["rw", "rbind"]);
    assert!(m[0].source.ends_with("/snapshots/1/fs"), "{}", m[0].source);
    std::fs::write(format!("{}/hello", m[0].source), vec![7u8; 10000]).unwrap();

    assert_eq!(
        prepare(&mut c, ns, "a", "", HashMap::new())
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    assert_eq!(
        prepare(&mut c, ns, "b", "nope", HashMap::new())
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        prepare(&mut c, ns, "b", "a", HashMap::new())
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // The namespace header does not partition keys: containerd's metadata layer puts
    // the namespace into keys itself and calls the backend with and without the header
    // (the CRI plugin's Prepare carries it, the Stat of a remote target does not).
    let info = c
        .stat(tonic::Request::new(pb::StatSnapshotRequest {
            snapshotter: String::new(),
            key: "a".into(),
        }))
        .await
        .expect("stat without a namespace header")
        .into_inner();
    assert_eq!(info.info.map(|i| i.name), Some("a".to_string()));
    let info = c
        .stat(req(
            "other",
            pb::StatSnapshotRequest {
                snapshotter: String::new(),
                key: "a".into(),
            },
        ))
        .await
        .expect("stat with another namespace header");
    assert!(info.into_inner().info.is_some());

    commit(&mut c, ns, "l1", "a").await.unwrap();
    assert_eq!(
        commit(&mut c, ns, "l1x", "l1").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let st = c
        .stat(req(
            ns,
            pb::StatSnapshotRequest {
                snapshotter: String::new(),
                key: "l1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(st.kind, pb::Kind::Committed as i32);
    let u = c
        .usage(req(
            ns,
            pb::UsageRequest {
                snapshotter: String::new(),
                key: "l1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(u.size >= 10000 && u.inodes == 2, "{u:?}");

    // One parent: view is a read-only bind of it, active is an overlay.
    let v = c
        .view(req(
            ns,
            pb::ViewSnapshotRequest {
                snapshotter: String::new(),
                key: "v1".into(),
                parent: "l1".into(),
                labels: HashMap::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(
        (v[0].r#type.as_str(), v[0].options.clone()),
        ("bind", vec!["ro".to_string(), "rbind".to_string()])
    );
    assert!(v[0].source.ends_with("/snapshots/1/fs"));
    prepare(&mut c, ns, "b", "l1", HashMap::new())
        .await
        .unwrap();
    commit(&mut c, ns, "l2", "b").await.unwrap();
    let m = prepare(&mut c, ns, "c", "l2", HashMap::new())
        .await
        .unwrap();
    assert_eq!(m[0].r#type, "overlay");
    let opts = m[0].options.join(",");
    let r = h.root.display();
    assert!(opts.ends_with(&format!("workdir={r}/snapshots/4/work,upperdir={r}/snapshots/4/fs,lowerdir={r}/snapshots/3/fs:{r}/snapshots/1/fs")), "{opts}");
    let m2 = c
        .mounts(req(
            ns,
            pb::MountsRequest {
                snapshotter: String::new(),
                key: "c".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m, m2);
    let v2 = c
        .view(req(
            ns,
            pb::ViewSnapshotRequest {
                snapshotter: String::new(),
                key: "v2".into(),
                parent: "l2".into(),
                labels: HashMap::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert!(
        v2[0].options.last().unwrap().starts_with("lowerdir=")
            && !v2[0].options.iter().any(|o| o.starts_with("upperdir"))
    );

    // Children block removal.
    assert_eq!(
        remove(&mut c, ns, "l1").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        remove(&mut c, ns, "zzz").await.unwrap_err().code(),
        Code::NotFound
    );

    // Update with field paths.
    let upd = |labels: &[(&str, &str)], paths: &[&str]| pb::UpdateSnapshotRequest {
        snapshotter: String::new(),
        info: Some(pb::Info {
            name: "l2".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|s| s.to_string()).collect(),
        }),
    };
    let i = c
        .update(req(ns, upd(&[("a", "1"), ("b", "2")], &["labels"])))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(i.labels.len(), 2);
    let i = c
        .update(req(ns, upd(&[("c", "3")], &["labels.c", "labels.a"])))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(i.labels, labels([("b", "2"), ("c", "3")]));
    assert_eq!(
        c.update(req(ns, upd(&[], &["parent"])))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    // Filters.
    let names = |v: Vec<pb::Info>| {
        let mut n: Vec<String> = v.into_iter().map(|i| i.name).collect();
        n.sort();
        n
    };
    assert_eq!(
        names(list(&mut c, ns, &[]).await),
        vec!["c", "l1", "l2", "v1", "v2"]
    );
    assert_eq!(
        names(list(&mut c, ns, &["parent==l1"]).await),
        vec!["l2", "v1"]
    );
    assert_eq!(
        names(list(&mut c, ns, &["kind==committed"]).await),
        vec!["l1", "l2"]
    );
    assert_eq!(
        names(list(&mut c, ns, &["labels.c==3", "name==l1"]).await),
        vec!["l1", "l2"]
    );
    assert_eq!(
        names(list(&mut c, "other", &["kind==committed"]).await),
        vec!["l1", "l2"],
        "one keyspace whatever the namespace header"
    );
    let e = c
        .list(req(
            ns,
            pb::ListSnapshotsRequest {
                snapshotter: String::new(),
                filters: vec!["name==".into()],
            },
        ))
        .await;
    assert_eq!(e.err().map(|e| e.code()), Some(Code::InvalidArgument));

    // A leftover directory without metadata goes away on Cleanup.
    std::fs::create_dir_all(h.root.join("snapshots/999/fs")).unwrap();
    for k in ["c", "v2", "l2", "v1", "l1"] {
        remove(&mut c, ns, k).await.unwrap();
    }
    c.cleanup(req(
        ns,
        pb::CleanupRequest {
            snapshotter: String::new(),
        },
    ))
    .await
    .unwrap();
    assert_eq!(snapshot_dirs(&h.root), Vec::<String>::new());
}

#[tokio::test]
async fn remote_layers() {
    let fake = Arc::new(FakeRemote::default());
    let h = start(fake.clone()).await;
    let mut c = h.client.clone();
    let ns = "k8s.io";
    let layer = |digest: &str, target: &str| {
        labels([
            (LABEL_TARGET, target),
            (LABEL_CRI_IMAGE_REF, "127.0.0.1:5000/img:1"),
            (LABEL_CRI_LAYER_DIGEST, digest),
        ])
    };
    let e = prepare(
        &mut c,
        ns,
        "extract-1 chain1",
        "",
        layer(
            "sha256:2804bad6fe94a55f18b2b37e300919a5fd517b95aa81e95db574c0ba069a3740",
            "chain1",
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    // containerd's metadata layer finds the target this way.
    let found = list(
        &mut c,
        ns,
        &[r#"labels."containerd.io/snapshot.ref"==chain1,parent=="""#],
    )
    .await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].name, "chain1");
    assert!(found[0].labels.contains_key(LABEL_REMOTE));
    assert_eq!(found[0].kind, pb::Kind::Committed as i32);

    // Failing remote mount: normal active snapshot.
    let m = prepare(
        &mut c,
        ns,
        "extract-2",
        "chain1",
        layer(
            "sha256:2f05d4b689d270cafb02285f35f44866f7dc8a2d368a3f9d1124373eeab31fb1",
            "chain2",
        ),
    )
    .await
    .unwrap();
    assert_eq!(m[0].r#type, "overlay");
    commit(&mut c, ns, "chain2", "extract-2").await.unwrap();

    // A dead remote parent is remounted on Mounts.
    fake.healthy.store(false, Ordering::SeqCst);
    let before = fake.mounts.load(Ordering::SeqCst);
    let m = prepare(&mut c, ns, "ctr", "chain2", HashMap::new())
        .await
        .unwrap();
    assert_eq!(m[0].r#type, "overlay");
    assert_eq!(fake.mounts.load(Ordering::SeqCst), before + 1);

    // A remount that fails answers Unavailable, naming the kind of failure.
    fake.healthy.store(false, Ordering::SeqCst);
    fake.timing_out.store(true, Ordering::SeqCst);
    let e = prepare(&mut c, ns, "ctr2", "chain2", HashMap::new())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("timeout"), "{}", e.message());
    fake.timing_out.store(false, Ordering::SeqCst);

    for k in ["ctr2", "ctr", "chain2", "chain1"] {
        remove(&mut c, ns, k).await.unwrap();
    }
    assert_eq!(snapshot_dirs(&h.root), Vec::<String>::new());
}

#[tokio::test]
async fn restore_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let fake = Arc::new(FakeRemote::default());
    {
        let sn = Snapshotter::open(Options::new(&root), fake.clone()).unwrap();
        let l = labels([
            (LABEL_TARGET, "t"),
            (LABEL_CRI_IMAGE_REF, "r"),
            (
                LABEL_CRI_LAYER_DIGEST,
                "sha256:2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881",
            ),
        ]);
        assert!(matches!(
            sn.prepare("ns", "k", "", l).await,
            Err(snapshotter::Error::AlreadyExists(_))
        ));
        sn.unmount_all().await.unwrap();
        // A crash after the metadata went away leaves a directory behind.
        std::fs::create_dir_all(root.join("snapshots/77/fs")).unwrap();
    }
    let sn = Snapshotter::open(Options::new(&root), fake.clone()).unwrap();
    let before = fake.mounts.load(Ordering::SeqCst);
    assert_eq!(sn.restore_remote().await.unwrap(), 1);
    assert_eq!(fake.mounts.load(Ordering::SeqCst), before + 1);
    assert!(root.join("snapshots/1/fs/remote-file").exists());
    assert_eq!(sn.cleanup().await.unwrap(), 1);
    assert_eq!(snapshot_dirs(&root), vec!["1"]);
    drop(sn);

    // Mounts still served (by a process that outlived this one) are kept as they are;
    // a served mount without a snapshot is unmounted.
    let orphan = root.join("snapshots/9/fs");
    *fake.extra_mounts.lock().unwrap() = vec![root.join("snapshots/1/fs"), orphan.clone()];
    fake.unmounted.lock().unwrap().clear();
    let sn = Snapshotter::open(Options::new(&root), fake.clone()).unwrap();
    assert_eq!(sn.restore_remote().await.unwrap(), 1);
    assert_eq!(fake.mounts.load(Ordering::SeqCst), before + 1);
    assert!(root.join("snapshots/1/fs/remote-file").exists());
    assert_eq!(*fake.unmounted.lock().unwrap(), vec![orphan]);
}

/// A remote snapshot that cannot be mounted again fails the restore, naming it; with
/// `allow_invalid_mounts_on_restart` it is skipped and the others are restored.
#[tokio::test]
async fn restore_refuses_invalid_mounts_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let fake = Arc::new(FakeRemote::default());
    {
        let sn = Snapshotter::open(Options::new(&root), fake.clone()).unwrap();
        for (key, target, digest) in [
            (
                "k1",
                "good",
                "sha256:2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881",
            ),
            (
                "k2",
                "gone",
                "sha256:a1fce4363854ff888cff4b8e7875d600c2682390412a8cf79b37d0b11148b0fa",
            ),
        ] {
            let l = labels([
                (LABEL_TARGET, target),
                (LABEL_CRI_IMAGE_REF, "r"),
                (LABEL_CRI_LAYER_DIGEST, digest),
            ]);
            assert!(matches!(
                sn.prepare("ns", key, "", l).await,
                Err(snapshotter::Error::AlreadyExists(_))
            ));
        }
        sn.unmount_all().await.unwrap();
        // The second layer's registry is gone by the next start.
        sn.update(
            "ns",
            snapshotter::Info {
                name: "gone".into(),
                parent: String::new(),
                kind: snapshotter::Kind::Committed,
                labels: labels([(
                    LABEL_CRI_LAYER_DIGEST,
                    "sha256:2f05d4b689d270cafb02285f35f44866f7dc8a2d368a3f9d1124373eeab31fb1",
                )]),
                created: std::time::SystemTime::now(),
                updated: std::time::SystemTime::now(),
            },
            vec![format!("labels.{LABEL_CRI_LAYER_DIGEST}")],
        )
        .await
        .unwrap();
    }
    let mut opts = Options::new(&root);
    opts.restore_concurrency = 1;
    let sn = Snapshotter::open(opts, fake.clone()).unwrap();
    let e = sn.restore_remote().await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("\"gone\"") && text.contains("allow_invalid_mounts_on_restart"),
        "{text}"
    );
    assert!(!text.contains("\"good\""), "{text}");
    drop(sn);
    fake.healthy.store(false, Ordering::SeqCst);
    let mut opts = Options::new(&root);
    opts.allow_invalid_mounts_on_restart = true;
    // One at a time: the fake's health is one flag for all its mounts.
    opts.restore_concurrency = 1;
    let sn = Snapshotter::open(opts, fake.clone()).unwrap();
    assert_eq!(sn.restore_remote().await.unwrap(), 1);
}

fn remote_labels(digest: &str, target: &str) -> HashMap<String, String> {
    labels([
        (LABEL_TARGET, target),
        (LABEL_CRI_IMAGE_REF, "127.0.0.1:5000/img:1"),
        (LABEL_CRI_LAYER_DIGEST, digest),
    ])
}

/// Concurrent Prepares whose remote parent died remount it once: none unmounts the
/// mount another made, and no second mount is stacked on the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_remounts_of_one_layer_are_serialized() {
    let fake = Arc::new(FakeRemote::default());
    let h = start(fake.clone()).await;
    let mut c = h.client.clone();
    let ns = "k8s.io";
    let e = prepare(
        &mut c,
        ns,
        "extract-1",
        "",
        remote_labels(
            "sha256:2804bad6fe94a55f18b2b37e300919a5fd517b95aa81e95db574c0ba069a3740",
            "chain1",
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    fake.healthy.store(false, Ordering::SeqCst);
    fake.mount_ms.store(300, Ordering::SeqCst);
    fake.unmounted.lock().unwrap().clear();
    let before = fake.mounts.load(Ordering::SeqCst);
    let mut tasks = Vec::new();
    for i in 0..6 {
        let mut c = h.client.clone();
        tasks.push(tokio::spawn(async move {
            prepare(&mut c, ns, &format!("ctr{i}"), "chain1", HashMap::new()).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        fake.mounts.load(Ordering::SeqCst),
        before + 1,
        "remounted more than once"
    );
    assert_eq!(
        fake.unmounted.lock().unwrap().len(),
        1,
        "a fresh remount was unmounted"
    );
    assert!(h.root.join("snapshots/1/fs/remote-file").exists());
}

/// A Prepare for a target that is already committed (its first Prepare's answer was
/// lost to a killed daemon, so containerd asks again) adopts the target: AlreadyExists,
/// no second mount, and the new active snapshot is gone again. On another parent it
/// is an ordinary Prepare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_of_a_committed_target_adopts_it() {
    let fake = Arc::new(FakeRemote::default());
    let h = start(fake.clone()).await;
    let mut c = h.client.clone();
    let ns = "k8s.io";
    let digest = "sha256:2804bad6fe94a55f18b2b37e300919a5fd517b95aa81e95db574c0ba069a3740";
    let e = prepare(&mut c, ns, "extract-1", "", remote_labels(digest, "chain1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert_eq!(fake.mounts.load(Ordering::SeqCst), 1);
    let dirs = snapshot_dirs(&h.root);
    let e = prepare(&mut c, ns, "extract-2", "", remote_labels(digest, "chain1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert_eq!(fake.mounts.load(Ordering::SeqCst), 1, "mounted again");
    let names: Vec<String> = list(&mut c, ns, &[])
        .await
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, vec!["chain1".to_string()]);
    assert_eq!(
        snapshot_dirs(&h.root),
        dirs,
        "the second Prepare's directory stays"
    );

    // The same target name on top of another parent is not the same layer.
    let m = prepare(&mut c, ns, "base-key", "", HashMap::new())
        .await
        .unwrap();
    assert!(!m.is_empty());
    commit(&mut c, ns, "base", "base-key").await.unwrap();
    let e = prepare(
        &mut c,
        ns,
        "extract-3",
        "base",
        remote_labels(digest, "chain1"),
    )
    .await
    .unwrap();
    assert_eq!(e[0].r#type, "overlay", "an ordinary snapshot after all");
    assert_eq!(fake.mounts.load(Ordering::SeqCst), 2);
}

/// A Prepare that containerd gives up on while its remote layer is being mounted
/// leaves no mount behind once that mount finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_prepare_leaves_no_mount() {
    let fake = Arc::new(FakeRemote::default());
    let h = start(fake.clone()).await;
    let mut c = h.client.clone();
    fake.mount_ms.store(600, Ordering::SeqCst);
    let res = tokio::time::timeout(
        std::time::Duration::from_millis(150),
        prepare(
            &mut c,
            "k8s.io",
            "extract-1",
            "",
            remote_labels(
                "sha256:2804bad6fe94a55f18b2b37e300919a5fd517b95aa81e95db574c0ba069a3740",
                "chain1",
            ),
        ),
    )
    .await;
    assert!(res.is_err(), "the Prepare was not cut short: {res:?}");
    let fs = h.root.join("snapshots/1/fs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // The mount completes on its own; then it must be undone.
    while !fake.unmounted.lock().unwrap().contains(&fs) {
        assert!(
            std::time::Instant::now() < deadline,
            "the cancelled Prepare's mount was never unmounted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let _mount_done = fake.busy.lock().await;
    assert!(
        !fs.join("remote-file").exists(),
        "the cancelled Prepare's mount is still there"
    );
    // containerd never learned of the target: nothing was committed.
    assert!(list(&mut c, "k8s.io", &["name==chain1"]).await.is_empty());
}

/// Remove checks for children before it unmounts, in the same transaction: a child
/// prepared while the parent is being removed either fails (the parent is gone) or
/// keeps the parent, mounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_never_unmounts_a_parent_with_children() {
    let fake = Arc::new(FakeRemote::default());
    let h = start(fake.clone()).await;
    let mut c = h.client.clone();
    let ns = "k8s.io";
    let e = prepare(
        &mut c,
        ns,
        "extract-1",
        "",
        remote_labels(
            "sha256:2804bad6fe94a55f18b2b37e300919a5fd517b95aa81e95db574c0ba069a3740",
            "chain1",
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    fake.unmount_ms.store(500, Ordering::SeqCst);
    let mut c2 = h.client.clone();
    let removing = tokio::spawn(async move { remove(&mut c2, ns, "chain1").await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let child = prepare(&mut c, ns, "ctr", "chain1", HashMap::new()).await;
    let removed = removing.await.unwrap();
    match (&removed, &child) {
        (Ok(()), Err(e)) => assert_eq!(e.code(), Code::NotFound, "{e:?}"),
        (Err(e), Ok(_)) => {
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
            assert!(
                h.root.join("snapshots/1/fs/remote-file").exists(),
                "the parent of a live child was unmounted"
            );
        }
        other => panic!("remove and prepare: {other:?}"),
    }
}

/// containerd calls Cleanup whenever its garbage collector ran, while other clients
/// keep preparing: a snapshot whose record is being committed must never be taken for
/// an orphan directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_never_removes_snapshots_being_created() {
    let h = start(Arc::new(FakeRemote::default())).await;
    let ns = "race";
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut cleaners = Vec::new();
    for _ in 0..2 {
        let mut c = h.client.clone();
        let done = done.clone();
        cleaners.push(tokio::spawn(async move {
            let mut rounds = 0u32;
            while !done.load(Ordering::SeqCst) {
                c.cleanup(req(
                    ns,
                    pb::CleanupRequest {
                        snapshotter: String::new(),
                    },
                ))
                .await
                .unwrap();
                rounds += 1;
            }
            rounds
        }));
    }
    let mut creators = Vec::new();
    for t in 0..4 {
        let mut c = h.client.clone();
        creators.push(tokio::spawn(async move {
            for i in 0..50 {
                prepare(&mut c, ns, &format!("k{t}-{i}"), "", HashMap::new())
                    .await
                    .unwrap();
            }
        }));
    }
    for t in creators {
        t.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    for t in cleaners {
        assert!(t.await.unwrap() > 0, "cleanup never ran");
    }
    assert_eq!(list(&mut h.client.clone(), ns, &[]).await.len(), 200);
    assert_eq!(
        snapshot_dirs(&h.root).len(),
        200,
        "a snapshot directory was removed"
    );
}
