//! Integration tests against a real CNCF distribution registry, directly and
//! behind fault-injecting fronts. They skip loudly (or fail under CI=true)
//! when `docker-registry` is not installed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use registry::{
    Anonymous, BlobConfig, Client, Credential, Descriptor, Digest, Error, ImageIndex,
    ImageManifest, Keychain, MirrorConfig, Platform, PushBlobOptions, PushOutcome, Reference,
    RegistryConfig, StaticKeychain, OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST,
};
use testenv::{random_bytes, Front, FrontOpts, IssuerOpts, Registry, RegistryOpts, TokenIssuer};

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn fast_blob() -> BlobConfig {
    BlobConfig {
        max_retries: 4,
        min_wait_msec: 10,
        max_wait_msec: 300,
        fetching_timeout_sec: 30,
        ..BlobConfig::default()
    }
}

fn client_with(cfg: RegistryConfig, k: Arc<dyn Keychain>) -> Client {
    Client::new(cfg, k).expect("client")
}

fn anon() -> Client {
    client_with(
        RegistryConfig {
            blob: fast_blob(),
            ..Default::default()
        },
        Arc::new(Anonymous),
    )
}

/// An anonymous client that asks `mirror` (plain HTTP) before `registry` itself.
fn with_mirror(registry: &str, mirror: &str) -> Client {
    let mut cfg = RegistryConfig {
        blob: fast_blob(),
        ..Default::default()
    };
    cfg.resolver.host.insert(
        registry.to_string(),
        registry::HostConfig {
            mirrors: vec![MirrorConfig {
                host: mirror.to_string(),
                insecure: Some(true),
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    client_with(cfg, Arc::new(Anonymous))
}

fn reference(host: &str, repo: &str) -> Reference {
    Reference::parse(&format!("{host}/{repo}:latest")).expect("reference")
}

/// Pushes a one-layer image through the client under test.
async fn push_simple(c: &Client, r: &Reference, layer: &[u8]) -> (Digest, ImageManifest) {
    let config = Bytes::from_static(
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    );
    c.push_blob(r, config.clone(), &PushBlobOptions::default())
        .await
        .expect("push config");
    c.push_blob(
        r,
        Bytes::copy_from_slice(layer),
        &PushBlobOptions::default(),
    )
    .await
    .expect("push layer");
    let m = ImageManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        config: Descriptor::for_bytes(OCI_CONFIG, &config),
        layers: vec![Descriptor::for_bytes(OCI_LAYER_GZIP, layer)],
        annotations: None,
        subject: None,
        artifact_type: None,
    };
    let (d, _) = c
        .push_manifest_json(r, OCI_MANIFEST, &m)
        .await
        .expect("push manifest");
    (d, m)
}

#[tokio::test]
async fn push_pull_index_mount_and_errors() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let c = anon();
    let r = reference(&reg.host(), "app/one");

    // Monolithic and chunked uploads, then skip-if-exists.
    let a = Bytes::from(random_bytes(300_000, 1));
    let (da, out) = c
        .push_blob(&r, a.clone(), &PushBlobOptions::default())
        .await
        .expect("push a");
    assert_eq!(out, PushOutcome::Uploaded);
    let b = Bytes::from(random_bytes(250_000, 2));
    let (db, out) = c
        .push_blob(
            &r,
            b.clone(),
            &PushBlobOptions {
                chunk_size: Some(100_000),
                ..Default::default()
            },
        )
        .await
        .expect("push b");
    assert_eq!(out, PushOutcome::UploadedChunked(3));
    assert_eq!(
        c.push_blob(&r, a.clone(), &PushBlobOptions::default())
            .await
            .expect("again")
            .1,
        PushOutcome::AlreadyExists
    );
    assert_eq!(c.get_blob(&r, &db).await.expect("get b"), b);
    assert_eq!(
        c.blob_exists(&r, &da).await.expect("exists"),
        Some(a.len() as u64)
    );

    // Cross-repository mount.
    let other = reference(&reg.host(), "app/two");
    let (_, out) = c
        .push_blob(
            &other,
            a.clone(),
            &PushBlobOptions {
                mount_from: Some("app/one".into()),
                ..Default::default()
            },
        )
        .await
        .expect("mount");
    assert_eq!(out, PushOutcome::Mounted);
    assert_eq!(c.get_blob(&other, &da).await.expect("mounted blob"), a);

    // Two platform images and an index.
    let (d_amd, _) = push_simple(&c, &r.at_tag("amd").expect("tag"), &a).await;
    let (d_arm, m_arm) = push_simple(&c, &r.at_tag("arm").expect("tag"), &b).await;
    let plat = |arch: &str, variant: Option<&str>| Platform {
        os: "linux".into(),
        architecture: arch.into(),
        variant: variant.map(Into::into),
        os_version: None,
        os_features: None,
    };
    let desc = |d: &Digest, p: Platform| Descriptor {
        media_type: OCI_MANIFEST.into(),
        digest: d.clone(),
        size: 0,
        urls: None,
        annotations: None,
        platform: Some(p),
        artifact_type: None,
    };
    let mut m_amd_desc = desc(&d_amd, plat("amd64", None));
    m_amd_desc.size = c
        .get_manifest(&r.at_digest(d_amd.clone()))
        .await
        .expect("amd manifest")
        .bytes
        .len() as u64;
    let mut m_arm_desc = desc(&d_arm, plat("arm64", Some("v8")));
    m_arm_desc.size = c
        .get_manifest(&r.at_digest(d_arm.clone()))
        .await
        .expect("arm manifest")
        .bytes
        .len() as u64;
    let idx = ImageIndex {
        schema_version: 2,
        media_type: Some(OCI_INDEX.into()),
        manifests: vec![m_amd_desc, m_arm_desc],
        annotations: None,
    };
    let (d_idx, _) = c
        .push_manifest_json(&r, OCI_INDEX, &idx)
        .await
        .expect("push index");

    let by_tag = c.get_manifest(&r).await.expect("index by tag");
    assert_eq!(by_tag.digest, d_idx);
    let by_digest = c
        .get_manifest(&r.at_digest(d_idx.clone()))
        .await
        .expect("index by digest");
    assert_eq!(by_digest.bytes, by_tag.bytes);
    let img = c
        .resolve_image(&r, &Platform::parse("linux/arm64").expect("platform"))
        .await
        .expect("resolve arm64");
    assert_eq!(img.digest, d_arm);
    assert_eq!(img.manifest, m_arm);
    assert_eq!(
        img.index.as_ref().map(|(d, _)| d.clone()),
        Some(d_idx.clone())
    );
    let cfg = c
        .get_blob(&r, &img.manifest.config.digest)
        .await
        .expect("config");
    assert!(cfg.starts_with(b"{\"architecture\""));
    match c
        .resolve_image(&r, &Platform::parse("linux/s390x").expect("p"))
        .await
    {
        Err(Error::PlatformNotFound { .. }) => {}
        other => panic!("expected PlatformNotFound, got {other:?}"),
    }

    // 404s name what is missing.
    let e = c
        .get_manifest(&r.at_tag("nope").expect("tag"))
        .await
        .expect_err("missing manifest");
    assert!(matches!(e, Error::ManifestNotFound { .. }), "{e}");
    assert!(
        e.to_string().contains("manifest") && e.to_string().contains(":nope"),
        "{e}"
    );
    let missing = Digest::sha256(b"not there");
    let e = c.get_blob(&r, &missing).await.expect_err("missing blob");
    assert!(matches!(e, Error::BlobNotFound { .. }), "{e}");
    assert!(
        e.to_string().contains("blob") && e.to_string().contains(&missing.to_string()),
        "{e}"
    );
    let e = c
        .get_manifest(&r.at_digest(missing.clone()))
        .await
        .expect_err("missing by digest");
    assert!(matches!(e, Error::ManifestNotFound { .. }), "{e}");

    // A blob whose stored bytes were corrupted fails verification.
    let path = reg.blob_data_path(db.hex());
    let mut bad = std::fs::read(&path).expect("read stored blob");
    bad[10] ^= 0xff;
    std::fs::write(&path, &bad).expect("corrupt blob");
    let e = anon().get_blob(&r, &db).await.expect_err("corrupt blob");
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
}

#[tokio::test]
async fn ranges_match_whole_blob() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let data = random_bytes(3 << 20, 7);
    let pushed = testenv::push_image(
        &reg.base_url(),
        "ranges/x",
        "v1",
        std::slice::from_ref(&data),
    )
    .await;
    let counter = Front::start(FrontOpts {
        upstream: reg.base_url(),
        ..Default::default()
    })
    .await;
    let c = anon();
    let r = reference(&counter.host(), "ranges/x");
    let reader = c.blob_reader(
        &r,
        Digest::parse(&pushed.layer_digests[0]).expect("digest"),
        None,
    );
    assert_eq!(reader.size().await.expect("size"), data.len() as u64);
    let whole = reader.read_all().await.expect("whole");
    assert_eq!(&whole[..], &data[..]);

    let mut rng = 12345u64;
    let mut next = |m: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % m
    };
    for _ in 0..20 {
        let off = next(data.len() as u64);
        let len = next(200_000) + 1;
        let got = reader.read_at(off, len).await.expect("read_at");
        let end = (off + len).min(data.len() as u64) as usize;
        assert_eq!(&got[..], &whole[off as usize..end], "read_at({off}, {len})");
    }
    let ranges: Vec<std::ops::Range<u64>> = (0..64)
        .map(|_| {
            let s = next(data.len() as u64 - 70_000);
            s..s + 1 + next(65_536)
        })
        .collect();
    let got = reader.read_ranges(&ranges).await.expect("read_ranges");
    assert_eq!(got.len(), ranges.len());
    for (g, rg) in got.iter().zip(&ranges) {
        assert_eq!(
            &g[..],
            &whole[rg.start as usize..rg.end as usize],
            "range {rg:?}"
        );
    }
    assert!(
        counter.stats.multi_range_gets.load(Ordering::SeqCst) >= 1,
        "multi-range requests were used"
    );
    // Past-the-end and empty ranges are clamped, not errors.
    let got = reader
        .read_ranges(&[(data.len() as u64 - 3)..(data.len() as u64 + 100), 5..5])
        .await
        .expect("clamped");
    assert_eq!(&got[0][..], &data[data.len() - 3..]);
    assert!(got[1].is_empty());
}

