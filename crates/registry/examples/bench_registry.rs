//! Benchmark of the blob reader over a shaped link (needs root, `ip`, `tc`,
//! `docker-registry`, `curl`): docker-registry runs in the server namespace,
//! this process in the client namespace. See docs/benchmarks/registry.md.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark code: a panic is a failed run"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use registry::{
    Anonymous, BlobConfig, Client, Digest, HostConfig, MirrorConfig, Reference, RegistryConfig,
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "wan")]
    profile: String,
    #[arg(long, default_value_t = 50)]
    blob_mb: usize,
    #[arg(long, default_value_t = 64)]
    ranges: usize,
    #[arg(long, default_value_t = 64)]
    range_kib: u64,
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let profile = linkshape::Profile::named(&a.profile)?;
    let link = linkshape::Link::up("regbench", profile)?;
    let dir = tempfile::tempdir()?;
    let port = 5000;
    let cfg = dir.path().join("config.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {}:{port}\n",
            dir.path().join("storage").display(),
            link.server_addr
        ),
    )?;
    let mut reg = link
        .command(linkshape::Side::Server, "docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let result = run(&a, &link, port, profile);
    let _ = reg.kill();
    let _ = reg.wait();
    drop(link);
    result
}

fn run(
    a: &Args,
    link: &linkshape::Link,
    port: u16,
    profile: linkshape::Profile,
) -> anyhow::Result<()> {
    // Everything from here on (including tokio's threads) lives in the client namespace.
    linkshape::enter_netns(&link.client_ns)?;
    let host = format!("{}:{port}", link.server_addr);
    let started = Instant::now();
    while std::net::TcpStream::connect(&host).is_err() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(15),
            "registry did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let base = format!("http://{host}");
        let data = testenv::random_bytes(a.blob_mb << 20, 42);
        let t = Instant::now();
        let digest = Digest::parse(&testenv::push_blob(&base, "bench/blob", &data).await)?;
        eprintln!(
            "pushed {} MiB in {:.2}s",
            a.blob_mb,
            t.elapsed().as_secs_f64()
        );
        let r = Reference::parse(&format!("{host}/bench/blob:x"))?;
        let mut cfg = RegistryConfig {
            blob: BlobConfig {
                coalesce_gap_bytes: 0,
                ..BlobConfig::default()
            },
            ..Default::default()
        };
        cfg.resolver.host.insert(
            host.clone(),
            HostConfig {
                self_: Some(MirrorConfig {
                    insecure: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        let fresh = || Client::new(cfg.clone(), Arc::new(Anonymous));
        let size = data.len() as u64;
        let len = a.range_kib * 1024;
        let mut seed = 7u64;
        let offsets: Vec<u64> = (0..a.ranges)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed % (size - len)
            })
            .collect();
        let ranges: Vec<std::ops::Range<u64>> = offsets.iter().map(|o| *o..*o + len).collect();
        let (mut seq, mut conc, mut multi, mut ours, mut curl) =
            (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..a.reps {
            // Each scenario starts on a warm connection (the HEAD for the size).
            let c = fresh()?;
            let rd = c.blob_reader(&r, digest.clone(), None);
            rd.size().await?;
            let t = Instant::now();
            for rg in &ranges {
                let b = rd.read_at(rg.start, len).await?;
                anyhow::ensure!(b[..] == data[rg.start as usize..rg.end as usize]);
            }
            seq.push(t.elapsed().as_secs_f64());

            let c = fresh()?;
            let rd = c.blob_reader(&r, digest.clone(), None);
            rd.size().await?;
            let t = Instant::now();
            let got =
                futures::future::try_join_all(ranges.iter().map(|rg| rd.read_at(rg.start, len)))
                    .await?;
            conc.push(t.elapsed().as_secs_f64());
            anyhow::ensure!(got
                .iter()
                .zip(&ranges)
                .all(|(b, rg)| b[..] == data[rg.start as usize..rg.end as usize]));

            let c = fresh()?;
            let rd = c.blob_reader(&r, digest.clone(), None);
            rd.size().await?;
            let t = Instant::now();
            let got = rd.read_ranges(&ranges).await?;
            multi.push(t.elapsed().as_secs_f64());
            anyhow::ensure!(got
                .iter()
                .zip(&ranges)
                .all(|(b, rg)| b[..] == data[rg.start as usize..rg.end as usize]));

            let c = fresh()?;
            let rd = c.blob_reader(&r, digest.clone(), Some(size));
            let t = Instant::now();
            let n = rd.copy_to(&mut tokio::io::sink()).await?;
            ours.push(t.elapsed().as_secs_f64());
            anyhow::ensure!(n == size);

            let out = std::process::Command::new("curl")
                .args([
                    "-s",
                    "-f",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{time_total}",
                    &format!("{base}/v2/bench/blob/blobs/{digest}"),
                ])
                .output()?;
            anyhow::ensure!(out.status.success(), "curl failed");
            curl.push(
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .replace(',', ".")
                    .parse::<f64>()?,
            );
        }
        let rtt = profile.rtt.as_secs_f64();
        let xfer = profile.transfer_secs(len * a.ranges as u64);
        println!(
            "profile {} (rtt {:?}, {} Mbit/s), {} reps, medians:",
            a.profile, profile.rtt, profile.rate_mbit, a.reps
        );
        println!("| scenario | median s | all runs s |");
        println!("|---|---|---|");
        let row = |name: &str, v: &Vec<f64>| {
            println!(
                "| {name} | {:.3} | {} |",
                median(v.clone()),
                v.iter()
                    .map(|x| format!("{x:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        row(
            &format!(
                "{} x {} KiB ranges, sequential single-range",
                a.ranges, a.range_kib
            ),
            &seq,
        );
        row(
            &format!(
                "{} x {} KiB ranges, concurrent single-range",
                a.ranges, a.range_kib
            ),
            &conc,
        );
        row(
            &format!("{} x {} KiB ranges, multi-range", a.ranges, a.range_kib),
            &multi,
        );
        row(
            &format!(
                "{} MiB blob whole, BlobReader::copy_to (sha256 verified)",
                a.blob_mb
            ),
            &ours,
        );
        row(&format!("{} MiB blob whole, curl", a.blob_mb), &curl);
        println!(
            "multi-range target: 3 RTT + transfer = {:.3} s (transfer alone {:.3} s)",
            3.0 * rtt + xfer,
            xfer
        );
        println!(
            "whole-blob ratio ours/curl: {:.3}",
            median(ours.clone()) / median(curl.clone())
        );
        Ok(())
    })
}
