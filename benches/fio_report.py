#!/usr/bin/env python3
"""Turn the fio suite's lines (FIO-META, FIO-ROW, FIO-CACHE, from
benches/fio-suite.sh) into results.json, table.md and two SVG charts.

Ratios are ublk-ploop over a peer measured in the same run and guest: the
median over the runs, with the lowest and highest run beside it. The peer
column is rublk's loop target on the flat states (the same ublk crossing)
and a qcow2 overlay served by qemu-nbd on the 2-layer stack.
Targets, printed as PASS/MISS, never hidden: >= 1.0x loop with direct I/O
on 4k rows, >= 0.9x on 1 MiB rows; and >= 0.95x rublk on the 4k random
write rows of an allocated image. Beside each rate: the p99 latency, and
for user-space servers the CPU time per I/O.

usage: fio_report.py LOG [--out DIR]
"""
import json
import statistics
import sys
from pathlib import Path

DEVICES = ["ublk", "ublk-alt", "rublk", "qemu-nbd", "loop-dio", "loop-buf"]
LABEL = {"ublk": "ublk-ploop", "ublk-alt": "ublk-ploop (other build)", "rublk": "rublk loop", "qemu-nbd": "qemu-nbd qcow2", "loop-dio": "loop (direct I/O)", "loop-buf": "loop (buffered)"}
PEERS = ("rublk", "qemu-nbd")


def parse(lines):
    meta, rows, cache = {}, [], []
    for line in lines:
        # The guest console may prefix or wrap lines: find the marker.
        for tag in ("FIO-META ", "FIO-ROW ", "FIO-CACHE "):
            at = line.find(tag)
            if at < 0:
                continue
            try:
                value = json.loads(line[at + len(tag):].strip())
            except json.JSONDecodeError:
                continue
            if tag == "FIO-META ":
                meta = value
            elif tag == "FIO-ROW ":
                rows.append(value)
            else:
                cache.append(value)
    return meta, rows, cache


def target(workload):
    return 0.9 if "1m" in workload else 1.0


def peer_target(state, workload):
    """In-place 4k writes against another ublk server paying the same
    crossing (the in-place writes issue)."""
    return 0.95 if state == "allocated" and workload.startswith("randwrite-4k") else None


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(rows):
    """One entry per (state, queues, workload): per device the median
    IOPS/bandwidth/p99, and the per-run ratio ublk / loop."""
    cells = {}
    for r in rows:
        key = (r["state"], r["queues"], r["workload"])
        cells.setdefault(key, {}).setdefault(r["device"], {})[r["run"]] = r
    out = []
    for (state, queues, workload), by_dev in cells.items():
        entry = {"state": state, "queues": queues, "workload": workload}
        for dev, runs in by_dev.items():
            vals = list(runs.values())
            entry[dev] = {
                "iops": statistics.median(v["iops"] for v in vals),
                "bw": statistics.median(v["bw"] for v in vals),
                "p99_us": statistics.median(v["p99_us"] for v in vals),
                "cpu_us": median_or_none(v.get("cpu_us") for v in vals),
                "runs": len(vals),
            }
        for base in ("loop-dio", "loop-buf", "ublk-alt") + PEERS:
            if "ublk" in by_dev and base in by_dev:
                ratios = [by_dev["ublk"][run]["iops"] / by_dev[base][run]["iops"]
                          for run in by_dev["ublk"] if run in by_dev[base] and by_dev[base][run]["iops"] > 0]
                if ratios:
                    entry["vs_" + base] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        d = entry.get("vs_loop-dio")
        if d:
            entry["target"] = target(workload)
            entry["meets_target"] = d["median"] >= entry["target"]
        peer = next((p for p in PEERS if "vs_" + p in entry), None)
        if peer:
            entry["peer"] = peer
            t = peer_target(state, workload)
            if t is not None:
                entry["peer_target"] = t
                entry["meets_peer_target"] = entry["vs_" + peer]["median"] >= t
        out.append(entry)
    order = {"allocated": 0, "fresh": 1, "stack": 2}
    out.sort(key=lambda e: (order.get(e["state"], 9), e["queues"], e["workload"].startswith(("read-", "write-")), e["workload"]))
    return out


def fmt_rate(workload, dev):
    if dev is None:
        return "-"
    if "1m" in workload:
        return f"{dev['bw'] / 1e6:.0f} MB/s"
    return f"{dev['iops'] / 1000:.1f}k"


