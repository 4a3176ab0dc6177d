//! Turns a run's records into the Markdown report (medians, p95, bytes, peak RSS,
//! multiples of the physical limit, target checks) and the stacked-bar PNG chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

use crate::run::{Meta, Record, MODES};

pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Nearest-rank 95th percentile.
pub fn p95(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((0.95 * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// Medians of one image × mode.
#[derive(Clone, Debug)]
pub struct Summary {
    pub image: String,
    pub mode: String,
    pub n: usize,
    pub pull: f64,
    pub create: f64,
    pub run: f64,
    pub total: f64,
    pub total_p95: f64,
    pub bytes: f64,
    pub bytes_pull: f64,
    pub bytes_create: f64,
    pub rss_ours: Option<f64>,
    pub rss_ref: Option<f64>,
}

fn mode_rank(m: &str) -> usize {
    MODES.iter().position(|x| x.name == m).unwrap_or(usize::MAX)
}

pub fn summarize(records: &[Record]) -> Vec<Summary> {
    let mut groups: BTreeMap<(String, usize, String), Vec<&Record>> = BTreeMap::new();
    let order: Vec<String> = {
        let mut o: Vec<String> = Vec::new();
        for r in records {
            if !o.contains(&r.image) {
                o.push(r.image.clone());
            }
        }
        o
    };
    for r in records.iter().filter(|r| r.ok()) {
        let ix = order.iter().position(|i| i == &r.image).unwrap_or(0);
        groups
            .entry((format!("{ix:03}"), mode_rank(&r.mode), r.mode.clone()))
            .or_default()
            .push(r);
    }
    groups
        .into_values()
        .map(|rs| {
            let f = |g: &dyn Fn(&Record) -> f64| rs.iter().map(|r| g(r)).collect::<Vec<_>>();
            let opt = |g: &dyn Fn(&Record) -> Option<u64>| {
                let v: Vec<f64> = rs
                    .iter()
                    .filter_map(|r| g(r))
                    .map(|k| k as f64 / 1024.0)
                    .collect();
                (!v.is_empty()).then(|| v.iter().cloned().fold(0.0, f64::max))
            };
            Summary {
                image: rs[0].image.clone(),
                mode: rs[0].mode.clone(),
                n: rs.len(),
                pull: median(&f(&|r| r.pull_s)),
                create: median(&f(&|r| r.create_s)),
                run: median(&f(&|r| r.run_s)),
                total: median(&f(&|r| r.total_s())),
                total_p95: p95(&f(&|r| r.total_s())),
                bytes: median(&f(&|r| r.bytes as f64)),
                bytes_pull: median(&f(&|r| r.bytes_pull as f64)),
                bytes_create: median(&f(&|r| r.bytes_create as f64)),
                rss_ours: opt(&|r| r.rss_ours_kib),
                rss_ref: opt(&|r| r.rss_ref_kib),
            }
        })
        .collect()
}

/// Peak RSS of the daemon that served the mode's layers (none for legacy).
fn serving_rss(x: &Summary) -> Option<f64> {
    match MODES
        .iter()
        .find(|m| m.name == x.mode)
        .map(|m| m.snapshotter)
    {
        Some("stargz") => x.rss_ours,
        Some("stargz-ref") => x.rss_ref,
        _ => None,
    }
}

/// The physical limit of an image in seconds, when it can be computed.
pub fn limit(meta: &Meta, sums: &[Summary], image: &str) -> Option<(f64, f64, f64, f64)> {
    let need = meta.needed.get(image)?;
    let local_run = sums
        .iter()
        .find(|s| s.image == image && s.mode == "legacy")?
        .run;
    let transfer = need.bytes as f64 * 8.0 / (meta.rate_mbit as f64 * 1e6);
    // Manifest, config, then every layer's TOC in parallel.
    let trips = 3.0 * meta.rtt_ms as f64 / 1000.0;
    Some((transfer + trips + local_run, transfer, trips, local_run))
}

pub fn load(out_dir: &Path, profile: &str) -> Result<(Meta, Vec<Record>)> {
    let meta_path = out_dir.join(format!("{profile}-meta.json"));
    let meta: Meta = serde_json::from_slice(
        &fs::read(&meta_path).with_context(|| format!("reading {}", meta_path.display()))?,
    )?;
    let res = out_dir.join(format!("{profile}.jsonl"));
    let text = fs::read_to_string(&res).with_context(|| format!("reading {}", res.display()))?;
    let records = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<Vec<Record>, _>>()?;
    Ok((meta, records))
}

/// Writes `PROFILE.md` and `PROFILE.png` into `out_dir`; returns their paths.
pub fn report(out_dir: &Path, profile: &str) -> Result<(PathBuf, PathBuf)> {
    let (meta, records) = load(out_dir, profile)?;
    let sums = summarize(&records);
    let png = out_dir.join(format!("{profile}.png"));
    chart(&png, &meta, &sums)?;
    let md = out_dir.join(format!("{profile}.md"));
    fs::write(&md, markdown(&meta, &records, &sums, &png))?;
    Ok((md, png))
}

fn markdown(meta: &Meta, records: &[Record], sums: &[Summary], png: &Path) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# HelloBench-style start-up: profile `{}`\n",
        meta.profile
    );
    let _ = writeln!(
        s,
        "Link: {} ms round trip, {} Mbit/s (TUN delay line + tbf, registry in its own network namespace). \
         {} sample(s) per image and mode; median (p95 of the total). Started {}.\n",
        meta.rtt_ms, meta.rate_mbit, meta.samples, meta.started
    );
    let _ = writeln!(s, "- Machine: {}", meta.machine);
    let _ = writeln!(s, "- Kernel: {}", meta.kernel);
    let _ = writeln!(
        s,
        "- Load (/proc/loadavg) at start: `{}`, at end: `{}`",
        meta.load_start, meta.load_end
    );
    for v in &meta.versions {
        let _ = writeln!(s, "- {v}");
    }
    let _ = writeln!(s, "- Command: `{}`\n", meta.command);
    if let Some(name) = png.file_name() {
        let _ = writeln!(
            s,
            "![stacked pull/create/run]({})\n",
            name.to_string_lossy()
        );
    }
    let _ = writeln!(
        s,
        "| image | mode | pull s | create s | run s | total s (p95) | MB from registry | daemon peak RSS MB | × limit | n |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let fmt_opt = |v: Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "–".into());
    for x in sums {
        let lim = limit(meta, sums, &x.image)
            .map(|(l, ..)| format!("{:.2}", x.total / l))
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} ({:.2}) | {:.1} | {} | {} | {} |",
            x.image,
            x.mode,
            x.pull,
            x.create,
            x.run,
            x.total,
            x.total_p95,
            x.bytes / 1e6,
            fmt_opt(serving_rss(x)),
            lim,
            x.n
        );
    }
    let _ = writeln!(s, "\n## Physical limit\n");
    let _ = writeln!(
        s,
        "Bytes the workload needs (compressed prioritized files before the prefetch landmark of an \
         optimized image, every layer's TOC and footer, manifest, config) at the link rate, plus three \
         round trips (manifest, config, the layers' TOCs in parallel), plus the workload's run time on \
         a fully local image (legacy mode's run phase).\n"
    );
    let _ = writeln!(
        s,
        "| image | needed MB | from | transfer s | round trips s | local run s | limit s |"
    );
    let _ = writeln!(s, "|---|---:|---|---:|---:|---:|---:|");
    let mut images: Vec<&str> = Vec::new();
    for x in sums {
        if !images.contains(&x.image.as_str()) {
            images.push(&x.image);
        }
    }
    for img in &images {
        match (meta.needed.get(*img), limit(meta, sums, img)) {
            (Some(n), Some((l, t, r, run))) => {
                let _ = writeln!(
                    s,
                    "| {img} | {:.2} | {} ({} layers) | {t:.2} | {r:.2} | {run:.2} | {l:.2} |",
                    n.bytes as f64 / 1e6,
                    n.source,
                    n.layers
                );
            }
            _ => {
                let _ = writeln!(s, "| {img} | – | – | – | – | – | – |");
            }
        }
    }
    let _ = writeln!(s, "\n## Targets\n");
    let total = |img: &str, m: &str| {
        sums.iter()
            .find(|x| x.image == img && x.mode == m)
            .map(|x| x.total)
    };
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    for img in &images {
        let (opt, ref_opt, label) = match (total(img, "estargz"), total(img, "ref-estargz")) {
            (Some(a), Some(b)) => (Some(a), Some(b), "estargz vs ref-estargz"),
            _ => (
                total(img, "reference-converted"),
                total(img, "ref-reference-converted"),
                "reference-converted vs ref-reference-converted (our optimize unavailable)",
            ),
        };
        if let (Some(a), Some(b)) = (opt, ref_opt) {
            let r = a / b;
            let _ = writeln!(
                s,
                "- {img}: optimized, ours / reference = {r:.2} (target ≤ 0.7: {}) [{label}]",
                verdict(r <= 0.7)
            );
        }
        if let (Some(a), Some((l, ..))) = (opt, limit(meta, sums, img)) {
            let r = a / l;
            let _ = writeln!(
                s,
                "- {img}: optimized, ours = {r:.2}× the physical limit (target ≤ 1.2: {})",
                verdict(r <= 1.2)
            );
        }
        if let (Some(a), Some(b)) = (total(img, "estargz-noopt"), total(img, "ref-estargz-noopt")) {
            let r = a / b;
            let _ = writeln!(
                s,
                "- {img}: unoptimized, ours {a:.2} s / reference {b:.2} s = {r:.2} (target ≤ 0.6: {})",
                verdict(r <= 0.6)
            );
        }
        if let (Some(a), Some(b)) = (total(img, "estargz-learned"), opt) {
            let r = a / b;
            let _ = writeln!(
                s,
                "- {img}: learned (second pull of the unoptimized image) {a:.2} s / optimized {b:.2} s = {r:.2} (target ≤ 1.2: {})",
                verdict(r <= 1.2)
            );
        }
        if let (Some(a), Some(b)) = (total(img, "legacy-stargz"), total(img, "legacy")) {
            let r = a / b;
            let _ = writeln!(
                s,
                "- {img}: plain gzip image, through ours {a:.2} s / containerd's own pull {b:.2} s = {r:.2} (target ≤ 0.9: {})",
                verdict(r <= 0.9)
            );
        }
    }
    let _ = writeln!(
        s,
        "\n## Where the bytes went (MB from the registry, median)\n"
    );
    let _ = writeln!(
        s,
        "| image | mode | during pull | during create | during run | total |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|");
    for x in sums {
        let run = (x.bytes - x.bytes_pull - x.bytes_create).max(0.0);
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            x.image,
            x.mode,
            x.bytes_pull / 1e6,
            x.bytes_create / 1e6,
            run / 1e6,
            x.bytes / 1e6
        );
    }
    let problems: Vec<&Record> = records.iter().filter(|r| !r.ok()).collect();
    if !problems.is_empty() || !meta.notes.is_empty() {
        let _ = writeln!(s, "\n## Skipped, failed, notes\n");
        for n in &meta.notes {
            let _ = writeln!(s, "- {n}");
        }
        for r in problems {
            let why = r
                .skipped
                .clone()
                .or_else(|| r.error.clone())
                .unwrap_or_default();
            let first = why
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(300)
                .collect::<String>();
            let _ = writeln!(
                s,
                "- {} / {} (sample {}): {}",
                r.image, r.mode, r.sample, first
            );
        }
    }
    s
}

