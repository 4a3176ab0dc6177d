#!/usr/bin/env python3
"""Report of bench/podman.sh: OUT/PROFILE.md (medians per image and mode) and
OUT/PROFILE.svg (stacked pull and run bars), from OUT/PROFILE.jsonl and
OUT/PROFILE-meta.json.

    bench/podman_report.py docs/benchmarks/podman wan
"""

import json
import statistics
import sys
from pathlib import Path

MODES = ["ordinary", "stargz-store", "stargz-store-zstd"]
COLORS = {"pull": "#4878d0", "run": "#ee854a"}


def load(out: Path, profile: str):
    records = [json.loads(l) for l in (out / f"{profile}.jsonl").read_text().splitlines() if l]
    meta = json.loads((out / f"{profile}-meta.json").read_text())
    return records, meta


def summarize(records):
    images = []
    for r in records:
        if r["image"] not in images:
            images.append(r["image"])
    rows = []
    for img in images:
        for mode in MODES:
            ok = [r for r in records if r["image"] == img and r["mode"] == mode and "error" not in r]
            bad = [r for r in records if r["image"] == img and r["mode"] == mode and "error" in r]
            if not ok and not bad:
                continue
            med = lambda k: statistics.median(r[k] for r in ok) if ok else float("nan")
            rows.append({
                "image": img, "mode": mode, "n": len(ok), "failed": len(bad),
                "pull": med("pull_s"), "run": med("run_s"),
                "total": statistics.median(r["pull_s"] + r["run_s"] for r in ok) if ok else float("nan"),
                "max": max((r["pull_s"] + r["run_s"] for r in ok), default=float("nan")),
                "mb": med("bytes") / 1e6 if ok else float("nan"),
                "lazy": max((r.get("lazy_layers", 0) for r in ok), default=0),
            })
    return rows


def markdown(meta, rows, svg_name):
    lines = [
        f"# Podman start-up with stargz-store: profile `{meta['profile']}`",
        "",
        "`podman pull` + `podman run` until the workload's line, ordinary vs through "
        "stargz-store, every sample from an empty Podman storage and a new store; median "
        "of the samples (worst total in brackets).",
        "",
        f"- Link: {meta['link']}",
        f"- Machine: {meta['machine']}; kernel {meta['kernel']}",
        f"- {meta['podman']}; {meta['store']} ({meta['binaries']})",
        f"- Load (/proc/loadavg) at start: `{meta['load_start']}`, at end: `{meta['load_end']}`",
        f"- Started {meta['started']}; command: `{meta['command']}`",
        "",
        f"![pull and run]({svg_name})",
        "",
        "| image | mode | pull s | run s | total s (worst) | MB from registry until the line | layers from the store | n |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        n = f"{r['n']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        lines.append(
            f"| {r['image']} | {r['mode']} | {r['pull']:.2f} | {r['run']:.2f} | "
            f"{r['total']:.2f} ({r['max']:.2f}) | {r['mb']:.1f} | {r['lazy']} | {n} |"
        )
    return "\n".join(lines) + "\n"


def svg(rows, title):
    bar, gap, left, top, width = 22, 10, 210, 40, 560
    h = top + len(rows) * (bar + gap) + 60
    scale = max((r["total"] for r in rows if r["total"] == r["total"]), default=1.0) or 1.0
    px = lambda s: s / scale * width
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 120}" height="{h}" '
        'font-family="DejaVu Sans, sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="10" y="22" font-size="14" font-weight="bold">{title}</text>',
    ]
    y = top
    for r in rows:
        out.append(f'<text x="{left - 8}" y="{y + bar * 0.7}" text-anchor="end">{r["image"]} {r["mode"]}</text>')
        x = left
        for part in ("pull", "run"):
            w = px(r[part]) if r[part] == r[part] else 0
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar}" fill="{COLORS[part]}"/>')
            x += w
        out.append(f'<text x="{x + 6:.1f}" y="{y + bar * 0.7}">{r["total"]:.2f} s</text>')
        y += bar + gap
    y += 10
    for i, part in enumerate(("pull", "run")):
        out.append(f'<rect x="{left + i * 120}" y="{y}" width="14" height="14" fill="{COLORS[part]}"/>')
        out.append(f'<text x="{left + i * 120 + 20}" y="{y + 12}">{part} s</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    out, profile = Path(sys.argv[1]), sys.argv[2]
    records, meta = load(out, profile)
    rows = summarize(records)
    (out / f"{profile}.svg").write_text(
        svg(rows, f"podman pull + run until the line, {profile} profile (median)"))
    (out / f"{profile}.md").write_text(markdown(meta, rows, f"{profile}.svg"))
    print(out / f"{profile}.md")
    print(out / f"{profile}.svg")
    if any(r["failed"] for r in rows):
        sys.exit("some samples failed; see the table")


if __name__ == "__main__":
    main()