def fmt_ratio(r):
    if not r:
        return "-"
    if r["max"] - r["min"] < 0.005:
        return f"{r['median']:.2f}"
    return f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})"


def fmt_p99(dev):
    return "-" if dev is None else f"{dev['p99_us']:.0f}"


def fmt_cpu(dev):
    return "-" if dev is None or dev.get("cpu_us") is None else f"{dev['cpu_us']:.0f}"


def table(meta, summary, cache):
    lines = [
        f"Kernel {meta.get('kernel', '?')}, data path {meta.get('data_path', '?')}, {meta.get('size_mb', '?')} MiB disk, "
        f"{meta.get('runs', '?')} runs of {meta.get('secs', '?')} s per cell, fio io_uring direct=1. "
        "Rates are medians over the runs; ratios are ublk-ploop / the other device per run: median (lowest–highest). "
        "Peer: rublk's loop target on the flat states, a qcow2 overlay (1 MiB clusters) served by qemu-nbd on the stack. "
        "p99 in µs; CPU: the server's µs of CPU per I/O (emulated CPUs: compare within a row).",
        "",
        "| state | q | workload | ublk-ploop | peer | loop dio | loop buf | ÷ peer | ÷ loop dio | ÷ loop buf "
        "| p99 ublk / peer / dio | CPU/IO ublk / peer | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        w = e["workload"]
        peer = e.get("peer")
        p = e.get(peer) if peer else None
        verdicts = []
        if "meets_target" in e:
            verdicts.append(f"{'PASS' if e['meets_target'] else 'MISS'} (≥{e['target']:.1f} dio)")
        if "meets_peer_target" in e:
            verdicts.append(f"{'PASS' if e['meets_peer_target'] else 'MISS'} (≥{e['peer_target']:.2f} {peer})")
        peer_rate = f"{fmt_rate(w, p)} {peer}" if p else "-"
        lines.append(
            f"| {e['state']} | {e['queues']} | {w} | {fmt_rate(w, e.get('ublk'))} | {peer_rate} | {fmt_rate(w, e.get('loop-dio'))} | "
            f"{fmt_rate(w, e.get('loop-buf'))} | {fmt_ratio(e.get('vs_' + peer) if peer else None)} | {fmt_ratio(e.get('vs_loop-dio'))} | "
            f"{fmt_ratio(e.get('vs_loop-buf'))} | {fmt_p99(e.get('ublk'))} / {fmt_p99(p)} / {fmt_p99(e.get('loop-dio'))} | "
            f"{fmt_cpu(e.get('ublk'))} / {fmt_cpu(p)} | {', '.join(verdicts) or '-'} |"
        )
    if cache:
        # The device's own cache is read from /proc/meminfo's Buffers, which
        # not every kernel counts block-device pages in: shown only when seen.
        with_dev = any(c["device_cached"] for c in cache)
        lines += [
            "",
            "Page cache after a buffered 1 MiB read of half the disk through the device (backing file: `fincore`):",
            "",
            "| device | backing file in page cache |" + (" device in page cache |" if with_dev else "") + " working set |",
            "|---|---|" + ("---|" if with_dev else "") + "---|",
        ]
        for c in cache:
            dev = f" {c['device_cached'] / 2**20:.1f} MiB |" if with_dev else ""
            lines.append(f"| {LABEL.get(c['device'], c['device'])} | {c['file_cached'] / 2**20:.1f} MiB |{dev} {c['working_set'] / 2**20:.0f} MiB |")
    return "\n".join(lines) + "\n"


def svg_ratios(summary, meta):
    """Bars of ublk-ploop / loop-dio per row, whiskers for the run spread,
    the target line at each row."""
    rows = [e for e in summary if "vs_loop-dio" in e]
    bar_h, gap, left, width = 16, 6, 260, 420
    top = 40
    height = top + len(rows) * (bar_h + gap) + 40
    scale = max([1.6] + [e["vs_loop-dio"]["max"] * 1.05 for e in rows])
    x = lambda v: left + v / scale * width
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 40}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<text x="10" y="18" font-size="13">ublk-ploop ÷ loop (direct I/O), {meta.get("kernel", "")}, {meta.get("data_path", "")}</text>']
    for v in [0.5 * i for i in range(int(scale / 0.5) + 1)]:
        out.append(f'<line x1="{x(v):.1f}" y1="{top - 6}" x2="{x(v):.1f}" y2="{height - 30}" stroke="#ddd"/>')
        out.append(f'<text x="{x(v):.1f}" y="{height - 16}" text-anchor="middle">{v:.1f}×</text>')
    for i, e in enumerate(rows):
        y = top + i * (bar_h + gap)
        r = e["vs_loop-dio"]
        color = "#4a8" if e.get("meets_target") else "#d64"
        out.append(f'<text x="{left - 6}" y="{y + bar_h - 4}" text-anchor="end">{e["state"]} q{e["queues"]} {e["workload"]}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{x(r["median"]) - left:.1f}" height="{bar_h}" fill="{color}"/>')
        out.append(f'<line x1="{x(r["min"]):.1f}" y1="{y + bar_h / 2}" x2="{x(r["max"]):.1f}" y2="{y + bar_h / 2}" stroke="#222"/>')
        t = x(e["target"])
        out.append(f'<line x1="{t:.1f}" y1="{y - 2}" x2="{t:.1f}" y2="{y + bar_h + 2}" stroke="#00f" stroke-dasharray="3,2"/>')
        out.append(f'<text x="{x(r["median"]) + 4:.1f}" y="{y + bar_h - 4}">{r["median"]:.2f}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def svg_cache(cache):
    bar_h, gap, left, width, top = 20, 10, 150, 380, 40
    height = top + len(cache) * 2 * (bar_h + gap) + 30
    ws = max([c["working_set"] for c in cache] + [1])
    x = lambda v: left + v / ws * width
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 120}" height="{height}" font-family="sans-serif" font-size="11">',
           '<text x="10" y="18" font-size="13">Page cache after a buffered read of the working set</text>']
    y = top
    for c in cache:
        out.append(f'<text x="{left - 6}" y="{y + bar_h - 5}" text-anchor="end">{LABEL.get(c["device"], c["device"])}</text>')
        bars = [("backing file", c["file_cached"], "#d64")]
        if any(x["device_cached"] for x in cache):
            bars.insert(0, ("device", c["device_cached"], "#48c"))
        for what, value, color in bars:
            out.append(f'<rect x="{left}" y="{y}" width="{max(x(value) - left, 1):.1f}" height="{bar_h}" fill="{color}"/>')
            out.append(f'<text x="{max(x(value), left + 1) + 4:.1f}" y="{y + bar_h - 5}">{what}: {value / 2**20:.0f} MiB</text>')
            y += bar_h + gap
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv):
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else Path(".")
    meta, rows, cache = parse(Path(argv[0]).read_text(errors="replace").splitlines())
    if not rows:
        print(f"fio_report: no FIO-ROW lines in {argv[0]}", file=sys.stderr)
        return 1
    summary = summarise(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "cache": cache, "rows": rows}, indent=1) + "\n")
    md = table(meta, summary, cache)
    (out / "table.md").write_text(md)
    (out / "ratios.svg").write_text(svg_ratios(summary, meta))
    if cache:
        (out / "page-cache.svg").write_text(svg_cache(cache))
    print(md)
    alt = [e for e in summary if "vs_ublk-alt" in e]
    if alt:
        print("A/B: this build ÷ the other build (UBLK_PLOOP_FIO_ALT_BIN), CPU µs per I/O this / other:")
        for e in alt:
            print(f"  {e['state']} q{e['queues']} {e['workload']}: {fmt_ratio(e['vs_ublk-alt'])}  cpu {fmt_cpu(e.get('ublk'))} / {fmt_cpu(e.get('ublk-alt'))}")
    missed = [e for e in summary if e.get("meets_target") is False]
    print(f"targets: {sum(1 for e in summary if e.get('meets_target'))} met, {len(missed)} missed"
          + "".join(f"\n  MISS {e['state']} q{e['queues']} {e['workload']}: {e['vs_loop-dio']['median']:.2f} < {e['target']}" for e in missed))
    peer_rows = [e for e in summary if "meets_peer_target" in e]
    if peer_rows:
        print(f"peer targets: {sum(1 for e in peer_rows if e['meets_peer_target'])} met, {sum(1 for e in peer_rows if not e['meets_peer_target'])} missed"
              + "".join(f"\n  MISS {e['state']} q{e['queues']} {e['workload']}: {e['vs_' + e['peer']]['median']:.2f} < {e['peer_target']} {e['peer']}"
                        for e in peer_rows if not e["meets_peer_target"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
