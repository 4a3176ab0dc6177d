//! A node's life with real containerd, runc, docker-registry and our daemon with its
//! FUSE manager: SIGKILL of the daemon and of the manager in the middle of pulls,
//! reads and removals, round after round, after which nothing is left over and every
//! image still runs; and a soak of pull/run/remove cycles whose memory and disk use
//! must stay flat (`bench/soak.sh` runs it for longer).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;
mod node;

use std::collections::{BTreeSet, HashSet};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime};

use node::{dir_usage, prerequisites, push_images, rss_kib, Node, TestImage, SUMS};

/// A small deterministic generator: a failing round can be replayed with its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Waits up to `limit` for `child`, then kills it; whether it succeeded.
fn reap(mut child: Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return st.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Containers (and their tasks) that a killed round left behind, removed with their
/// snapshots.
fn remove_containers(node: &Node) {
    for id in node
        .ctr(&["containers", "ls", "-q"])
        .unwrap_or_default()
        .lines()
    {
        node.kill_task(id.trim());
    }
}

/// The FUSE mount points under the daemon root, each once: a point mounted twice is a
/// stacked mount.
fn unique_mounts(node: &Node) -> BTreeSet<String> {
    let all = node.fuse_mounts();
    let set: BTreeSet<String> = all.iter().cloned().collect();
    assert_eq!(set.len(), all.len(), "stacked FUSE mounts: {all:?}");
    set
}

/// Pulls `img` (retrying while containerd reconnects) and checks that a container of
/// it reads every file right.
fn runs_right(node: &Node, img: &TestImage, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        let res = node
            .try_rpull(&img.reference)
            .and_then(|_| node.run(&img.reference, id, SUMS));
        match res {
            Ok(out) => {
                assert_eq!(out, img.sums, "{}: wrong bytes", img.reference);
                return;
            }
            Err(e) => last = e,
        }
        remove_containers(node);
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("{} does not run: {last}", img.reference);
}

/// Kills the daemon, the FUSE manager or both with SIGKILL while pulls, container
/// reads and removals are under way, then starts the daemon again, round after round.
/// Afterwards no temp file of a killed process is left once the daemon started, no
/// FUSE mount is stacked or outlives its snapshot, and every image still runs and
/// reads the right bytes. `KILL_ROUNDS` and `KILL_SEED` override the defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_the_middle_of_everything() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let rounds = env_u64("KILL_ROUNDS", 50);
    let seed = env_u64("KILL_SEED", 0x5eed_1234_abcd);
    eprintln!("KILL_ROUNDS={rounds} KILL_SEED={seed}");
    let images = push_images(&reg, "kill", 3, 9100).await;
    // Background fetch after a short quiet period, so that fills run while the
    // processes are killed; a cache bound small enough that eviction runs too.
    let config = "background_fetch_quiet_msec = 50\n\
                  [directory_cache]\nmax_size_mib = 3\n";
    let mut node = Node::start(config);
    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    node.checked(|node| {
        let mut kills = [0usize; 3];
        // Per action (pull, run, image rm, snapshot rm): how many finished despite the kill.
        let mut done = [(0usize, 0usize); 4];
        for round in 0..rounds {
            let img = &images[rng.below(images.len() as u64) as usize];
            let id = format!("r{round}");
            let mut script = SUMS.to_string();
            let action = rng.below(5);
            let out_path = node.dir.join(format!("round-{round}.out"));
            let child = match action {
                0 | 1 => node.command("/usr/bin/ctr-remote", &Node::rpull_args(&img.reference)),
                2 => {
                    // Pull if needed, then read every file in a container: fills.
                    script.push_str("; /bin/busybox cat /data/* >/dev/null");
                    let line = format!(
                        "{} >/dev/null 2>&1; {}",
                        node.shell_line("/usr/bin/ctr-remote", &Node::rpull_args(&img.reference)),
                        node.shell_line(
                            "/usr/bin/ctr",
                            &Node::run_args(&img.reference, &id, &script)
                        )
                    );
                    let mut c = std::process::Command::new("/bin/sh");
                    c.args(["-c", &line]).stdin(Stdio::null());
                    c
                }
                3 => node.command("/usr/bin/ctr", &["images", "rm", "--sync", &img.reference]),
                _ => {
                    let snaps = node.snapshots();
                    let key = snaps
                        .get(rng.below(snaps.len().max(1) as u64) as usize)
                        .cloned()
                        .unwrap_or_default();
                    node.command(
                        "/usr/bin/ctr",
                        &["snapshot", "--snapshotter", "stargz", "rm", &key],
                    )
                }
            }
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
            std::thread::sleep(Duration::from_millis(rng.below(900)));
            let victim = (round % 3) as usize;
            kills[victim] += 1;
            if victim != 1 {
                node.stop_daemon(libc::SIGKILL);
            }
            if victim != 0 {
                node.kill_manager();
            }
            let kind = [0, 0, 1, 2, 3][action as usize];
            done[kind].1 += 1;
            if reap(child, Duration::from_secs(60)) {
                done[kind].0 += 1;
            }
            if kind == 1 {
                // Whatever a container printed before or after the kill: each line is
                // the right sum of its file, never one of wrong bytes.
                let out = std::fs::read_to_string(&out_path).unwrap_or_default();
                for line in out.lines() {
                    assert!(
                        img.sums.lines().any(|l| l == line),
                        "round {round}: {line:?} is not one of\n{}",
                        img.sums
                    );
                }
            }
            if node.daemon.is_none() {
                node.start_daemon();
            }
            remove_containers(node);
            unique_mounts(node);
        }
        eprintln!(
            "{rounds} rounds in {:?}: killed the daemon {} times, the manager {}, both {}; \
             finished/started: pulls {:?}, runs {:?}, image removals {:?}, snapshot removals {:?}",
            started.elapsed(),
            kills[0],
            kills[1],
            kills[2],
            done[0],
            done[1],
            done[2],
            done[3],
        );

        // One more kill of both, then a start: whatever a killed process was writing
        // is swept before anything else is served.
        node.stop_daemon(libc::SIGKILL);
        node.kill_manager();
        let restart = SystemTime::now();
        node.start_daemon();
        let mut temps = Vec::new();
        dir_usage(&node.cache_dir(), &mut temps);
        let leaked: Vec<_> = temps
            .iter()
            .filter(|p| {
                std::fs::metadata(p)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < restart)
            })
            .collect();
        assert!(
            leaked.is_empty(),
            "temp files left by killed processes: {leaked:?}"
        );

        for (i, img) in images.iter().enumerate() {
            runs_right(node, img, &format!("final{i}"));
        }
        // Every FUSE mount belongs to a remote snapshot the manager serves.
        let mounts = unique_mounts(node);
        let manager = node.manager_pid().expect("no FUSE manager");
        assert!(!mounts.is_empty(), "no remote layer mounted");
        let served = status_mounts(node);
        assert_eq!(
            served,
            mounts.len(),
            "FUSE mounts {mounts:?}, manager serves {served}"
        );
        // Removing everything unmounts everything.
        remove_containers(node);
        node.remove_all_images();
        let _ = node.ctr(&["content", "prune", "references"]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !node.fuse_mounts().is_empty() {
            assert!(
                Instant::now() < deadline,
                "mounts outlived their snapshots: {:?}",
                node.fuse_mounts()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(status_mounts(node), 0);
        // containerd's garbage collection removed the snapshots it knows and those only
        // the daemon knows (a Prepare whose answer a kill lost), and Cleanup their
        // directories.
        let snaps_dir = node.snap_root.join("snapshotter/snapshots");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left: Vec<_> = std::fs::read_dir(&snaps_dir)
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "snapshot directories left: {left:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        for (n, msg) in node.complaints() {
            eprintln!("logged {n}x: {msg}");
        }
        // SIGINT stops the daemon and its manager.
        node.stop_daemon(libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(15);
        while node::alive(manager, &node.snap_root) {
            assert!(Instant::now() < deadline, "manager still runs after SIGINT");
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}

/// The number of layers the FUSE manager says it serves.
fn status_mounts(node: &Node) -> usize {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(node.dir.join("run/fuse-manager.sock"))
        .expect("connect to the FUSE manager");
    s.write_all(b"{\"op\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    v["state"]["mounts"].as_u64().unwrap() as usize
}

/// Least-squares slope of `ys` over their index.
fn slope(ys: &[f64]) -> f64 {
    let n = ys.len() as f64;
    if ys.len() < 2 {
        return 0.0;
    }
    let mx = (n - 1.0) / 2.0;
    let my = ys.iter().sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (i, y) in ys.iter().enumerate() {
        let dx = i as f64 - mx;
        num += dx * (y - my);
        den += dx * dx;
    }
    num / den
}

/// Pull, run and remove cycles: each pulls a few images (some every cycle, one new
/// each time), reads every file in a container, then removes them all. The FUSE
/// manager's and the daemon's RSS are sampled after every cycle, and the cache
/// directory's size; over the second half the manager's RSS must not climb and the
/// cache must stay within its bound. `SOAK_CYCLES` (default 60) sets the length: the
/// manager's allocator takes some 30 cycles to settle here (its RSS climbs by about
/// 100 KiB a cycle, then flattens), so a shorter run measures that warm-up, not a leak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_pull_run_remove() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let cycles = env_u64("SOAK_CYCLES", 60).max(4) as usize;
    let bound_mib = 8u64;
    let fixed = push_images(&reg, "fixed", 2, 7700).await;
    // One image per cycle that nobody pulled before: without eviction the cache grows.
    let fresh = push_images(&reg, "fresh", cycles, 1_000_000).await;
    // The memory LRU in front of the cache fills up to its bound (64 MiB by default)
    // with the chunks every new image brings; a small one is full after a few cycles,
    // so that what climbs after that is state outliving its layers.
    let mem_mib = env_u64("SOAK_MEMORY_MIB", 4);
    let config = format!(
        "background_fetch_quiet_msec = 200\n[directory_cache]\nmax_size_mib = {bound_mib}\n\
         max_memory_bytes = {}\n",
        mem_mib << 20
    );
    let mut node = Node::start(&config);
    let started = Instant::now();
    node.checked(|node| {
        let (mut mgr, mut daemon, mut disk) = (Vec::new(), Vec::new(), Vec::new());
        let mut seen_managers = HashSet::new();
        for cycle in 0..cycles {
            for (i, img) in fixed.iter().chain(&fresh[cycle..=cycle]).enumerate() {
                node.try_rpull(&img.reference)
                    .unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
                let out = node
                    .run(&img.reference, &format!("c{cycle}-{i}"), SUMS)
                    .unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
                assert_eq!(out, img.sums, "cycle {cycle}: {}", img.reference);
            }
            node.remove_all_images();
            assert!(
                node.fuse_mounts().is_empty(),
                "cycle {cycle}: {:?}",
                node.fuse_mounts()
            );
            let pid = node.manager_pid().expect("no FUSE manager");
            seen_managers.insert(pid);
            mgr.push(rss_kib(pid) as f64);
            daemon.push(rss_kib(node.daemon.as_ref().unwrap().id() as i32) as f64);
            let mut temps = Vec::new();
            disk.push(dir_usage(&node.cache_dir(), &mut temps) as f64);
        }
        assert_eq!(seen_managers.len(), 1, "the FUSE manager was restarted");
        let half = cycles / 2;
        let (mgr_slope, daemon_slope) = (slope(&mgr[half..]), slope(&daemon[half..]));
        let max_disk = disk.iter().cloned().fold(0.0, f64::max);
        eprintln!(
            "soak: {cycles} cycles in {:?}; FUSE manager RSS {:.0} -> {:.0} KiB \
             (slope over the second half {mgr_slope:.1} KiB/cycle); daemon RSS {:.0} -> \
             {:.0} KiB (slope {daemon_slope:.1} KiB/cycle); cache dir max {:.1} MiB, \
             last {:.1} MiB (bound {bound_mib} MiB)",
            started.elapsed(),
            mgr[0],
            mgr[cycles - 1],
            daemon[0],
            daemon[cycles - 1],
            max_disk / 1048576.0,
            disk[cycles - 1] / 1048576.0,
        );
        eprintln!("soak samples (manager KiB, daemon KiB, cache bytes):");
        for i in 0..cycles {
            eprintln!("{i} {} {} {}", mgr[i], daemon[i], disk[i]);
        }
        assert!(
            mgr_slope < 64.0,
            "FUSE manager RSS climbs {mgr_slope:.1} KiB per cycle: {mgr:?}"
        );
        // The bound, plus one file that was being written when the sample was taken.
        assert!(
            max_disk <= ((bound_mib + 1) << 20) as f64,
            "cache directory reached {max_disk} bytes"
        );
    });
}