#[tokio::test]
async fn tls_with_self_signed_ca() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts {
        tls: true,
        ..Default::default()
    }) else {
        return;
    };
    let ca = reg.tls.as_ref().expect("tls").ca_cert.clone();
    // Loopback hosts default to plain HTTP; `insecure = false` asks for HTTPS.
    let toml = format!(
        "[resolver.host.\"{}\"]\nca_file = {:?}\n[resolver.host.\"{}\".self]\ninsecure = false\n",
        reg.host(),
        ca.display().to_string(),
        reg.host()
    );
    let mut cfg = RegistryConfig::from_toml(&toml).expect("cfg");
    cfg.blob = fast_blob();
    let c = client_with(cfg, Arc::new(Anonymous));
    let r = reference(&reg.host(), "tls/x");
    let layer = random_bytes(100_000, 3);
    let (d, m) = push_simple(&c, &r, &layer).await;
    let got = c
        .get_manifest(&r.at_digest(d.clone()))
        .await
        .expect("manifest over TLS");
    assert_eq!(got.digest, d);
    assert_eq!(
        c.get_blob(&r, &m.layers[0].digest)
            .await
            .expect("blob over TLS"),
        Bytes::from(layer)
    );

    // Without the CA the certificate is untrusted: a clear TLS error, not a retry loop.
    let mut cfg = RegistryConfig {
        blob: fast_blob(),
        ..Default::default()
    };
    cfg.resolver.host.insert(
        reg.host(),
        registry::HostConfig {
            self_: Some(MirrorConfig {
                insecure: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let started = Instant::now();
    let e = client_with(cfg, Arc::new(Anonymous))
        .get_manifest(&r)
        .await
        .expect_err("untrusted");
    assert!(matches!(e, Error::Tls { .. }), "{e}");
    assert!(e.to_string().contains("TLS"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn htpasswd_basic_auth_over_tls() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts {
        tls: true,
        htpasswd: Some(("alice".into(), "wonder land".into())),
        ..Default::default()
    }) else {
        return;
    };
    let ca = reg.tls.as_ref().expect("tls").ca_cert.clone();
    let mut cfg = RegistryConfig {
        blob: fast_blob(),
        ..Default::default()
    };
    cfg.resolver.ca_file = Some(ca);
    cfg.resolver.host.insert(
        reg.host(),
        registry::HostConfig {
            self_: Some(MirrorConfig {
                insecure: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let r = reference(&reg.host(), "private/app");
    let good = StaticKeychain::new(
        Some(&reg.host()),
        Credential::Basic {
            username: "alice".into(),
            password: "wonder land".into(),
        },
    );
    let c = client_with(cfg.clone(), Arc::new(good));
    let layer = random_bytes(200_000, 4);
    let (d, m) = push_simple(&c, &r, &layer).await;
    let got = c.get_manifest(&r).await.expect("manifest with basic auth");
    assert_eq!(got.digest, d);
    let reader = c.blob_reader(&r, m.layers[0].digest.clone(), None);
    assert_eq!(
        reader.read_at(1000, 10).await.expect("range"),
        Bytes::copy_from_slice(&layer[1000..1010])
    );

    let bad = StaticKeychain::new(
        None,
        Credential::Basic {
            username: "alice".into(),
            password: "wrong-secret-xyz".into(),
        },
    );
    let e = client_with(cfg.clone(), Arc::new(bad))
        .get_manifest(&r)
        .await
        .expect_err("wrong password");
    assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("static credentials") && !msg.contains("wrong-secret-xyz"),
        "{msg}"
    );
    let e = client_with(cfg, Arc::new(Anonymous))
        .get_manifest(&r)
        .await
        .expect_err("anonymous");
    assert!(matches!(e, Error::NoCredentials { .. }), "{e}");
    assert!(e.to_string().contains("anonymous"), "{e}");
}

#[tokio::test]
async fn bearer_tokens_refresh_and_identity_tokens() {
    init_logs();
    if testenv::require_tool("docker-registry").is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    // First token is already expired for the registry: the client must refresh on 401.
    let issuer = TokenIssuer::start(
        dir.path(),
        IssuerOpts {
            user: Some(("bob".into(), "pw".into())),
            refresh_tokens: vec!["refresh-abc".into()],
            expires_in: 2,
            stale_first: 1,
            ..Default::default()
        },
    )
    .await;
    let Some(reg) = Registry::start(RegistryOpts {
        token: Some(issuer.registry_config()),
        ..Default::default()
    }) else {
        return;
    };
    let r = reference(&reg.host(), "tok/app");
    let cfg = RegistryConfig {
        blob: fast_blob(),
        ..Default::default()
    };
    let c = client_with(
        cfg.clone(),
        Arc::new(StaticKeychain::new(
            None,
            Credential::Basic {
                username: "bob".into(),
                password: "pw".into(),
            },
        )),
    );
    let layer = random_bytes(50_000, 5);
    let (d, _) = push_simple(&c, &r, &layer).await;
    assert!(issuer.tokens_issued() >= 2, "stale token was replaced");
    let got = c.get_manifest(&r).await.expect("pull with token");
    assert_eq!(got.digest, d);
    // Tokens live 2 s (minus a margin): after that a new one is fetched.
    let before = issuer.tokens_issued();
    c.get_manifest(&r).await.expect("cached token");
    assert_eq!(issuer.tokens_issued(), before, "token reused while valid");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    c.get_manifest(&r).await.expect("after expiry");
    assert_eq!(
        issuer.tokens_issued(),
        before + 1,
        "token refreshed after expiry"
    );

    // Identity token: OAuth2 POST with the refresh token.
    let ci = client_with(
        cfg.clone(),
        Arc::new(StaticKeychain::new(
            None,
            Credential::IdentityToken("refresh-abc".into()),
        )),
    );
    assert_eq!(
        ci.get_manifest(&r)
            .await
            .expect("identity token pull")
            .digest,
        d
    );

    // Wrong password and a bad identity token are 401 naming the source.
    let cw = client_with(
        cfg.clone(),
        Arc::new(StaticKeychain::new(
            None,
            Credential::Basic {
                username: "bob".into(),
                password: "nope".into(),
            },
        )),
    );
    let e = cw.get_manifest(&r).await.expect_err("bad password");
    assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
    let e = client_with(
        cfg,
        Arc::new(StaticKeychain::new(
            None,
            Credential::IdentityToken("bad".into()),
        )),
    )
    .get_manifest(&r)
    .await
    .expect_err("bad refresh");
    assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
}

#[tokio::test]
async fn redirects_never_carry_credentials_and_expire() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let data = random_bytes(1 << 20, 9);
    let pushed = testenv::push_image(
        &reg.base_url(),
        "redir/x",
        "v1",
        std::slice::from_ref(&data),
    )
    .await;
    let target = Front::start(FrontOpts {
        upstream: reg.base_url(),
        target_uses_per_sig: Some(2),
        ..Default::default()
    })
    .await;
    let front = Front::start(FrontOpts {
        upstream: reg.base_url(),
        require_basic: Some(("carol".into(), "secret".into())),
        redirect_blobs_to: Some(target.url()),
        ..Default::default()
    })
    .await;
    let k = StaticKeychain::new(
        Some(&front.host()),
        Credential::Basic {
            username: "carol".into(),
            password: "secret".into(),
        },
    );
    let c = client_with(
        RegistryConfig {
            blob: fast_blob(),
            ..Default::default()
        },
        Arc::new(k),
    );
    let r = reference(&front.host(), "redir/x");
    let reader = c.blob_reader(
        &r,
        Digest::parse(&pushed.layer_digests[0]).expect("d"),
        None,
    );
    for i in 0..7u64 {
        let off = i * 100_000;
        assert_eq!(
            &reader.read_at(off, 5000).await.expect("read via redirect")[..],
            &data[off as usize..off as usize + 5000]
        );
    }
    let whole = reader.read_all().await.expect("whole via redirect");
    assert_eq!(&whole[..], &data[..]);
    assert!(
        FrontStats::get(&front.stats.with_authorization) > 0,
        "the registry front got credentials"
    );
    assert_eq!(
        FrontStats::get(&target.stats.with_authorization),
        0,
        "credentials leaked to the redirect target"
    );
    assert!(
        FrontStats::get(&target.stats.forbidden) >= 1,
        "target expired at least once"
    );
    // 8 reads at 2 uses per redirect: the registry was asked again after each expiry.
    assert!(
        FrontStats::get(&front.stats.redirects) >= 4,
        "redirects: {}",
        FrontStats::get(&front.stats.redirects)
    );
}

use testenv::FrontStats;

async fn front_reader(
    reg: &Registry,
    opts: FrontOpts,
    blob: BlobConfig,
    size: usize,
    seed: u64,
) -> (Front, registry::BlobReader, Vec<u8>) {
    let data = random_bytes(size, seed);
    let repo = format!("front/s{seed}");
    let pushed =
        testenv::push_image(&reg.base_url(), &repo, "v1", std::slice::from_ref(&data)).await;
    let front = Front::start(FrontOpts {
        upstream: reg.base_url(),
        ..opts
    })
    .await;
    let c = client_with(
        RegistryConfig {
            blob,
            ..Default::default()
        },
        Arc::new(Anonymous),
    );
    let r = reference(&front.host(), &repo);
    let reader = c.blob_reader(
        &r,
        Digest::parse(&pushed.layer_digests[0]).expect("d"),
        None,
    );
    (front, reader, data)
}

#[tokio::test]
async fn head_refused_falls_back_to_range_probe() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let (front, reader, data) = front_reader(
        &reg,
        FrontOpts {
            refuse_head: true,
            ..Default::default()
        },
        fast_blob(),
        200_000,
        11,
    )
    .await;
    assert_eq!(
        reader.size().await.expect("size via range"),
        data.len() as u64
    );
    assert!(FrontStats::get(&front.stats.head_refused) >= 1);
    assert_eq!(
        &reader.read_at(10, 10).await.expect("read")[..],
        &data[10..20]
    );
}

/// Blob requests (method, range) a front answered, in order.
fn blob_requests(front: &Front) -> Vec<(String, Option<String>)> {
    front
        .stats
        .log
        .lock()
        .expect("log")
        .iter()
        .filter(|l| l.path.contains("/blobs/sha256:"))
        .map(|l| (l.method.clone(), l.range.clone()))
        .collect()
}

/// Finding where a blob is and its size takes one request: a HEAD at the registry
/// itself (its Content-Length is the size), a one-byte ranged GET at a mirror (which
/// also tells whether the mirror honours Range). A mirror that ignores Range is not
/// asked again.
#[tokio::test]
async fn a_blob_is_located_in_one_request() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let data = random_bytes(300_000, 41);
    let repo = "locate/x";
    let pushed =
        testenv::push_image(&reg.base_url(), repo, "v1", std::slice::from_ref(&data)).await;
    let digest = Digest::parse(&pushed.layer_digests[0]).expect("digest");
    let front = |opts: FrontOpts| {
        Front::start(FrontOpts {
            upstream: reg.base_url(),
            ..opts
        })
    };

    // The registry alone.
    let own = front(FrontOpts::default()).await;
    let c = client_with(
        RegistryConfig {
            blob: fast_blob(),
            ..Default::default()
        },
        Arc::new(Anonymous),
    );
    let r = reference(&own.host(), repo);
    let reader = c.blob_reader(&r, digest.clone(), None);
    assert_eq!(reader.size().await.expect("size"), data.len() as u64);
    assert_eq!(blob_requests(&own), vec![("HEAD".to_string(), None)]);

    // A mirror in front of it, honouring Range, then one that ignores it.
    for (ignore_range, seed) in [(false, 42u64), (true, 43)] {
        let mirror = front(FrontOpts {
            ignore_range,
            ..Default::default()
        })
        .await;
        let own = front(FrontOpts::default()).await;
        let c = with_mirror(&own.host(), &mirror.host());
        let r = reference(&own.host(), repo);
        for _ in 0..2 {
            let reader = c.blob_reader(&r, digest.clone(), None);
            assert_eq!(reader.size().await.expect("size"), data.len() as u64);
            let at = (seed * 1000) as usize;
            assert_eq!(
                &reader.read_at(at as u64, 100).await.expect("read")[..],
                &data[at..at + 100]
            );
        }
        let probe = ("GET".to_string(), Some("bytes=0-0".to_string()));
        if ignore_range {
            assert_eq!(
                blob_requests(&mirror),
                vec![probe],
                "asked once, then skipped"
            );
            let at_registry = blob_requests(&own);
            assert_eq!(
                at_registry.iter().filter(|(m, _)| m == "HEAD").count(),
                2,
                "{at_registry:?}"
            );
            assert_eq!(
                at_registry.len(),
                4,
                "a HEAD and a read each: {at_registry:?}"
            );
        } else {
            let at_mirror = blob_requests(&mirror);
            assert_eq!(at_mirror.len(), 4, "a probe and a read each: {at_mirror:?}");
            assert_eq!(at_mirror[0], probe);
            assert_eq!(at_mirror[2], probe);
            assert!(blob_requests(&own).is_empty());
        }
    }
}

#[tokio::test]
async fn multi_range_rejected_falls_back_to_single_ranges() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let (front, reader, data) = front_reader(
        &reg,
        FrontOpts {
            reject_multi_range: true,
            ..Default::default()
        },
        fast_blob(),
        1 << 20,
        12,
    )
    .await;
    let ranges: Vec<_> = (0..10u64)
        .map(|i| i * 100_000..i * 100_000 + 1000)
        .collect();
    for _ in 0..2 {
        let got = reader.read_ranges(&ranges).await.expect("ranges");
        for (g, rg) in got.iter().zip(&ranges) {
            assert_eq!(&g[..], &data[rg.start as usize..rg.end as usize]);
        }
    }
    assert_eq!(
        FrontStats::get(&front.stats.multi_rejected),
        1,
        "host remembered as single-range only"
    );
}

#[tokio::test]
async fn range_ignored_whole_body_copes() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let (_front, reader, data) = front_reader(
        &reg,
        FrontOpts {
            ignore_range: true,
            ..Default::default()
        },
        fast_blob(),
        300_000,
        13,
    )
    .await;
    let got = reader
        .read_ranges(&[100..200, 250_000..250_100])
        .await
        .expect("ranges");
    assert_eq!(&got[0][..], &data[100..200]);
    assert_eq!(&got[1][..], &data[250_000..250_100]);
    assert_eq!(
        &reader.read_at(5, 5).await.expect("single")[..],
        &data[5..10]
    );
}

#[tokio::test]
async fn body_cut_mid_way_is_retried() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let (front, reader, data) = front_reader(
        &reg,
        FrontOpts {
            drop_mid_body: 2,
            ..Default::default()
        },
        fast_blob(),
        500_000,
        14,
    )
    .await;
    assert_eq!(
        &reader.read_at(1000, 100_000).await.expect("read after cut")[..],
        &data[1000..101_000]
    );
    assert_eq!(
        &reader.read_all().await.expect("whole after cut")[..],
        &data[..]
    );
    assert_eq!(FrontStats::get(&front.stats.dropped), 2);
}

#[tokio::test]
async fn service_unavailable_twice_then_ok() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let (front, reader, data) = front_reader(
        &reg,
        FrontOpts {
            fail_503: 2,
            ..Default::default()
        },
        fast_blob(),
        100_000,
        15,
    )
    .await;
    let started = Instant::now();
    assert_eq!(
        &reader.read_at(0, 10).await.expect("read after 503s")[..],
        &data[..10]
    );
    assert_eq!(FrontStats::get(&front.stats.failed_503), 2);
    // Retry-After: 1 was honoured.
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn server_that_never_answers_times_out() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let front = Front::start(FrontOpts {
        upstream: reg.base_url(),
        never_answer: true,
        ..Default::default()
    })
    .await;
    let mut cfg = RegistryConfig {
        blob: BlobConfig {
            max_retries: 1,
            min_wait_msec: 10,
            max_wait_msec: 50,
            fetching_timeout_sec: 3,
            read_idle_timeout_sec: 1,
            ..BlobConfig::default()
        },
        ..Default::default()
    };
    cfg.resolver.host.insert(
        front.host(),
        registry::HostConfig {
            self_: Some(MirrorConfig {
                request_timeout_sec: 1,
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let c = client_with(cfg, Arc::new(Anonymous));
    let r = reference(&front.host(), "slow/x");
    let started = Instant::now();
    let e = c
        .blob_reader(&r, Digest::sha256(b"x"), Some(100))
        .read_at(0, 10)
        .await
        .expect_err("must time out");
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    let e = c
        .get_manifest(&r)
        .await
        .expect_err("manifest must time out");
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
}

#[tokio::test]
async fn connection_refused_is_reported() {
    let port = testenv::free_port();
    let c = client_with(
        RegistryConfig {
            blob: BlobConfig {
                max_retries: 1,
                min_wait_msec: 5,
                max_wait_msec: 10,
                ..BlobConfig::default()
            },
            ..Default::default()
        },
        Arc::new(Anonymous),
    );
    let e = c
        .get_manifest(&reference(&format!("127.0.0.1:{port}"), "x"))
        .await
        .expect_err("refused");
    assert!(matches!(e, Error::ConnectionRefused { .. }), "{e}");
}

/// Collects a streamed range the way a consumer must: by offset, so bytes repeated by a
/// retried attempt land where they belong. Returns the bytes and the number of pieces.
async fn stream_range(
    reader: &registry::BlobReader,
    range: std::ops::Range<u64>,
) -> (Vec<u8>, usize) {
    let len = (range.end - range.start) as usize;
    let got = Arc::new(std::sync::Mutex::new((vec![0u8; len], 0usize)));
    let start = range.start;
    let sink_state = got.clone();
    reader
        .read_range_streaming(
            range,
            Arc::new(move |off: u64, piece: bytes::Bytes| {
                let mut g = sink_state.lock().expect("lock");
                let at = (off - start) as usize;
                g.0[at..at + piece.len()].copy_from_slice(&piece);
                g.1 += 1;
            }),
        )
        .await
        .expect("streamed read");
    let g = got.lock().expect("lock");
    (g.0.clone(), g.1)
}

/// Several ranges asked for at once come back in blob order, neighbours merged with
/// their gap, far ones as separate pieces; every byte asked for is there.
#[tokio::test]
async fn several_ranges_stream_merged_and_in_order() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let (_plain, reader, data) =
        front_reader(&reg, FrontOpts::default(), fast_blob(), 2 << 20, 19).await;
    let cases: [&[std::ops::Range<u64>]; 2] = [
        &[10..100, 150..300],
        &[
            10..100,
            150..300,
            1_000_000..1_000_500,
            1_500_000..1_600_000,
        ],
    ];
    for wanted in cases {
        let (pieces, _) = stream_ranges_timed(&reader, wanted).await;
        assert_pieces(&pieces, wanted, &data);
        // The first two ranges lie 50 bytes apart: they are fetched as one, gap included.
        let gap_sent = (100..150u64).all(|o| {
            pieces
                .iter()
                .any(|(_, off, p)| *off <= o && o < off + p.len() as u64)
        });
        assert!(gap_sent, "the gap between merged ranges was not sent");
    }
}

/// Streams `wanted` and returns each piece with when it came, and when the read ended.
async fn stream_ranges_timed(
    reader: &registry::BlobReader,
    wanted: &[std::ops::Range<u64>],
) -> (
    Vec<(std::time::Instant, u64, bytes::Bytes)>,
    std::time::Instant,
) {
    let pieces = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = pieces.clone();
    reader
        .read_ranges_streaming(
            wanted,
            Arc::new(move |off: u64, piece: bytes::Bytes| {
                sink.lock()
                    .expect("lock")
                    .push((std::time::Instant::now(), off, piece));
            }),
        )
        .await
        .expect("streamed ranges");
    let ended = std::time::Instant::now();
    let pieces = pieces.lock().expect("lock").clone();
    (pieces, ended)
}

/// Checks that every piece holds the blob's bytes, that pieces come in blob order, and
/// that every range asked for is covered.
fn assert_pieces(
    pieces: &[(std::time::Instant, u64, bytes::Bytes)],
    wanted: &[std::ops::Range<u64>],
    data: &[u8],
) {
    assert!(
        pieces.windows(2).all(|w| w[0].1 <= w[1].1),
        "pieces out of order"
    );
    for (_, off, piece) in pieces {
        let at = *off as usize;
        assert_eq!(&piece[..], &data[at..at + piece.len()], "piece at {off}");
    }
    for r in wanted {
        let covered = pieces.iter().any(|(_, off, p)| {
            // A range may arrive in several pieces: every byte must be in one.
            *off <= r.start && r.start < off + p.len() as u64
        }) && (r.start..r.end).step_by(997).all(|o| {
            pieces
                .iter()
                .any(|(_, off, p)| *off <= o && o < off + p.len() as u64)
        });
        assert!(covered, "{r:?} is missing");
    }
}

/// A multi-range reply is handed on part by part as it arrives: with the registry's
/// front holding the rest of the reply back after its first part, the first range's
/// bytes are there long before the read ends. With more ranges than one request takes,
/// the requests' bytes still come in blob order; a host that refuses multi-range
/// requests or cuts a reply gets the same bytes.
#[tokio::test]
async fn multi_range_replies_are_handed_on_as_they_arrive() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let pause = std::time::Duration::from_millis(1500);
    let (_front, reader, data) = front_reader(
        &reg,
        FrontOpts {
            multipart_pause_ms: pause.as_millis() as u64,
            ..Default::default()
        },
        fast_blob(),
        2 << 20,
        31,
    )
    .await;
    let wanted: Vec<std::ops::Range<u64>> = (0..4u64)
        .map(|i| i * 500_000 + 10..i * 500_000 + 20_000)
        .collect();
    let (pieces, ended) = stream_ranges_timed(&reader, &wanted).await;
    assert_pieces(&pieces, &wanted, &data);
    let first = pieces.first().expect("pieces").0;
    assert!(
        ended.duration_since(first) >= pause.mul_f64(0.8),
        "the first range was handed on only {:?} before the read ended",
        ended.duration_since(first)
    );

    // Many ranges: several multi-range requests, one after the other in blob order.
    let many: Vec<std::ops::Range<u64>> = (0..300u64)
        .map(|i| i * 6_000 + 7..i * 6_000 + 1_500 + (i % 7) * 100)
        .collect();
    let unmerged = BlobConfig {
        coalesce_gap_bytes: 0,
        ..fast_blob()
    };
    let (front, reader, data) =
        front_reader(&reg, FrontOpts::default(), unmerged, 2 << 20, 32).await;
    let (pieces, _) = stream_ranges_timed(&reader, &many).await;
    assert_pieces(&pieces, &many, &data);
    assert!(
        FrontStats::get(&front.stats.multi_range_gets) >= 2,
        "300 ranges went out in {} multi-range request(s)",
        FrontStats::get(&front.stats.multi_range_gets)
    );

    for (opts, seed) in [
        (
            FrontOpts {
                reject_multi_range: true,
                ..Default::default()
            },
            33,
        ),
        (
            FrontOpts {
                drop_mid_body: 1,
                ..Default::default()
            },
            34,
        ),
        (
            FrontOpts {
                ignore_range: true,
                ..Default::default()
            },
            35,
        ),
    ] {
        let unmerged = BlobConfig {
            coalesce_gap_bytes: 0,
            ..fast_blob()
        };
        let (_front, reader, data) = front_reader(&reg, opts, unmerged, 1 << 20, seed).await;
        let some: Vec<std::ops::Range<u64>> = (0..20u64)
            .map(|i| i * 50_000 + 3..i * 50_000 + 9_000)
            .collect();
        for _ in 0..2 {
            let (pieces, _) = stream_ranges_timed(&reader, &some).await;
            assert_pieces(&pieces, &some, &data);
        }
    }
}

#[tokio::test]
async fn streamed_range_arrives_in_pieces_and_survives_a_cut() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let (_plain, reader, data) =
        front_reader(&reg, FrontOpts::default(), fast_blob(), 3 << 20, 16).await;
    let (got, pieces) = stream_range(&reader, 1000..(3 << 20) - 7).await;
    assert_eq!(&got[..], &data[1000..(3 << 20) - 7]);
    assert!(pieces > 1, "a 3 MiB range came in {pieces} piece(s)");

    // A front that cuts the body once (the attempt is retried), one that ignores Range.
    let cases = [
        (
            FrontOpts {
                drop_mid_body: 1,
                ..Default::default()
            },
            500_000,
            17,
            10..400_000,
        ),
        (
            FrontOpts {
                ignore_range: true,
                ..Default::default()
            },
            300_000,
            18,
            250_000..250_100,
        ),
    ];
    for (opts, size, seed, range) in cases {
        let cuts = opts.drop_mid_body;
        let (front, reader, data) = front_reader(&reg, opts, fast_blob(), size, seed).await;
        let (got, _) = stream_range(&reader, range.clone()).await;
        assert_eq!(&got[..], &data[range.start as usize..range.end as usize]);
        assert_eq!(FrontStats::get(&front.stats.dropped), cuts);
    }
}

/// A manifest that may not exist: a 404 is `None` and no counted error; one that exists
/// comes back verified, as `get_manifest` gives it.
#[tokio::test]
async fn optional_manifest_lookup() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let metrics = registry::RegistryMetrics::default();
    let c = Client::with_metrics(
        RegistryConfig {
            blob: fast_blob(),
            ..Default::default()
        },
        Arc::new(Anonymous),
        metrics.clone(),
    )
    .expect("client");
    let r = reference(&reg.host(), "app/optional");
    let (digest, _) = push_simple(&c, &r, b"layer").await;
    let missing = r.at_tag("sha256-0000.sgz-prefetch").unwrap();
    assert!(c.get_manifest_if_exists(&missing).await.unwrap().is_none());
    assert_eq!(metrics.errors("manifest"), 0);
    assert!(matches!(
        c.get_manifest(&missing).await,
        Err(Error::ManifestNotFound { .. })
    ));
    assert_eq!(metrics.errors("manifest"), 1);
    let found = c.get_manifest_if_exists(&r).await.unwrap().expect("exists");
    assert_eq!(found.digest, digest);
}

