//! Kubernetes-facing credential sources and containerd's hosts directory,
//! against a real registry: the kubeconfig keychain (list/watch of secrets on
//! a fake API server), kubelet credential provider plugins, credentials captured
//! from CRI pulls, the next source's credentials after a refusal, and mirrors
//! from `hosts.toml`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use registry::{
    BlobConfig, ChainKeychain, Client, Credential, CredentialProviderKeychain,
    CredentialProviderOptions, CriKeychain, CriKeychainOptions, Digest, Error, Keychain,
    KubeconfigKeychain, KubeconfigKeychainOptions, Reference, RegistryConfig, StaticKeychain,
};
use testenv::{
    push_image, random_bytes, FakeKubeApi, Front, FrontOpts, IssuerOpts, Registry, RegistryOpts,
    TokenIssuer, DOCKERCONFIGJSON,
};

fn fast_blob() -> BlobConfig {
    BlobConfig {
        max_retries: 2,
        min_wait_msec: 10,
        max_wait_msec: 100,
        fetching_timeout_sec: 30,
        ..BlobConfig::default()
    }
}

fn client(k: Arc<dyn Keychain>) -> Client {
    Client::new(
        RegistryConfig {
            blob: fast_blob(),
            ..Default::default()
        },
        k,
    )
    .expect("client")
}

/// Pushes a small image with the given credentials; returns its reference.
async fn push_private(reg: &Registry, user: &str, pass: &str) -> Reference {
    let r = Reference::parse(&format!("{}/private/app:1", reg.host())).expect("ref");
    let c = client(Arc::new(StaticKeychain::new(
        None,
        Credential::Basic {
            username: user.into(),
            password: pass.into(),
        },
    )));
    let config = Bytes::from_static(
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    );
    let layer = Bytes::from(random_bytes(4096, 9));
    c.push_blob(&r, config.clone(), &Default::default())
        .await
        .expect("push config");
    c.push_blob(&r, layer.clone(), &Default::default())
        .await
        .expect("push layer");
    let m = registry::ImageManifest {
        schema_version: 2,
        media_type: Some(registry::OCI_MANIFEST.into()),
        config: registry::Descriptor::for_bytes(registry::OCI_CONFIG, &config),
        layers: vec![registry::Descriptor::for_bytes(
            registry::OCI_LAYER_GZIP,
            &layer,
        )],
        annotations: None,
        subject: None,
        artifact_type: None,
    };
    c.push_manifest_json(&r, registry::OCI_MANIFEST, &m)
        .await
        .expect("push manifest");
    r
}

/// Polls `f` until it is true or 10 s pass.
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn password_for(k: &KubeconfigKeychain, host: &str) -> Option<String> {
    match k.resolve(host).await.expect("resolve") {
        Some(Credential::Basic { password, .. }) => Some(password),
        _ => None,
    }
}

