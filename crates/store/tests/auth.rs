//! stargz-store and registry credentials with real Podman 4.3: a registry that wants a
//! login, `podman login` writing the auth file the store reads, and the reference's
//! credential hand-off (`stargz-store-helper`), which Podman 4.3 cannot call itself.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::{podman_prerequisites, push_gzip_image, Env};

const USER: &str = "puller";
const PASSWORD: &str = "not-for-logs-7f3a";

/// Runs `stargz-store-helper` with `data` on stdin against the store at `sock`.
fn hand_off(sock: &std::path::Path, data: &[u8]) -> std::process::Output {
    let mut helper = Command::new(env!("CARGO_BIN_EXE_stargz-store-helper"))
        .arg(sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    helper.stdin.take().unwrap().write_all(data).unwrap();
    helper.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_registry_with_podman_login_and_the_hand_off() {
    if !podman_prerequisites() {
        return;
    }
    let public = testenv::Registry::start(Default::default()).unwrap();
    let private = testenv::Registry::start(testenv::RegistryOpts {
        htpasswd: Some((USER.into(), PASSWORD.into())),
        ..Default::default()
    })
    .unwrap();
    let plain = push_gzip_image(&public, "store/img", "plain", &common::test_layers()).await;
    let image = format!("{}/private/img:esgz", private.host());
    let creds = registry::StaticKeychain::from_user_pass(
        Some(&private.host()),
        &format!("{USER}:{PASSWORD}"),
    )
    .unwrap();
    common::convert_with(&plain, &image, convert::Target::Estargz, Arc::new(creds)).await;

    let mut env = Env::new(&[public.host(), private.host()], "noprefetch = true\n");
    let lazy = env.lazy();
    let mut login = lazy
        .command()
        .args([
            "login",
            "--tls-verify=false",
            "-u",
            USER,
            "--password-stdin",
        ])
        .arg(private.host())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    login
        .stdin
        .take()
        .unwrap()
        .write_all(PASSWORD.as_bytes())
        .unwrap();
    let out = login.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "podman login: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let authfile = env.dir.join("lazy.auth.json");

    // Without credentials the store cannot read the image: Podman, logged in, pulls it
    // the ordinary way.
    env.start_store();
    lazy.ok(&["pull", "-q", &image]);
    assert_eq!(lazy.additional_layers(), 0, "{}", env.store_log());
    lazy.ok(&["rmi", "-f", &image]);
    env.stop_store(libc::SIGINT);

    // With the auth file podman login wrote, the layers are served lazily.
    env.store_env = vec![("REGISTRY_AUTH_FILE".into(), authfile.display().to_string())];
    env.start_store();
    lazy.ok(&["pull", "-q", &image]);
    assert_eq!(lazy.additional_layers(), 2, "{}", env.store_log());
    assert_eq!(
        lazy.sh(&image, "cat /etc/hello.txt"),
        "hello from layer two\n"
    );
    lazy.ok(&["rmi", "-f", &image]);
    env.stop_store(libc::SIGINT);

    // The hand-off: no auth file, the credentials come through the store's socket.
    env.store_env.clear();
    env.start_store();
    let sock = env.root.join("store.sock");
    let json = serde_json::json!({ &image: {"username": USER, "password": PASSWORD} });
    let out = hand_off(&sock, json.to_string().as_bytes());
    assert!(
        out.status.success(),
        "stargz-store-helper: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lazy.ok(&["pull", "-q", &image]);
    assert_eq!(lazy.additional_layers(), 2, "{}", env.store_log());
    assert_eq!(
        lazy.sh(&image, "cat /etc/motd"),
        "lazy pulling with podman\n"
    );

    // An empty hand-off adds nothing, a malformed one is refused, and no secret
    // reaches the log.
    assert!(hand_off(&sock, b"").status.success());
    let bad = hand_off(&sock, b"[\"not a map\"]");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not a JSON object"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let log = env.store_log();
    assert!(!log.contains(PASSWORD), "the password reached the log");
    assert!(log.contains("registry credentials handed over"));
}