/// A suffix read (`Range: bytes=-N`) is a blob's first and only request: the reply
/// carries the tail and tells the size, which later reads use without a HEAD. Asked
/// for more than the blob holds, it gives the whole blob; a registry that ignores
/// Range gives a clear error for a large blob (its body is not read) and the whole
/// blob for a small one.
#[tokio::test]
async fn a_suffix_read_needs_no_size_and_tells_it() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let data = random_bytes(300_000, 51);
    let small = random_bytes(2_000, 52);
    let repo = "suffix/x";
    let pushed =
        testenv::push_image(&reg.base_url(), repo, "v1", &[data.clone(), small.clone()]).await;
    let digest = Digest::parse(&pushed.layer_digests[0]).expect("digest");
    let small_digest = Digest::parse(&pushed.layer_digests[1]).expect("digest");
    let front = Front::start(FrontOpts {
        upstream: reg.base_url(),
        ..Default::default()
    })
    .await;
    let c = anon();
    let r = reference(&front.host(), repo);
    let reader = c.blob_reader(&r, digest.clone(), None);
    let (size, tail) = reader.read_suffix(1_000).await.expect("suffix");
    assert_eq!(size, data.len() as u64);
    assert_eq!(&tail[..], &data[data.len() - 1_000..]);
    assert_eq!(reader.size().await.expect("size"), data.len() as u64);
    assert_eq!(
        &reader.read_at(10, 20).await.expect("read")[..],
        &data[10..30]
    );
    assert_eq!(
        blob_requests(&front),
        vec![
            ("GET".to_string(), Some("bytes=-1000".to_string())),
            ("GET".to_string(), Some("bytes=10-29".to_string())),
        ],
        "no HEAD: the suffix reply told the size"
    );
    let (size, all) = c
        .blob_reader(&r, small_digest.clone(), None)
        .read_suffix(1 << 20)
        .await
        .expect("suffix longer than the blob");
    assert_eq!((size, &all[..]), (small.len() as u64, &small[..]));
    // A size known beforehand that the reply contradicts is an error.
    let wrong = c.blob_reader(&r, digest.clone(), Some(data.len() as u64 + 1));
    assert!(wrong.read_suffix(1_000).await.is_err());

    // The registry configured as a mirror of itself (how a plain-HTTP registry is
    // set up) is asked as the registry: no one-byte probe first.
    let own = Front::start(FrontOpts {
        upstream: reg.base_url(),
        ..Default::default()
    })
    .await;
    let c = with_mirror(&own.host(), &own.host());
    let r = reference(&own.host(), repo);
    let (size, _) = c
        .blob_reader(&r, digest.clone(), None)
        .read_suffix(1_000)
        .await
        .expect("suffix at the registry as its own mirror");
    assert_eq!(size, data.len() as u64);
    assert_eq!(
        blob_requests(&own),
        vec![("GET".to_string(), Some("bytes=-1000".to_string()))]
    );

    let ignoring = Front::start(FrontOpts {
        upstream: reg.base_url(),
        ignore_range: true,
        ..Default::default()
    })
    .await;
    let c = anon();
    let r = reference(&ignoring.host(), repo);
    let err = c
        .blob_reader(&r, digest.clone(), None)
        .read_suffix(1_000)
        .await
        .expect_err("a whole large blob is no tail");
    assert!(err.to_string().contains("whole blob"), "{err}");
    let (size, all) = c
        .blob_reader(&r, small_digest, None)
        .read_suffix(1 << 20)
        .await
        .expect("a small blob sent whole");
    assert_eq!((size, &all[..]), (small.len() as u64, &small[..]));
}