#[tokio::test]
async fn kubeconfig_keychain_follows_secrets_through_watch_and_410() {
    let Some(reg) = Registry::start(RegistryOpts {
        htpasswd: Some(("alice".into(), "kube-pw-1".into())),
        ..Default::default()
    }) else {
        return;
    };
    let host = reg.host();
    let r = push_private(&reg, "alice", "kube-pw-1").await;
    let api = FakeKubeApi::start("api-token-123").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kube/config");
    let keychain = Arc::new(KubeconfigKeychain::start(KubeconfigKeychainOptions {
        kubeconfig_path: Some(kubeconfig.clone()),
        poll_interval: Duration::from_millis(50),
        retry_wait: Duration::from_millis(50),
        ..Default::default()
    }));
    let k: Arc<dyn Keychain> = keychain.clone();

    // No kubeconfig yet: the keychain waits and resolves nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(api.lists(), 0);
    let e = client(k.clone())
        .get_manifest(&r)
        .await
        .expect_err("no creds yet");
    assert!(matches!(e, Error::NoCredentials { .. }), "{e}");

    std::fs::create_dir_all(kubeconfig.parent().expect("parent")).expect("mkdir");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
    assert!(
        keychain.wait_for_lists(1, Duration::from_secs(10)).await,
        "first list"
    );
    assert_eq!(api.unauthorized(), 0, "the kubeconfig token is sent");

    // Added after the keychain started: only the watch can bring it.
    api.put_secret(
        "default",
        "opaque",
        "Opaque",
        &[("password", b"not-a-registry")],
    );
    api.put_docker_secret(
        "team-a",
        "regcred",
        &FakeKubeApi::docker_config_json(&host, "alice", "kube-pw-1"),
    );
    eventually("secret via watch", async || {
        password_for(&keychain, &host).await.is_some()
    })
    .await;
    assert_eq!(
        api.lists(),
        1,
        "the secret came through the watch, not a relist"
    );
    assert_eq!(keychain.secret_names(), ["team-a/regcred"]);
    let got = client(k.clone())
        .get_manifest(&r)
        .await
        .expect("pull with secret");
    assert!(!got.bytes.is_empty());
    let dbg = format!("{keychain:?}");
    assert!(
        !dbg.contains("kube-pw-1") && !dbg.contains("api-token-123"),
        "{dbg}"
    );

    // Modified: the new (wrong) password is used.
    api.put_docker_secret(
        "team-a",
        "regcred",
        &FakeKubeApi::docker_config_json(&host, "alice", "rotated-wrong"),
    );
    eventually("modified secret", async || {
        password_for(&keychain, &host).await.as_deref() == Some("rotated-wrong")
    })
    .await;
    let e = client(k.clone())
        .get_manifest(&r)
        .await
        .expect_err("wrong password");
    assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
    assert!(e.to_string().contains("kubernetes secrets"), "{e}");

    // Deleted: back to anonymous.
    assert!(api.delete_secret("team-a", "regcred"));
    eventually("deleted secret", async || {
        password_for(&keychain, &host).await.is_none()
    })
    .await;
    assert!(client(k.clone()).get_manifest(&r).await.is_err());

    // History compacted: the resumed watch gets 410 Gone and the keychain lists again.
    api.compact();
    api.put_docker_secret(
        "team-b",
        "pull",
        &FakeKubeApi::docker_config_json(&format!("http://{host}/v1/"), "alice", "kube-pw-1"),
    );
    assert!(
        keychain.wait_for_lists(2, Duration::from_secs(10)).await,
        "relist after 410"
    );
    assert!(api.gone() >= 1, "the stale watch was answered 410");
    eventually("secret after relist", async || {
        password_for(&keychain, &host).await.as_deref() == Some("kube-pw-1")
    })
    .await;
    client(k.clone())
        .get_manifest(&r)
        .await
        .expect("pull after 410");
    // And the watch works again after the relist.
    api.put_docker_secret(
        "team-b",
        "pull",
        &FakeKubeApi::docker_config_json(&host, "alice", "after-relist"),
    );
    eventually("watch after relist", async || {
        password_for(&keychain, &host).await.as_deref() == Some("after-relist")
    })
    .await;
    assert_eq!(keychain.lists_completed(), 2);
    let _ = DOCKERCONFIGJSON;
}

#[tokio::test]
async fn kubeconfig_keychain_with_a_wrong_token_resolves_nothing() {
    let api = FakeKubeApi::start("right-token").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config");
    std::fs::write(
        &path,
        api.kubeconfig().replace("right-token", "wrong-token"),
    )
    .expect("write");
    api.put_docker_secret(
        "ns",
        "s",
        &FakeKubeApi::docker_config_json("reg.example", "u", "p"),
    );
    let keychain = KubeconfigKeychain::start(KubeconfigKeychainOptions {
        kubeconfig_path: Some(path),
        poll_interval: Duration::from_millis(50),
        retry_wait: Duration::from_millis(50),
        ..Default::default()
    });
    eventually("refused requests", async || api.unauthorized() >= 2).await;
    assert_eq!(keychain.lists_completed(), 0);
    assert_eq!(
        keychain.resolve("reg.example").await.expect("resolve"),
        None
    );
}

