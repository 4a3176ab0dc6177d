//! A hostile registry (a real registry behind a lying front): bodies that never end,
//! range replies longer than asked, multipart floods, absurd `Retry-After` and token
//! lifetimes, signed redirect URLs. Every case ends in a clear error or a correct
//! answer, with bounded reads, and nothing secret in the message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use registry::{Anonymous, BlobConfig, Client, Credential, Digest, RegistryConfig, StaticKeychain};
use testenv::{
    random_bytes, Front, FrontOpts, FrontStats, IssuerOpts, Registry, RegistryOpts, TokenIssuer,
};

/// Far more than any limit; what a bounded reader must never pull in whole.
const FLOOD: usize = 512 << 20;
/// What the client may read of a flood before giving up: its limit plus what socket
/// buffers and the front's read-ahead hold.
const READ_BOUND: usize = 24 << 20;

fn client(blob: BlobConfig) -> Client {
    Client::new(
        RegistryConfig {
            blob,
            ..Default::default()
        },
        Arc::new(Anonymous),
    )
    .expect("client")
}

fn fast_blob() -> BlobConfig {
    BlobConfig {
        max_retries: 2,
        min_wait_msec: 10,
        max_wait_msec: 100,
        fetching_timeout_sec: 20,
        ..BlobConfig::default()
    }
}

/// A registry holding a one-layer image, and a front before it.
async fn setup(
    opts: FrontOpts,
    seed: u64,
) -> Option<(Registry, Front, registry::Reference, Digest, Vec<u8>)> {
    let reg = Registry::start(RegistryOpts::default())?;
    let data = random_bytes(600_000, seed);
    let repo = format!("hostile/s{seed}");
    let pushed =
        testenv::push_image(&reg.base_url(), &repo, "v1", std::slice::from_ref(&data)).await;
    let front = Front::start(FrontOpts {
        upstream: reg.base_url(),
        ..opts
    })
    .await;
    let r = registry::Reference::parse(&format!("{}/{repo}:v1", front.host())).expect("ref");
    let d = Digest::parse(&pushed.layer_digests[0]).expect("digest");
    Some((reg, front, r, d, data))
}

