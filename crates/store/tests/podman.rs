//! stargz-store with real Podman 4.3 (Debian), a real registry and real FUSE: lazy
//! pulls that show the same tree as ordinary pulls while fetching only what is read,
//! plain layers left to Podman, images converted by the reference and by this
//! workspace, zstd:chunked, push from a lazily pulled image, release on `podman rmi`,
//! and a store restart under a running container.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{convert_ours, manifest_layers, podman_prerequisites, push_gzip_image, require, Env};

/// What the lazy tests run with: fetch only what is read.
const LAZY: &str = "noprefetch = true\nno_background_fetch = true\n";

/// A tree listing without its first line (the root directory's mode).
fn without_root(tree: &str) -> &str {
    tree.split_once('\n').map(|(_, rest)| rest).unwrap_or(tree)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_pull_shows_the_ordinary_tree_and_fetches_only_what_is_read() {
    if !podman_prerequisites() {
        return;
    }
    let reg = testenv::Registry::start(Default::default()).unwrap();
    let host = reg.host();
    let plain = push_gzip_image(&reg, "store/img", "plain", &common::test_layers()).await;
    let tag = "esgz";
    let esgz = format!("{host}/store/img:{tag}");
    convert_ours(&plain, &esgz, convert::Target::Estargz).await;
    let layers = manifest_layers(&reg, "store/img", tag).await;
    let digests: Vec<String> = layers
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();

    let metrics = format!("127.0.0.1:{}", testenv::free_port());
    let mut env = Env::new(
        std::slice::from_ref(&host),
        &format!("{LAZY}metrics_address = \"{metrics}\"\n"),
    );
    env.start_store();
    let lazy = env.lazy();
    lazy.ok(&["pull", "-q", &esgz]);
    assert_eq!(
        lazy.additional_layers(),
        2,
        "both layers come from the store\n{}",
        env.store_log()
    );
    assert_eq!(env.pool_mounts().len(), 2);

    // A workload that reads two small files fetches a small part of each layer.
    let out = lazy.sh(&esgz, "cat /etc/hello.txt /etc/motd");
    assert_eq!(out, "hello from layer two\nlazy pulling with podman\n");
    for d in &digests {
        let (fetched, size) = env.fetch_state(&esgz, d);
        assert!(
            fetched * 2 < size,
            "layer {d}: {fetched} of {size} bytes fetched for two small files"
        );
    }
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "stargz_fs_layer_fetched_size",
        "stargz_registry_requests_total",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }

    // The whole tree, as Podman shows it after an ordinary pull of the image before
    // conversion.
    let ordinary = env.ordinary();
    ordinary.ok(&["pull", "-q", &plain]);
    assert_eq!(ordinary.additional_layers(), 0);
    let want = ordinary.tree(&plain);
    let got = lazy.tree(&esgz);
    assert_eq!(
        without_root(&got),
        without_root(&want),
        "lazy tree differs from the ordinary one"
    );
    // Layers without a "./" entry: containers/storage leaves an extracted layer's root
    // at 0555, a lazily mounted one has 0755 (as the reference's).
    assert!(got.starts_with(". dir 755 0 0\n"), "{got}");
    for needle in [
        "./deleted",
        "./opaque/old",
        "./etc/motd.link file 644 0 0 25 2",
        "./usr/bin link ../bin",
        "./bin/suid file 4755",
        "./etc/owned file 640 1000 1000",
    ] {
        let present = got.contains(needle);
        let expected = !needle.starts_with("./deleted") && !needle.starts_with("./opaque/old");
        assert_eq!(present, expected, "{needle} in\n{got}");
    }

    // Pushing the lazily pulled image reads its layers from the store's `blob` files
    // (Podman decompresses and compresses them again): the same layer contents.
    let pushed = format!("{host}/store/pushed:v1");
    lazy.ok(&["push", "-q", &esgz, &pushed]);
    assert_eq!(
        common::diff_ids(&reg, "store/pushed", "v1").await,
        common::diff_ids(&reg, "store/img", tag).await,
    );

    // Removing the image releases the layers, and the store unmounts them.
    lazy.ok(&["rmi", "-f", &esgz]);
    common::wait_until(20, "layers unmounted after rmi", || {
        env.pool_mounts().is_empty()
    });
    assert!(env.store_log().contains("layer released"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_reference_converted_and_zstd_chunked_images() {
    if !podman_prerequisites()
        || !require(
            &["/usr/bin/ctr-remote", "/usr/bin/containerd", "/usr/bin/ctr"],
            "stargz-snapshotter containerd",
        )
    {
        return;
    }
    let reg = testenv::Registry::start(Default::default()).unwrap();
    let host = reg.host();
    let plain = push_gzip_image(&reg, "store/img", "plain", &common::test_layers()).await;
    let zstd = format!("{host}/store/img:zstd");
    convert_ours(&plain, &zstd, convert::Target::ZstdChunked).await;
    let by_ref = format!("{host}/store/img:ref");
    reference_optimize(&plain, &by_ref);
    let ref_layers = manifest_layers(&reg, "store/img", "ref").await;
    assert!(
        ref_layers
            .iter()
            .all(|l| l["annotations"]["containerd.io/snapshot/stargz/toc.digest"].is_string()),
        "the reference wrote eStargz: {ref_layers:?}"
    );

    let mut env = Env::new(std::slice::from_ref(&host), LAZY);
    env.start_store();
    let lazy = env.lazy();
    let ordinary = env.ordinary();

    // A plain gzip image: nothing for the store, Podman pulls it itself.
    lazy.ok(&["pull", "-q", &plain]);
    assert_eq!(lazy.additional_layers(), 0);
    assert!(env.pool_mounts().is_empty());
    ordinary.ok(&["pull", "-q", &plain]);
    let want = ordinary.tree(&plain);
    assert_eq!(lazy.tree(&plain), want);

    // Converted by the reference's ctr-remote: lazily served, same tree.
    lazy.ok(&["pull", "-q", &by_ref]);
    assert_eq!(lazy.additional_layers(), 2, "{}", env.store_log());
    assert_eq!(without_root(&lazy.tree(&by_ref)), without_root(&want));

    // zstd:chunked from our converter.
    lazy.ok(&["pull", "-q", &zstd]);
    assert_eq!(lazy.additional_layers(), 4, "{}", env.store_log());
    assert_eq!(without_root(&lazy.tree(&zstd)), without_root(&want));
    assert_eq!(env.pool_mounts().len(), 4);
}

/// `ctr-remote image optimize --no-optimize --oci` of Debian's stargz-snapshotter in a
/// scratch containerd, pushed with ctr.
fn reference_optimize(src: &str, dst: &str) {
    let tmp = tempfile::Builder::new()
        .prefix("stargz-store-ctrd-")
        .tempdir()
        .unwrap();
    let d = tmp.path().display().to_string();
    std::fs::write(
        tmp.path().join("config.toml"),
        format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n"
        ),
    )
    .unwrap();
    let mut containerd = Command::new("/usr/bin/containerd")
        .arg("--config")
        .arg(tmp.path().join("config.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("containerd.log")).unwrap())
        .spawn()
        .unwrap();
    let sock = tmp.path().join("c.sock");
    let tool = |bin: &str, args: &[&str]| {
        Command::new(bin)
            .arg("-a")
            .arg(&sock)
            .args(["-n", "store"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    common::wait_until(30, "containerd", || {
        tool("/usr/bin/ctr", &["version"]).status.success()
    });
    let steps: [(&str, Vec<&str>); 3] = [
        (
            "/usr/bin/ctr-remote",
            vec!["images", "pull", "--plain-http", src],
        ),
        (
            "/usr/bin/ctr-remote",
            vec!["image", "optimize", "--no-optimize", "--oci", src, dst],
        ),
        ("/usr/bin/ctr", vec!["images", "push", "--plain-http", dst]),
    ];
    let mut failed = None;
    for (bin, args) in &steps {
        let out = tool(bin, args);
        if !out.status.success() {
            failed = Some(format!(
                "{bin} {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
            break;
        }
    }
    common::stop(&mut containerd, libc::SIGTERM, Duration::from_secs(10));
    common::detach_mounts(tmp.path());
    if let Some(f) = failed {
        panic!("{f}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_restart_under_a_running_container() {
    if !podman_prerequisites() {
        return;
    }
    let reg = testenv::Registry::start(Default::default()).unwrap();
    let host = reg.host();
    let plain = push_gzip_image(&reg, "store/img", "plain", &common::test_layers()).await;
    let esgz = format!("{host}/store/img:esgz");
    convert_ours(&plain, &esgz, convert::Target::Estargz).await;

    let mut env = Env::new(std::slice::from_ref(&host), LAZY);
    env.start_store();
    let lazy = env.lazy();
    lazy.ok(&["pull", "-q", &esgz]);
    lazy.ok(&[
        "run",
        "-d",
        "--name",
        "long",
        "--network",
        "none",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=4096:4096",
        &esgz,
        "/bin/busybox",
        "sleep",
        "600",
    ]);
    assert_eq!(
        lazy.ok(&["exec", "long", "/bin/busybox", "cat", "/etc/motd"]),
        "lazy pulling with podman\n"
    );

    // As the reference's store, the layers are served by the store process: while it
    // is down the running container cannot read them.
    env.stop_store(libc::SIGTERM);
    assert!(
        env.pool_mounts().is_empty(),
        "the layer mounts went with the store"
    );
    let during = lazy.run(&["exec", "long", "/bin/busybox", "cat", "/etc/hello.txt"]);
    eprintln!(
        "exec while the store is down: {} {}",
        during.status,
        String::from_utf8_lossy(&during.stderr)
    );

    // Started again, it serves the stored image's layers to new containers through
    // the links containers/storage keeps, and the old mounts were cleared away.
    env.start_store();
    let out = lazy.sh(
        &esgz,
        "cat /etc/hello.txt; busybox sha256sum /junk/big | busybox cut -c1-64",
    );
    let big = testenv::random_bytes(6 << 20, 7);
    assert_eq!(
        out,
        format!("hello from layer two\n{}\n", &common::sha(&big)[7..])
    );
    assert_eq!(env.pool_mounts().len(), 2, "{}", env.store_log());
    lazy.ok(&["rm", "-f", "-t", "0", "long"]);
}

/// A layer our converter made with a TOC bigger than the default first read (thousands
/// of small files): the store's first read at its end, sized by the layer's `toc-tail`
/// annotation, is one request of exactly the TOC and footer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converted_toc_comes_in_one_request() {
    if !podman_prerequisites() {
        return;
    }
    let reg = testenv::Registry::start(Default::default()).unwrap();
    let bodies: Vec<(String, Vec<u8>)> = (0..14_000u32)
        .map(|i| {
            let body = (0..60 + i % 200)
                .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(i) >> 9) as u8)
                .collect();
            (format!("d{:02}/f{i:05}", i % 16), body)
        })
        .collect();
    let dirs: Vec<String> = (0..16).map(|d| format!("d{d:02}")).collect();
    let mut entries: Vec<common::Entry<'_>> =
        dirs.iter().map(|d| common::Entry::Dir(d, 0o755)).collect();
    for (name, body) in &bodies {
        entries.push(common::Entry::File(name, body, 0o644, 0));
    }
    let plain = push_gzip_image(&reg, "store/tail", "plain", &[common::tar_of(&entries)]).await;
    convert_ours(
        &plain,
        &format!("{}/store/tail:esgz", reg.host()),
        convert::Target::Estargz,
    )
    .await;
    let layers = manifest_layers(&reg, "store/tail", "esgz").await;
    let size = layers[0]["size"].as_u64().unwrap();
    let digest = layers[0]["digest"].as_str().unwrap().to_string();
    let tail: u64 = layers[0]["annotations"][remote_layer::annotation::TOC_TAIL]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        tail > (512 << 10) + (64 << 10) && tail < size,
        "{tail} of {size}"
    );

    let front = testenv::Front::start(testenv::FrontOpts {
        upstream: reg.base_url(),
        ..Default::default()
    })
    .await;
    let img = format!("{}/store/tail:esgz", front.host());
    let mut env = Env::new(&[front.host()], LAZY);
    env.start_store();
    let lazy = env.lazy();
    lazy.ok(&["pull", "-q", &img]);
    assert_eq!(lazy.additional_layers(), 1, "{}", env.store_log());
    let log = front.stats.log.lock().unwrap();
    // Reads of the layer's TOC or footer: those that end past the TOC's start.
    let toc_reads: Vec<String> = log
        .iter()
        .filter(|l| l.method == "GET" && l.path.ends_with(&format!("/blobs/{digest}")))
        .filter_map(|l| {
            let r = l
                .range
                .clone()
                .unwrap_or_else(|| format!("bytes=0-{}", size - 1));
            let end: u64 = r.rsplit('-').next()?.parse().ok()?;
            (end >= size - tail).then_some(r)
        })
        .collect();
    assert_eq!(
        toc_reads,
        vec![format!("bytes={}-{}", size - tail, size - 1)],
        "TOC and footer in one request"
    );
}