fn write_exec(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let mut f = std::fs::File::create(path).expect("create plugin");
    f.write_all(body.as_bytes()).expect("write plugin");
    drop(f);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[tokio::test]
async fn credential_provider_plugin_supplies_caches_and_times_out() {
    let Some(reg) = Registry::start(RegistryOpts {
        htpasswd: Some(("bob".into(), "plugin-pw".into())),
        ..Default::default()
    }) else {
        return;
    };
    let host = reg.host();
    let r = push_private(&reg, "bob", "plugin-pw").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let runs = dir.path().join("runs");
    let last_request = dir.path().join("request.json");
    let hang = dir.path().join("hang");
    write_exec(
        &bin.join("test-provider"),
        &format!(
            r#"#!/bin/sh
echo run >> "$RUNS_FILE"
cat > "{req}"
grep -q '"kind":"CredentialProviderRequest"' "{req}" || exit 3
if [ -e "{hang}" ]; then exec sleep 30; fi
cat <<EOF
{{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Registry","cacheDuration":"1500ms","auth":{{"{host}":{{"username":"bob","password":"plugin-pw"}},"*.never.example":{{"username":"x","password":"y"}}}}}}
EOF
"#,
            req = last_request.display(),
            hang = hang.display(),
        ),
    );
    let config = dir.path().join("credential-provider-config.yaml");
    std::fs::write(
        &config,
        format!(
            r#"apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: test-provider
    matchImages:
      - "{host}"
      - "*.dkr.ecr.*.amazonaws.com"
    defaultCacheDuration: "10m"
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    env:
      - name: RUNS_FILE
        value: {runs}
"#,
            runs = runs.display()
        ),
    )
    .expect("config");
    let run_count = || {
        std::fs::read_to_string(&runs)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let mut opts = CredentialProviderOptions::new(&config, &bin);
    opts.exec_timeout = Duration::from_secs(10);
    let keychain = Arc::new(CredentialProviderKeychain::new(opts.clone()).expect("keychain"));
    let k: Arc<dyn Keychain> = keychain.clone();

    client(k.clone())
        .get_manifest(&r)
        .await
        .expect("pull with plugin credentials");
    client(k.clone()).get_manifest(&r).await.expect("again");
    assert_eq!(run_count(), 1, "the Registry-keyed answer is cached");
    assert_eq!(keychain.plugin_runs("test-provider"), 1);
    let req: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&last_request).expect("request")).expect("json");
    assert_eq!(req["apiVersion"], "credentialprovider.kubelet.k8s.io/v1");
    // The client asks with the image being pulled, as kubelet does.
    assert_eq!(req["image"], format!("{host}/private/app"));

    // Image-aware lookups send the full image; the registry-wide cache still answers.
    let c = keychain
        .resolve_image(&host, "private/app")
        .await
        .expect("resolve_image");
    assert!(matches!(c, Some(Credential::Basic { ref username, .. }) if username == "bob"));
    assert_eq!(run_count(), 1);

    // Past cacheDuration the plugin runs again.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let c = keychain
        .resolve_image(&host, "private/app")
        .await
        .expect("after expiry");
    assert!(c.is_some());
    assert_eq!(run_count(), 2, "cache expired after cacheDuration");
    let req: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&last_request).expect("request")).expect("json");
    assert_eq!(req["image"], format!("{host}/private/app"));

    // Images no provider matches never run a plugin.
    assert_eq!(
        keychain.resolve("other.example").await.expect("other"),
        None
    );
    assert_eq!(run_count(), 2);

    // A hanging plugin is killed at the timeout and reported.
    std::fs::write(&hang, b"1").expect("hang flag");
    opts.exec_timeout = Duration::from_millis(500);
    let hanging = CredentialProviderKeychain::new(opts).expect("keychain");
    let start = Instant::now();
    let e = hanging
        .credential_for_image(&host)
        .await
        .expect_err("timeout");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(e.to_string().contains("timed out"), "{e}");
    assert!(!e.to_string().contains("plugin-pw"), "{e}");
}