/// Callers that need a blob's size at once (an early probe and a layer's first read)
/// share one `HEAD`; a size told beforehand (from the manifest) needs none.
#[tokio::test]
async fn concurrent_size_lookups_share_one_head() {
    init_logs();
    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let data = random_bytes(50_000, 61);
    let pushed =
        testenv::push_image(&reg.base_url(), "size/x", "v1", std::slice::from_ref(&data)).await;
    let digest = Digest::parse(&pushed.layer_digests[0]).expect("digest");
    let front = Front::start(FrontOpts {
        upstream: reg.base_url(),
        ..Default::default()
    })
    .await;
    let c = anon();
    let r = reference(&front.host(), "size/x");
    let reader = c.blob_reader(&r, digest.clone(), None);
    let (a, b, read) = tokio::join!(reader.size(), reader.size(), reader.read_at(0, 10));
    assert_eq!(a.expect("size"), data.len() as u64);
    assert_eq!(b.expect("size"), data.len() as u64);
    assert_eq!(&read.expect("read")[..], &data[..10]);
    let told = c.blob_reader(&r, digest, None);
    told.know_size(data.len() as u64);
    assert_eq!(&told.read_at(5, 5).await.expect("read")[..], &data[5..10]);
    assert_eq!(
        blob_requests(&front),
        vec![
            ("HEAD".to_string(), None),
            ("GET".to_string(), Some("bytes=0-9".to_string())),
            ("GET".to_string(), Some("bytes=5-9".to_string())),
        ]
    );
}