#[tokio::test]
async fn a_chunked_manifest_without_length_is_cut_at_the_limit() {
    let Some((_reg, front, r, _, _)) = setup(
        FrontOpts {
            chunked_manifest_bytes: Some(FLOOD),
            ..Default::default()
        },
        1,
    )
    .await
    else {
        return;
    };
    let t = Instant::now();
    let e = client(fast_blob())
        .get_manifest(&r)
        .await
        .expect_err("flooded manifest");
    assert!(e.to_string().contains("limit"), "{e}");
    let sent = FrontStats::get(&front.stats.hostile_bytes_sent);
    assert!(sent < READ_BOUND, "client read {sent} bytes of the flood");
    assert!(t.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn a_range_reply_longer_than_the_range_is_refused() {
    let Some((_reg, front, r, d, data)) = setup(
        FrontOpts {
            oversize_range_body: FLOOD,
            ..Default::default()
        },
        2,
    )
    .await
    else {
        return;
    };
    let c = client(fast_blob());
    let reader = c.blob_reader(&r, d, Some(data.len() as u64));
    let e = reader.read_at(1000, 5000).await.expect_err("oversize 206");
    assert!(e.to_string().contains("longer than"), "{e}");
    let sent = FrontStats::get(&front.stats.hostile_bytes_sent);
    assert!(sent < READ_BOUND, "client read {sent} bytes of the flood");
    // A streamed range stops at its end whatever follows.
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink_got = got.clone();
    reader
        .read_range_streaming(
            2000..3000,
            Arc::new(move |_, b| sink_got.lock().unwrap().extend_from_slice(&b)),
        )
        .await
        .expect("streamed range");
    assert_eq!(&got.lock().unwrap()[..], &data[2000..3000]);
}

#[tokio::test]
async fn a_multipart_flood_is_refused() {
    let Some((_reg, front, r, d, data)) = setup(
        FrontOpts {
            multipart_flood_bytes: Some(FLOOD),
            ..Default::default()
        },
        3,
    )
    .await
    else {
        return;
    };
    let c = client(BlobConfig {
        coalesce_gap_bytes: 0,
        ..fast_blob()
    });
    let reader = c.blob_reader(&r, d, Some(data.len() as u64));
    let res = reader.read_ranges(&[0..100, 400_000..400_100]).await;
    let sent = FrontStats::get(&front.stats.hostile_bytes_sent);
    assert!(sent < READ_BOUND, "client read {sent} bytes of the flood");
    match res {
        Err(e) => assert!(e.to_string().contains("longer than"), "{e}"),
        // Falling back to single ranges is fine as long as the bytes are right.
        Ok(parts) => {
            assert_eq!(&parts[0][..], &data[..100]);
            assert_eq!(&parts[1][..], &data[400_000..400_100]);
        }
    }
}

#[tokio::test]
async fn endless_error_bodies_and_huge_retry_after_are_bounded() {
    for (i, retry_after) in ["18446744073709551615", "Fri, 31 Dec 9999 23:59:59 GMT"]
        .into_iter()
        .enumerate()
    {
        let Some((_reg, front, r, d, data)) = setup(
            FrontOpts {
                fail_503: 100,
                retry_after: Some(retry_after.into()),
                error_body_bytes: Some(FLOOD),
                ..Default::default()
            },
            4 + i as u64,
        )
        .await
        else {
            return;
        };
        let t = Instant::now();
        let c = client(fast_blob());
        let reader = c.blob_reader(&r, d, Some(data.len() as u64));
        let e = reader.read_at(0, 100).await.expect_err("503 forever");
        assert!(e.to_string().contains("503"), "{e}");
        assert!(e.to_string().len() < 2048, "{e}");
        // The clamped wait is longer than the deadline: no retry, no hour-long sleep.
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
        let sent = FrontStats::get(&front.stats.hostile_bytes_sent);
        assert!(
            sent < READ_BOUND,
            "client read {sent} bytes of error bodies"
        );
    }
}

#[tokio::test]
async fn a_token_that_lives_forever_is_clamped() {
    if testenv::require_tool("docker-registry").is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let issuer = TokenIssuer::start(
        dir.path(),
        IssuerOpts {
            user: Some(("bob".into(), "pw".into())),
            expires_in: u64::MAX,
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
    let c = Client::new(
        RegistryConfig {
            blob: fast_blob(),
            ..Default::default()
        },
        Arc::new(StaticKeychain::new(
            None,
            Credential::Basic {
                username: "bob".into(),
                password: "pw".into(),
            },
        )),
    )
    .expect("client");
    let r = registry::Reference::parse(&format!("{}/tok/forever:v1", reg.host())).expect("ref");
    let data = random_bytes(1000, 9);
    c.push_blob(&r, bytes::Bytes::from(data.clone()), &Default::default())
        .await
        .expect("push with a forever token");
    let d = Digest::sha256(&data);
    assert_eq!(&c.get_blob(&r, &d).await.expect("pull")[..], &data[..]);
    assert!(issuer.tokens_issued() >= 1);
}

#[tokio::test]
async fn errors_never_show_signed_query_strings_or_userinfo() {
    let Some(reg) = Registry::start(RegistryOpts::default()) else {
        return;
    };
    let data = random_bytes(10_000, 10);
    let pushed = testenv::push_image(
        &reg.base_url(),
        "hostile/redir",
        "v1",
        std::slice::from_ref(&data),
    )
    .await;
    // The redirect target always fails; its URL carries a signature and userinfo.
    let target = Front::start(FrontOpts {
        upstream: reg.base_url(),
        fail_503: 1000,
        ..Default::default()
    })
    .await;
    let front = Front::start(FrontOpts {
        upstream: reg.base_url(),
        redirect_blobs_to: Some(format!("http://user:secretpw@{}", target.host())),
        ..Default::default()
    })
    .await;
    let r = registry::Reference::parse(&format!("{}/hostile/redir:v1", front.host())).expect("ref");
    let c = client(fast_blob());
    let reader = c.blob_reader(
        &r,
        Digest::parse(&pushed.layer_digests[0]).expect("d"),
        Some(data.len() as u64),
    );
    let e = reader.read_at(0, 10).await.expect_err("target fails");
    let msg = e.to_string();
    assert!(FrontStats::get(&front.stats.redirects) >= 1);
    assert!(!msg.contains("sig="), "{msg}");
    assert!(!msg.contains("secretpw") && !msg.contains("user:"), "{msg}");
    let dbg = format!("{e:?}");
    assert!(!dbg.contains("sig=") && !dbg.contains("secretpw"), "{dbg}");
}