/// Captures log output of the current thread.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

fn hosts_dir_for(dir: &Path, name: &str, toml: &str) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).expect("mkdir");
    std::fs::write(d.join("hosts.toml"), toml).expect("hosts.toml");
}

#[tokio::test]
async fn hosts_dir_mirror_serves_blobs_and_range_ignoring_mirror_is_skipped() {
    let logs = Logs::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let layer = random_bytes(300_000, 21);
    let pushed = push_image(
        &reg.base_url(),
        "lib/app",
        "1",
        std::slice::from_ref(&layer),
    )
    .await;
    // The registry is reached through a counting front so direct reads show up.
    let upstream = Front::start(FrontOpts {
        upstream: reg.base_url(),
        ..Default::default()
    })
    .await;
    let mirror = Front::start(FrontOpts {
        upstream: reg.base_url(),
        ..Default::default()
    })
    .await;
    let up_port = upstream
        .host()
        .rsplit_once(':')
        .map(|(_, p)| p.to_string())
        .expect("port");
    let dir = tempfile::tempdir().expect("tempdir");
    hosts_dir_for(
        dir.path(),
        &format!("127.0.0.1_{up_port}_"),
        &format!(
            "server = \"{}\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  header = {{ x-from = \"hosts-dir\" }}\n",
            upstream.url(),
            mirror.url()
        ),
    );
    let mut cfg = RegistryConfig {
        blob: fast_blob(),
        ..Default::default()
    };
    let warnings = cfg.resolver.merge_hosts_dir(dir.path()).expect("hosts dir");
    assert!(warnings.is_empty(), "{warnings:?}");
    let c = Client::new(cfg, Arc::new(registry::Anonymous)).expect("client");
    let r = Reference::parse(&format!("{}/lib/app:1", upstream.host())).expect("ref");
    let digest = Digest::parse(&pushed.layer_digests[0]).expect("digest");
    let reader = c.blob_reader(&r, digest.clone(), Some(layer.len() as u64));
    let got = reader
        .read_ranges(&[10..1000, 150_000..150_100, 299_000..300_000])
        .await
        .expect("ranges via mirror");
    assert_eq!(got[0], Bytes::copy_from_slice(&layer[10..1000]));
    assert_eq!(got[1], Bytes::copy_from_slice(&layer[150_000..150_100]));
    assert_eq!(got[2], Bytes::copy_from_slice(&layer[299_000..300_000]));
    let mirror_gets = testenv::FrontStats::get(&mirror.stats.blob_gets);
    assert!(
        mirror_gets >= 2,
        "probe and reads at the mirror: {mirror_gets}"
    );
    assert_eq!(testenv::FrontStats::get(&upstream.stats.blob_gets), 0);
    c.get_manifest(&r).await.expect("manifest via mirror");

    // A mirror that ignores Range, from _default/hosts.toml: probed once, then skipped.
    let bad = Front::start(FrontOpts {
        upstream: reg.base_url(),
        ignore_range: true,
        ..Default::default()
    })
    .await;
    let dir2 = tempfile::tempdir().expect("tempdir");
    hosts_dir_for(
        dir2.path(),
        "_default",
        &format!(
            "[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            bad.url()
        ),
    );
    let mut cfg = RegistryConfig {
        blob: fast_blob(),
        ..Default::default()
    };
    cfg.resolver.config_path = Some(dir2.path().to_path_buf());
    let warnings = cfg.resolver.apply_hosts_dir().expect("hosts dir 2");
    assert!(warnings.is_empty(), "{warnings:?}");
    let c = Client::new(cfg, Arc::new(registry::Anonymous)).expect("client");
    let gets = |f: &Front| testenv::FrontStats::get(&f.stats.blob_gets);
    for round in 0..2 {
        let (bad_before, up_before) = (gets(&bad), gets(&upstream));
        let reader = c.blob_reader(&r, digest.clone(), None);
        let got = reader
            .read_ranges(&[5..500, 200_000..200_777])
            .await
            .expect("ranges");
        assert_eq!(
            got[0],
            Bytes::copy_from_slice(&layer[5..500]),
            "round {round}"
        );
        assert_eq!(
            got[1],
            Bytes::copy_from_slice(&layer[200_000..200_777]),
            "round {round}"
        );
        // The first reader asks the mirror once, with `bytes=0-0` (presence, size and
        // Range support in one reply); once it is known to ignore Range, later readers
        // do not ask it at all. No data read goes there.
        let expected = if round == 0 { 1 } else { 0 };
        assert_eq!(
            gets(&bad) - bad_before,
            expected,
            "round {round}; log: {}",
            logs.text()
        );
        assert!(
            gets(&upstream) > up_before,
            "round {round}: the reads went to the registry"
        );
    }
    let text = logs.text();
    assert!(
        text.contains("mirror ignores Range") && text.contains(&bad.host()),
        "log: {text}"
    );
}

