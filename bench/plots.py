"""PNG figures of the benchmark results (matplotlib, Agg backend: no display needed).

Each function takes the part of bench/run_all.py's results it draws and a
path; ``python bench/plots.py RESULTS.json OUTDIR`` redraws all of them from
a saved run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.patches
import matplotlib.pyplot as plt
import matplotlib.ticker

#: One colour per stack, the same in every figure.
COLOURS = {
    "fdhandoff": "#1b7837",
    "fdhandoff-serve": "#5aae61",
    "fdhandoff-serve-asgi": "#a6dba0",
    "nginx->uvicorn": "#b2182b",
    "nginx->uvicorn-ka": "#ef8a62",
    "uvicorn": "#2166ac",
    "floor": "#777777",
}
LABELS = {
    "fdhandoff": "fdhandoff\n(front → receiver)",
    "fdhandoff-serve": "front →\nfdhandoff serve",
    "fdhandoff-serve-asgi": "front →\nserve (ASGI)",
    "nginx->uvicorn": "nginx → uvicorn",
    "nginx->uvicorn-ka": "nginx → uvicorn\n(upstream keep-alive)",
    "uvicorn": "uvicorn alone",
    "floor": "floor: plain\nsock.send loop",
}
KIND_NAMES = {"sse": "SSE", "ws": "WebSocket"}
DPI = 110


def _label_bars(ax: Any, bars: Any, fmt: str) -> None:
    for bar in bars:
        height = bar.get_height()
        if math.isnan(height):
            continue
        ax.annotate(
            fmt.format(height),
            (bar.get_x() + bar.get_width() / 2, height),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )


def rate(result: dict[str, Any], path: Path, caption: str) -> None:
    """Requests/s bars and p50/p99 latency bars, one group per server."""
    servers = [row["name"] for row in result["servers"]]
    rows = {row["name"]: row for row in result["servers"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5))
    x = range(len(servers))
    bars = left.bar(
        x,
        [rows[s]["rps"] for s in servers],
        color=[COLOURS.get(s, "#999999") for s in servers],
    )
    _label_bars(left, bars, "{:,.0f}")
    left.set_xticks(list(x), [LABELS.get(s, s) for s in servers], fontsize=8)
    left.set_ylabel("requests per second (higher is better)")
    left.set_title("Throughput: new connection per tiny GET")
    width = 0.38
    p50 = right.bar(
        [i - width / 2 for i in x],
        [rows[s]["p50_us"] for s in servers],
        width,
        label="p50",
        color=[COLOURS.get(s, "#999999") for s in servers],
    )
    p99 = right.bar(
        [i + width / 2 for i in x],
        [rows[s]["p99_us"] for s in servers],
        width,
        label="p99",
        color=[COLOURS.get(s, "#999999") for s in servers],
        alpha=0.45,
        hatch="//",
    )
    _label_bars(right, p50, "{:,.0f}")
    _label_bars(right, p99, "{:,.0f}")
    right.set_xticks(list(x), [LABELS.get(s, s) for s in servers], fontsize=8)
    right.set_ylabel("latency, µs (lower is better)")
    right.set_title("Latency, one connection at a time: p50 (solid), p99 (hatched)")
    for ax in (left, right):
        ax.spines[["top", "right"]].set_visible(False)
        ax.margins(y=0.12)
    fig.text(0.01, 0.01, caption, fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def memory(points: list[dict[str, Any]], path: Path, caption: str) -> None:
    """Total RSS vs connections (one line per stack and kind) and KiB per connection."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for point in points:
        series.setdefault((point["stack"], point["kind"]), []).append(point)
    # Of a stack's lines, the highest gets its end label above, the others below.
    tops: dict[str, float] = {}
    for (stack, _), pts in series.items():
        for p in pts:
            if p["reached"] and p["n"] == max(q["n"] for q in pts):
                tops[stack] = max(tops.get(stack, 0.0), p["rss_kib"])
    for (stack, kind), pts in sorted(series.items()):
        pts = sorted((p for p in pts if p["reached"]), key=lambda p: p["reached"])
        style = "-" if kind == "sse" else "--"
        marker = "o" if kind == "sse" else "s"
        left.plot(
            [p["reached"] for p in pts],
            [p["rss_kib"] / 1024 for p in pts],
            style,
            marker=marker,
            color=COLOURS.get(stack, "#999999"),
            label=f"{LABELS.get(stack, stack).splitlines()[0]}, {KIND_NAMES[kind]}",
        )
        if pts:
            last = pts[-1]
            left.annotate(
                f"{last['rss_kib'] / 1024:,.0f} MiB",
                (last["reached"], last["rss_kib"] / 1024),
                xytext=(-6, 6 if last["rss_kib"] >= tops.get(stack, 0.0) else -12),
                textcoords="offset points",
                ha="right",
                fontsize=8,
                color=COLOURS.get(stack, "#999999"),
            )
    left.set_xlabel("idle connections held")
    left.set_ylabel("RSS of every process of the stack, MiB")
    left.set_title("Whole-stack memory (front + receiver / nginx + uvicorn)")
    left.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    left.legend(fontsize=8)
    left.grid(alpha=0.3)

    sizes = sorted({p["n"] for p in points})
    keys = sorted(series)
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        stack, kind = key
        by_n = {p["n"]: p for p in series[key]}
        values = [
            by_n[n]["kib_per_conn"] if n in by_n and by_n[n]["kib_per_conn"] else math.nan
            for n in sizes
        ]
        bars = right.bar(
            [j + (i - (len(keys) - 1) / 2) * width for j in range(len(sizes))],
            values,
            width,
            color=COLOURS.get(stack, "#999999"),
            alpha=1.0 if kind == "sse" else 0.55,
            hatch="" if kind == "sse" else "//",
            label=f"{LABELS.get(stack, stack).splitlines()[0]}, {KIND_NAMES[kind]}",
        )
        _label_bars(right, bars, "{:.1f}")
    right.set_xticks(range(len(sizes)), [f"{n:,}" for n in sizes])
    right.set_xlabel("idle connections")
    right.set_ylabel("KiB per connection (RSS growth / connections)")
    right.set_title("Memory per idle connection (lower is better)")
    right.legend(fontsize=8, loc="upper left", ncol=2)
    right.margins(y=0.3)
    for ax in (left, right):
        ax.spines[["top", "right"]].set_visible(False)
    fig.text(0.01, 0.01, caption, fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def broadcast(results: list[dict[str, Any]], path: Path, caption: str) -> None:
    """p50 / p99 / last-subscriber latency bars per stack, one panel per kind."""
    kinds = [k for k in ("sse", "ws") if any(r["kind"] == k for r in results)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.8), squeeze=False)
    metrics = (
        ("p50_ms", "p50", 1.0, ""),
        ("p99_ms", "p99", 0.6, ""),
        ("max_ms", "last subscriber", 0.35, "//"),
    )
    for ax, kind in zip(axes[0], kinds, strict=True):
        rows = [r for r in results if r["kind"] == kind]
        width = 0.8 / len(metrics)
        for i, (key, name, alpha, hatch) in enumerate(metrics):
            bars = ax.bar(
                [j + (i - 1) * width for j in range(len(rows))],
                [r[key] for r in rows],
                width,
                color=[COLOURS.get(r["stack"], "#999999") for r in rows],
                alpha=alpha,
                hatch=hatch,
                label=name,
            )
            _label_bars(ax, bars, "{:.0f}")
        ax.set_xticks(range(len(rows)), [LABELS.get(r["stack"], r["stack"]) for r in rows])
        ax.set_ylabel("ms after publish (lower is better)")
        subscribers = max((r["subscribers"] for r in rows), default=0)
        ax.set_title(f"{KIND_NAMES[kind]}: one message to {subscribers:,} subscribers")
        ax.legend(
            handles=[
                matplotlib.patches.Patch(facecolor="#555555", alpha=alpha, hatch=hatch, label=name)
                for _, name, alpha, hatch in metrics
            ],
            fontsize=8,
        )
        ax.spines[["top", "right"]].set_visible(False)
        ax.margins(y=0.12)
    fig.text(0.01, 0.01, caption, fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def main() -> int:
    results = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    if results.get("rate"):
        rate(results["rate"], out / "bench-rate.png", "")
    if results.get("memory"):
        memory(results["memory"]["points"], out / "bench-memory.png", "")
    if results.get("broadcast"):
        broadcast(results["broadcast"], out / "bench-broadcast.png", "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