fn chart(path: &Path, meta: &Meta, sums: &[Summary]) -> Result<()> {
    let font = fs::read(FONT).with_context(|| format!("reading {FONT} (fonts-dejavu-core)"))?;
    // plotters keeps registered fonts for the whole process.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow!("{FONT} is not a usable font"))?;
    let rows = sums.len().max(1);
    let height = (120 + rows * 28) as u32;
    let root = BitMapBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let max = sums.iter().map(|s| s.total).fold(0.0, f64::max).max(0.1) * 1.3;
    let labels: Vec<String> = sums
        .iter()
        .map(|s| format!("{} / {}", s.image, s.mode))
        .collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Container start-up, profile {} ({} ms, {} Mbit/s), median of {}",
                meta.profile, meta.rtt_ms, meta.rate_mbit, meta.samples
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(260)
        .build_cartesian_2d(0.0..max, -0.5..(rows as f64 - 0.5))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows)
        .y_label_formatter(&|y| {
            let i = y.round();
            if (y - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("seconds")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    type Span = fn(&Summary) -> (f64, f64);
    let phases: [(&str, RGBColor, Span); 3] = [
        ("pull", RGBColor(66, 114, 196), |s| (0.0, s.pull)),
        ("create", RGBColor(237, 125, 49), |s| {
            (s.pull, s.pull + s.create)
        }),
        ("run", RGBColor(112, 173, 71), |s| {
            (s.pull + s.create, s.pull + s.create + s.run)
        }),
    ];
    for (name, color, span) in phases {
        chart
            .draw_series(sums.iter().enumerate().map(|(i, s)| {
                let (a, b) = span(s);
                let y = i as f64;
                Rectangle::new([(a, y - 0.35), (b, y + 0.35)], color.filled())
            }))
            .map_err(|e| anyhow!("{e}"))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_nearest_rank_p95() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(p95(&v), 19.0);
        assert_eq!(p95(&[5.0, 1.0]), 5.0);
        assert_eq!(p95(&[7.0]), 7.0);
    }
}