fn basic(u: &str, p: &str) -> Credential {
    Credential::Basic {
        username: u.into(),
        password: p.into(),
    }
}

/// Credentials captured from CRI pulls: per repository, kept in a file a second
/// reader (the FUSE manager) shares, and set aside for the next source's when the
/// registry refuses them.
#[tokio::test]
async fn cri_keychain_is_per_repository_and_refused_credentials_give_way() {
    let Some(reg) = Registry::start(RegistryOpts {
        htpasswd: Some(("carol".into(), "cri-pw".into())),
        ..Default::default()
    }) else {
        return;
    };
    let host = reg.host();
    let r = push_private(&reg, "carol", "cri-pw").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cri-credentials.json");
    let store = Arc::new(CriKeychain::open(CriKeychainOptions {
        path: Some(path.clone()),
        ..Default::default()
    }));
    store
        .record(
            &format!("{host}/private/app:1"),
            &basic("carol", "cri-pw"),
            "",
        )
        .expect("record");
    // The file is what another process reads: a keychain opened on it alone works.
    let reader: Arc<dyn Keychain> = Arc::new(CriKeychain::open(CriKeychainOptions {
        path: Some(path.clone()),
        ..Default::default()
    }));
    let got = client(reader.clone())
        .get_manifest(&r)
        .await
        .expect("pull with the CRI credential");
    assert!(!got.bytes.is_empty());
    // Another repository of the host gets nothing from it.
    let other = Reference::parse(&format!("{host}/private/other:1")).expect("ref");
    let e = client(reader)
        .get_manifest(&other)
        .await
        .expect_err("no credential for another repository");
    assert!(matches!(e, Error::NoCredentials { .. }), "{e}");

    // A refused (stale) CRI credential gives way to the next source's.
    store
        .record(
            &format!("{host}/private/app:1"),
            &basic("carol", "expired"),
            "",
        )
        .expect("record stale");
    let chain: Arc<dyn Keychain> = Arc::new(ChainKeychain::new().with(store.clone()).with(
        Arc::new(StaticKeychain::new(None, basic("carol", "cri-pw"))),
    ));
    let c = client(chain);
    let m = c
        .get_manifest(&r)
        .await
        .expect("next source after a refusal");
    assert_eq!(m.bytes, got.bytes);
    // The same client keeps preferring the working credential.
    c.get_manifest(&r).await.expect("again");
    // With no other source, the refusal is the registry's.
    let e = client(store.clone())
        .get_manifest(&r)
        .await
        .expect_err("stale only");
    assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
    assert!(
        e.to_string().contains("CRI PullImage credentials") && !e.to_string().contains("expired"),
        "{e}"
    );
}

/// Token auth: a credential the token issuer refuses (an expired ECR-style password)
/// gives way to the next source's, and a 403 to a credential that lost its access
/// makes the client ask the sources again once.
#[tokio::test]
async fn refused_and_forbidden_credentials_are_resolved_again() {
    let dir = tempfile::tempdir().expect("tmp");
    let issuer = TokenIssuer::start(
        dir.path(),
        IssuerOpts {
            user: Some(("dave".into(), "fresh".into())),
            expires_in: 60,
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
    let r = push_private(&reg, "dave", "fresh").await;
    let chain: Arc<dyn Keychain> = Arc::new(
        ChainKeychain::new()
            .with(Arc::new(StaticKeychain::new(None, basic("dave", "stale"))))
            .with(Arc::new(StaticKeychain::new(None, basic("dave", "fresh")))),
    );
    let c = client(chain);
    let img = c
        .resolve_image(&r, &registry::Platform::host())
        .await
        .expect("token from the second source");
    let layer = img.manifest.layers[0].clone();
    let data = c
        .blob_reader(&r, layer.digest.clone(), Some(layer.size))
        .read_at(0, 100)
        .await
        .expect("blob read with the token");
    assert_eq!(data.len(), 100);

    // 403 (basic auth through a front that forbids one credential).
    let Some(basic_reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let pushed = push_image(
        &basic_reg.base_url(),
        "forbid/app",
        "1",
        &[random_bytes(5000, 3)],
    )
    .await;
    let front = Front::start(FrontOpts {
        upstream: basic_reg.base_url(),
        require_basic: Some(("erin".into(), "ok".into())),
        forbid_basic: Some(("erin".into(), "revoked".into())),
        ..Default::default()
    })
    .await;
    let fr = Reference::parse(&format!("{}/forbid/app:1", front.host())).expect("ref");
    let chain: Arc<dyn Keychain> = Arc::new(
        ChainKeychain::new()
            .with(Arc::new(StaticKeychain::new(
                None,
                basic("erin", "revoked"),
            )))
            .with(Arc::new(StaticKeychain::new(None, basic("erin", "ok")))),
    );
    let digest = Digest::parse(&pushed.layer_digests[0]).expect("digest");
    let data = client(chain)
        .blob_reader(&fr, digest.clone(), Some(5000))
        .read_at(10, 20)
        .await
        .expect("read after a 403");
    assert_eq!(data.len(), 20);
    assert!(testenv::FrontStats::get(&front.stats.forbidden) >= 1);
    // Only the revoked one: the 403 stands after one more try.
    let before = testenv::FrontStats::get(&front.stats.forbidden);
    let e = client(Arc::new(StaticKeychain::new(
        None,
        basic("erin", "revoked"),
    )))
    .blob_reader(&fr, digest, Some(5000))
    .read_at(10, 20)
    .await
    .expect_err("revoked only");
    assert!(matches!(e, Error::Forbidden { .. }), "{e}");
    // The ranged GET is tried twice, no more (a HEAD answered 403 before it is
    // passed over: some registries refuse HEAD that way).
    let forbidden = testenv::FrontStats::get(&front.stats.forbidden) - before;
    assert!((2..=3).contains(&forbidden), "{forbidden} requests refused");
}

/// A kubelet credential provider whose `matchImages` names a path is asked by the
/// client with the image's repository.
#[tokio::test]
async fn credential_provider_path_patterns_match_client_requests() {
    let Some(reg) = Registry::start(RegistryOpts {
        htpasswd: Some(("frank".into(), "path-pw".into())),
        ..Default::default()
    }) else {
        return;
    };
    let host = reg.host();
    let r = push_private(&reg, "frank", "path-pw").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    write_exec(
        &bin.join("path-provider"),
        &format!(
            r#"#!/bin/sh
cat > /dev/null
cat <<EOF
{{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Image","auth":{{"{host}/private/app":{{"username":"frank","password":"path-pw"}}}}}}
EOF
"#
        ),
    );
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: path-provider\n    matchImages:\n      - \"{host}/private/app\"\n    defaultCacheDuration: \"1m\"\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n"
        ),
    )
    .expect("config");
    let k: Arc<dyn Keychain> = Arc::new(
        CredentialProviderKeychain::new(CredentialProviderOptions::new(&config, &bin))
            .expect("keychain"),
    );
    client(k)
        .get_manifest(&r)
        .await
        .expect("path pattern matched");
}
