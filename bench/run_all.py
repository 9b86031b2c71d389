"""Run every benchmark, then write docs/benchmarks.md and its PNG figures.

    .venv/bin/python bench/run_all.py            # the full suite, ~20 minutes on 2 cores
    .venv/bin/python bench/run_all.py --quick    # small N, one repeat: a smoke run (~2 min)

Phases (each also runs on its own, see bench/README.md):

1. ``rate``: bench/handoff_rate.py, run as a subprocess and its output parsed:
   requests/s and p50/p99 latency of fdhandoff (front + receiver) vs nginx
   ``proxy_pass`` -> uvicorn vs uvicorn alone;
2. ``memory``: bench/stack_memory.py for every stack x kind (SSE, WebSocket)
   x N idle connections: RSS of the whole stack;
3. ``broadcast``: bench/broadcast.py, one message to N SSE / WebSocket
   subscribers, latency until each (and the last) has it.

Progress (phase, step k/n, elapsed, ETA) goes to stderr.  Raw results are
saved as JSON under bench/results/ (git-ignored) after every step, so an
interrupted run keeps what it measured; ``--from-json FILE`` rewrites the
documents from such a file without measuring.  A full run writes
docs/benchmarks.md and docs/img/bench-*.png; ``--quick`` and ``--only`` write
under bench/results/ unless ``--out`` says otherwise, so a smoke run never
replaces the published figures.  Every server, client and temporary
directory is removed at the end, on errors and on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import _stacks as s  # noqa: E402
import broadcast as bc  # noqa: E402
import stack_memory  # noqa: E402

PHASES = ("rate", "memory", "broadcast")
#: Typographic signs for the documents (spelt out: ruff flags look-alike letters).
TIMES = "\N{MULTIPLICATION SIGN}"
DASH = "\N{EN DASH}"
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Settings:
    rate_repeats: int
    rate_seconds: float
    rate_latency_seconds: float
    memory_sizes: tuple[int, ...]
    memory_repeats: int
    broadcast_subscribers: int
    broadcast_messages: int
    broadcast_runs: int


FULL = Settings(
    rate_repeats=7,
    rate_seconds=3.0,
    rate_latency_seconds=2.0,
    memory_sizes=(1_000, 10_000, 50_000),
    memory_repeats=3,
    broadcast_subscribers=10_000,
    broadcast_messages=9,
    broadcast_runs=2,
)
QUICK = Settings(
    rate_repeats=1,
    rate_seconds=1.0,
    rate_latency_seconds=1.0,
    memory_sizes=(200, 1_000),
    memory_repeats=1,
    broadcast_subscribers=1_000,
    broadcast_messages=3,
    broadcast_runs=1,
)


# --- progress -------------------------------------------------------------------------------------


def clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60:d}:{seconds % 60:02d}"


def duration(seconds: float) -> str:
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


@dataclass
class Step:
    phase: str
    label: str
    estimate: float
    took: float | None = None


@dataclass
class Progress:
    """``[elapsed | ETA] phase k/n: step: detail`` on stderr.

    The ETA is the estimate of the steps left, scaled by how the finished
    steps compared with their own estimates.
    """

    steps: list[Step]
    started: float = field(default_factory=time.monotonic)
    current: int = -1
    step_started: float = 0.0
    last_print: float = 0.0
    tty: bool = field(default_factory=sys.stderr.isatty)

    def eta(self) -> float:
        done = [step for step in self.steps if step.took is not None]
        estimated = sum(step.estimate for step in done)
        factor = sum(step.took or 0.0 for step in done) / estimated if estimated else 1.0
        factor = min(3.0, max(0.5, factor))
        left = sum(step.estimate for step in self.steps if step.took is None)
        running = time.monotonic() - self.step_started if self.current >= 0 else 0.0
        return max(0.0, left * factor - running)

    def line(self, detail: str = "") -> str:
        step = self.steps[self.current]
        in_phase = [st for st in self.steps if st.phase == step.phase]
        k = in_phase.index(step) + 1
        head = (
            f"[{clock(time.monotonic() - self.started)} elapsed | ETA {clock(self.eta())}] "
            f"{step.phase} {k}/{len(in_phase)}: {step.label}"
        )
        return f"{head}: {detail}" if detail else head

    def start(self, index: int) -> None:
        self.current = index
        self.step_started = time.monotonic()
        self._print(self.line(), final=not self.tty)

    def update(self, detail: str) -> None:
        now = time.monotonic()
        if self.tty:
            self._print(self.line(detail), final=False)
        elif now - self.last_print > 15:
            self._print(self.line(detail), final=True)

    def finish(self, summary: str) -> None:
        step = self.steps[self.current]
        step.took = time.monotonic() - self.step_started
        self._print(self.line(f"{summary} ({step.took:.0f} s)"), final=True)

    def _print(self, text: str, *, final: bool) -> None:
        self.last_print = time.monotonic()
        if self.tty:
            sys.stderr.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()


# --- phase 1: handoff rate (bench/handoff_rate.py) ------------------------------------------------


_TABLE_ROW = re.compile(
    r"^(?P<name>\S+)\s+(?P<rps>\d+)\s+(?P<cpu>[\d.]+|nan)\s+(?P<p50>\d+|nan)\s+"
    r"(?P<p99>\d+|nan)\s+(?P<errors>\d+)\s*$"
)
_REPEAT = re.compile(r"^repeat (\d+)/(\d+): (.*)$")


def parse_rate(output: str) -> dict[str, Any]:
    servers: list[dict[str, Any]] = []
    repeats: dict[str, list[float]] = {}
    for line in output.splitlines():
        row = _TABLE_ROW.match(line)
        if row:
            servers.append(
                {
                    "name": row["name"],
                    "rps": float(row["rps"]),
                    "cpu_us": float(row["cpu"]),
                    "p50_us": float(row["p50"]),
                    "p99_us": float(row["p99"]),
                    "errors": int(row["errors"]),
                }
            )
            continue
        repeat = _REPEAT.match(line)
        if repeat:
            for part in repeat[3].split(", "):
                name, _, value = part.rpartition(" ")
                repeats.setdefault(name, []).append(float(value.removesuffix("/s")))
    if not servers:
        raise RuntimeError("bench/handoff_rate.py printed no result table")
    for server in servers:
        server["rps_repeats"] = repeats.get(server["name"], [])
    return {"servers": servers}


def run_rate(settings: Settings, progress: Progress, first: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(HERE / "handoff_rate.py"),
        "--repeats",
        str(settings.rate_repeats),
        "--seconds",
        f"{settings.rate_seconds:g}",
        "--latency-seconds",
        f"{settings.rate_latency_seconds:g}",
    ]
    progress.start(first)
    # A session of its own: Ctrl-C reaches it once, from us, and its own
    # cleanup (it stops its servers in finally blocks) is not interrupted.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        cwd=ROOT,
    )
    output: list[str] = []
    try:
        assert proc.stdout is not None
        step = first
        for line in proc.stdout:
            output.append(line)
            repeat = _REPEAT.match(line.strip())
            if repeat:
                progress.finish(repeat[3])
                step += 1
                if step < first + settings.rate_repeats:
                    progress.start(step)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    text = "".join(output)
    if proc.returncode != 0:
        raise RuntimeError(f"bench/handoff_rate.py exited {proc.returncode}:\n{text[-2000:]}")
    result = parse_rate(text)
    result["command"] = ".venv/bin/python " + " ".join(cmd[1:]).replace(str(ROOT) + "/", "")
    result["settings"] = {
        "repeats": settings.rate_repeats,
        "seconds": settings.rate_seconds,
        "latency_seconds": settings.rate_latency_seconds,
    }
    return result


# --- phase 2: memory of whole stacks --------------------------------------------------------------


def memory_estimate(stack: str, n: int) -> float:
    per_conn = 0.00035 if stack == "fdhandoff" else 0.001
    return 5.0 + n * per_conn


def aggregate_memory(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over the repeats of each (stack, kind, n)."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["stack"], run["kind"], run["n"]), []).append(run)
    points = []
    for (stack, kind, n), group in sorted(groups.items()):
        ok = [run for run in group if run.get("kib_per_conn") is not None]
        point: dict[str, Any] = {"stack": stack, "kind": kind, "n": n, "runs": len(ok)}
        if not ok:
            point.update(reached=0, kib_per_conn=None, rss_kib=None)
            point["why"] = "; ".join(run.get("why") or run.get("error", "?") for run in group)
            points.append(point)
            continue
        for key in (
            "reached",
            "rss_kib",
            "base_rss_kib",
            "pss_kib",
            "base_pss_kib",
            "kib_per_conn",
            "pss_kib_per_conn",
            "seconds",
        ):
            point[key] = statistics.median(run[key] for run in ok)
        point["kib_per_conn_range"] = [
            min(run["kib_per_conn"] for run in ok),
            max(run["kib_per_conn"] for run in ok),
        ]
        point["workers"] = ok[0]["workers"]
        point["processes"] = ok[0]["processes"]
        parts = {}
        for part in ok[0]["parts_kib"]:
            parts[part] = statistics.median(
                (run["parts_kib"][part] - run["base_parts_kib"][part]) / run["reached"]
                for run in ok
            )
        point["part_kib_per_conn"] = parts
        point["min_reached"] = min(run["reached"] for run in ok)
        whys = [run["why"] for run in group if run.get("why")]
        if whys:
            point["why"] = whys[0]
        points.append(point)
    return points


# --- phase 3: broadcast ---------------------------------------------------------------------------


BROADCAST_STACKS = (*s.STACKS, bc.FLOOR)


def broadcast_estimate(stack: str, n: int, messages: int) -> float:
    per_conn = {"fdhandoff": 0.0004, "nginx->uvicorn": 0.0011, bc.FLOOR: 0.0003}[stack]
    return 6.0 + n * per_conn + messages * (0.7 + n * 0.00005)


def broadcast_plan(settings: Settings) -> list[tuple[int, str, str]]:
    """(run, stack, kind), the runs of one stack and kind spread over the phase."""
    combos = [(stack, kind) for kind in s.KINDS for stack in s.STACKS]
    combos.append((bc.FLOOR, "sse"))
    return [(run, *combo) for run in range(settings.broadcast_runs) for combo in combos]


#: Seconds between phases: the kernel and the allocator give back what the
#: previous phase's connections and processes held (gigabytes after the
#: memory phase) before anything is timed again.
SETTLE_BETWEEN_PHASES = 5.0


# --- the documents --------------------------------------------------------------------------------


def machine_line(m: dict[str, str]) -> str:
    return (
        f"{m['nproc']} {TIMES} {m['cpu']}, Linux {m['kernel']}, Python {m['python']}, "
        f"uvloop {m['uvloop']}, httptools {m['httptools']}, nginx {m['nginx']}, "
        f"uvicorn {m['uvicorn']}"
    )


def fmt(value: float | None, spec: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return format(value, spec)


STACK_TITLES = {
    "fdhandoff": "fdhandoff (front → receiver)",
    "fdhandoff-serve": "fdhandoff front → `fdhandoff serve`, native handler",
    "fdhandoff-serve-asgi": "fdhandoff front → `fdhandoff serve`, the same ASGI app",
    "nginx->uvicorn": "nginx `proxy_pass` → uvicorn",
    "nginx->uvicorn-ka": "nginx `proxy_pass` → uvicorn, upstream keep-alive",
    "uvicorn": "uvicorn alone",
    bc.FLOOR: "floor: plain `sock.send` loop",
}
KIND_TITLES = {"sse": "SSE", "ws": "WebSocket"}


def rate_section(rate: dict[str, Any], caption: str, img: str) -> list[str]:
    rows = {row["name"]: row for row in rate["servers"]}
    settings = rate["settings"]
    out = [
        "## 1. Handoff rate and latency",
        "",
        "A tiny `GET`, a **new TCP connection per request**, from a Python epoll load client on "
        f"the same machine ({settings['seconds']:g} s per run with 8 concurrent connections for "
        f"throughput, then {settings['latency_seconds']:g} s of one connection at a time for "
        "latency). All servers run at once and are measured in turns, the order rotating per "
        f"repeat; figures are medians of **{plural(settings['repeats'], 'repeat')}**. CPU is "
        "utime + stime "
        "of the server processes (`/proc/PID/stat`) per request. fdhandoff (front → receiver) is "
        "`fdhandoff front` (pass mode) handing each connection to a minimal receiver built on "
        "`fdhandoff.fdpass` that answers a fixed 200 (`bench/_common.py`) and, like fdhandoff's "
        "own receiver, keeps the front's channel (one persistent UNIX connection, an ACK byte "
        "per handoff: [protocol](protocol.md)): what the front and the handoff cost. The two "
        "`fdhandoff serve` rows put fdhandoff's own receiver behind the same front: a native "
        "handler answering the same 200, and the very ASGI app uvicorn runs here. nginx "
        "(1 worker) proxies to the same uvicorn (uvloop + httptools, 1 worker) that is also "
        "measured alone. Access logs are off everywhere.",
        "",
        "| server | req/s | CPU µs / request | p50 latency | p99 latency | errors | req/s per "
        "repeat |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rate["servers"]:
        name = STACK_TITLES.get(row["name"], row["name"])
        if row["name"] == "fdhandoff":
            name = f"**{name}**"
        per_repeat = ", ".join(f"{v:,.0f}" for v in row["rps_repeats"])
        out.append(
            f"| {name} | {fmt(row['rps'])} | {fmt(row['cpu_us'], '.1f')} | "
            f"{fmt(row['p50_us'])} µs | {fmt(row['p99_us'])} µs | {row['errors']} | "
            f"{per_repeat} |"
        )
    out += [
        "",
        "The load client is a Python process on the same two cores; it needs about 60 µs of "
        "CPU per request itself, so the servers' CPU per request weighs on every req/s figure "
        "here. uvicorn alone is one process; fdhandoff is two (front and receiver), and its "
        "latency includes waking the second one.",
        "",
        caption,
        "",
    ]
    for mine in ("fdhandoff", "fdhandoff-serve", "fdhandoff-serve-asgi"):
        front = rows.get(mine)
        lines = []
        for name in ("nginx->uvicorn", "nginx->uvicorn-ka", "uvicorn"):
            other = rows.get(name)
            if not front or not other:
                continue
            lines.append(
                f"* vs {STACK_TITLES[name]}: **{front['rps'] / other['rps']:.2f}{TIMES}** the "
                f"requests per second at {front['cpu_us'] / other['cpu_us']:.2f}{TIMES} the "
                f"CPU per request; p50 latency {front['p50_us'] - other['p50_us']:+,.0f} µs, p99 "
                f"{front['p99_us'] - other['p99_us']:+,.0f} µs."
            )
        if lines:
            out += [f"Ratios for {STACK_TITLES[mine]}, measured in the same run:", "", *lines, ""]
    out += [f"![Requests per second and latency]({img})", ""]
    return out


def memory_section(memory: dict[str, Any], caption: str, img: str) -> list[str]:
    points = memory["points"]
    sizes = sorted({p["n"] for p in points})
    repeats = memory["settings"]["repeats"]
    combos = [(stack, kind) for stack in s.STACKS for kind in s.KINDS]
    by = {(p["stack"], p["kind"], p["n"]): p for p in points}
    repeat_text = (
        f"Figures are medians of **{repeats} runs** per point"
        if repeats > 1
        else "**One run per point** (no repeats)"
    )
    out = [
        "## 2. Memory of the whole stack vs idle connections",
        "",
        "N load-client connections each send a request — `GET /events` (SSE) or `GET /ws` with "
        "a WebSocket upgrade — read the response head (`200` event stream / `101`) and then "
        "stay open and silent. The figure is the **RSS of every process of the stack**, masters "
        "and workers, read from `/proc` 2 s after the last connection was established; KiB per "
        "connection is the growth over the same stack's RSS after start-up and a warm-up of a "
        f"few connections, divided by the connections held. {repeat_text}.",
        "",
        "* **fdhandoff**: `fdhandoff front` (`/` in pass mode, `/ws` in websocket mode: the front "
        "sends the `101`) + `fdhandoff serve` with a native handler (`bench/_apps.py`) that "
        "adds each SSE stream or WebSocket to a `Channel` and returns: no task per connection.",
        "* **nginx → uvicorn**: nginx `proxy_pass` (`proxy_buffering off`, the upgrade headers, "
        "1 h proxy timeouts, `listen ... reuseport`) to uvicorn over a UNIX socket; Starlette + "
        "sse-starlette (`EventSourceResponse` fed by one `asyncio.Queue` per subscriber) for "
        "SSE, a Starlette WebSocket endpoint on uvicorn's `websockets` implementation for "
        "WebSocket (`--ws-ping-interval 3600`: the load clients never answer pings, and "
        "websockets would otherwise close them after 40 s).",
        "* The machine caps every process at 20,000 open files: the load clients run in "
        f"processes of at most {s.PER_CLIENT:,} connections from their own 127.x.y.z addresses; "
        "the fdhandoff receiver and uvicorn get `--workers` (one fd per connection; one worker "
        f"per {s.CONNS_PER_APP_WORKER:,} connections, as the kernel spreads them unevenly); "
        "nginx holds two fds per proxied connection and gets a worker per "
        f"{s.FDS_PER_PROCESS // 2:,} connections with `worker_rlimit_nofile 20000`, "
        "`worker_connections 19000`.",
        "",
        "Total RSS of the stack (MiB) with N idle connections, and the processes it took:",
        "",
        "| stack | kind | " + " | ".join(f"N = {n:,}" for n in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for stack, kind in combos:
        cells = []
        for n in sizes:
            p = by.get((stack, kind, n))
            if p is None or not p.get("rss_kib"):
                cells.append(DASH)
                continue
            workers = ", ".join(f"{part} {count}" for part, count in p["workers"].items())
            reached = "" if p["min_reached"] >= n else f" (only {p['min_reached']:,} held)"
            cells.append(
                f"{p['rss_kib'] / 1024:,.0f} MiB{reached}<br>{p['processes']} processes "
                f"(workers: {workers})"
            )
        out.append(f"| {STACK_TITLES[stack]} | {KIND_TITLES[kind]} | " + " | ".join(cells) + " |")
    out += [
        "",
        "KiB per idle connection (RSS growth / connections; in brackets PSS growth, which "
        "counts pages shared between forked workers once):",
        "",
        "| stack | kind | " + " | ".join(f"N = {n:,}" for n in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for stack, kind in combos:
        cells = []
        for n in sizes:
            p = by.get((stack, kind, n))
            if p is None or p.get("kib_per_conn") is None:
                cells.append(DASH)
                continue
            text = f"{p['kib_per_conn']:.2f} ({p['pss_kib_per_conn']:.2f})"
            if stack == "fdhandoff":
                text = f"**{text}**"
            cells.append(text)
        out.append(f"| {STACK_TITLES[stack]} | {KIND_TITLES[kind]} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Where it goes, KiB per connection by part of the stack (RSS growth of that part's "
        "processes / connections):",
        "",
        "| stack | kind | " + " | ".join(f"N = {n:,}" for n in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for stack, kind in combos:
        cells = []
        for n in sizes:
            p = by.get((stack, kind, n))
            if p is None or not p.get("part_kib_per_conn"):
                cells.append(DASH)
                continue
            cells.append(
                ", ".join(f"{part} {v:.2f}" for part, v in sorted(p["part_kib_per_conn"].items()))
            )
        out.append(f"| {STACK_TITLES[stack]} | {KIND_TITLES[kind]} | " + " | ".join(cells) + " |")
    ratios = []
    for kind in s.KINDS:
        for n in sizes:
            mine = by.get(("fdhandoff", kind, n))
            theirs = by.get(("nginx->uvicorn", kind, n))
            if mine and theirs and mine.get("rss_kib") and theirs.get("rss_kib"):
                ratios.append(
                    f"{KIND_TITLES[kind]} at {n:,}: "
                    f"{theirs['rss_kib'] / mine['rss_kib']:.1f}{TIMES} less memory in total, "
                    f"{theirs['kib_per_conn'] / mine['kib_per_conn']:.0f}{TIMES} less per "
                    "connection"
                )
    out += ["", caption, ""]
    if ratios:
        out += ["fdhandoff vs nginx → uvicorn: " + "; ".join(ratios) + ".", ""]
    missing = [p for p in points if p.get("why")]
    for p in missing:
        out.append(
            f"* {STACK_TITLES[p['stack']]}, {KIND_TITLES[p['kind']]}, N = {p['n']:,}: {p['why']}"
        )
    if missing:
        out.append("")
    out += [f"![Memory of the whole stack]({img})", ""]
    return out


def subscribers(r: dict[str, Any]) -> str:
    if r["subscribers"] < r["n"]:
        return f"{r['subscribers']:,} of {r['n']:,}"
    return f"{r['subscribers']:,}"


def broadcast_section(results: list[dict[str, Any]], caption: str, img: str) -> list[str]:
    if not results:
        return []
    messages = results[0]["messages"]
    runs = results[0].get("runs", 1)
    over = f"{messages} messages" + (
        f" ({runs} runs with their own servers and subscribers, {messages // runs} messages each)"
        if runs > 1
        else ""
    )
    out = [
        "## 3. Broadcast latency",
        "",
        "N subscribers connect through the stack and wait; then the benchmark asks the server "
        "to publish one message (`GET /publish`, through the stack). The server takes "
        "`time.monotonic()` right before writing to its first subscriber and answers it; every "
        "subscriber (2 load-client processes, epoll) takes `time.monotonic()` right after the "
        "`recv` that brought the message. `CLOCK_MONOTONIC` is one clock for every process on "
        "Linux, so receipt minus publish is the delivery latency. Per message: the p50, p99 "
        "and maximum (the **last subscriber**) of the latencies; the table gives the **median "
        f"over {over}**, each run starting with a warm-up message that is not counted; a "
        "message is published once every subscriber had the previous one and 0.5 s passed. "
        "Messages are 64 bytes.",
        "",
        "* **fdhandoff**: `Channel.send` in the receiver (native SSE streams / WebSockets); the "
        "front is not on the path once a connection is handed off.",
        "* **nginx → uvicorn**: Starlette under uvicorn behind nginx, as usually built: SSE "
        "through sse-starlette with one `asyncio.Queue` per subscriber (publish puts the "
        "message in every queue), WebSocket by `await websocket.send_text()` over the set of "
        'connected sockets (the "connection manager" of the FastAPI documentation); nginx '
        "relays every message.",
        "* **floor**: not a server — the benchmark process itself accepts the SSE subscribers "
        "and sends with a plain `for sock in socks: sock.send(message)` loop: what the "
        "loopback TCP path and one Python call per subscriber cost on this machine.",
        "",
        "| stack | kind | subscribers | p50 | p99 | last subscriber | server's send loop | "
        "all delivered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = STACK_TITLES[r["stack"]]
        if r["stack"] == "fdhandoff":
            name = f"**{name}**"
        out.append(
            f"| {name} | {KIND_TITLES[r['kind']]} | {subscribers(r)} | "
            f"{fmt(r['p50_ms'], '.0f')} ms | {fmt(r['p99_ms'], '.0f')} ms | "
            f"**{fmt(r['max_ms'], '.0f')} ms** | {fmt(r['send_ms'], '.0f')} ms | "
            f"{'yes' if r['all_delivered'] else 'NO'} |"
        )
    out += [
        "",
        "The server's send loop is the time from the publish timestamp until the publishing "
        "code returned. With sse-starlette it only puts the message in every queue; the "
        "subscribers' tasks write it afterwards.",
        "",
    ]
    for r in results:
        if r.get("why"):
            out.append(
                f"* {STACK_TITLES[r['stack']]}, {KIND_TITLES[r['kind']]}: "
                f"{r['failed']:,} subscriber connections failed: {r['why']}"
            )
            out.append("")
    out += [caption, ""]
    by = {(r["stack"], r["kind"]): r for r in results}
    ratios = []
    for kind in s.KINDS:
        mine, theirs = by.get(("fdhandoff", kind)), by.get(("nginx->uvicorn", kind))
        if mine and theirs:
            ratios.append(
                f"{KIND_TITLES[kind]}: the last subscriber has the message "
                f"{theirs['max_ms'] / mine['max_ms']:.1f}{TIMES} sooner, the median one "
                f"{theirs['p50_ms'] / mine['p50_ms']:.1f}{TIMES} sooner"
            )
    if ratios:
        out += ["fdhandoff vs nginx → uvicorn: " + "; ".join(ratios) + ".", ""]
    spread = []
    for r in results:
        lasts = ", ".join(f"{row['max_ms']:.0f}" for row in r["rows"])
        spread.append(f"* {STACK_TITLES[r['stack']]}, {KIND_TITLES[r['kind']]}: {lasts}")
    out += ["Last-subscriber latency of every message (ms), to show the spread:", "", *spread, ""]
    out += [f"![Broadcast latency]({img})", ""]
    return out


def write_documents(results: dict[str, Any], md_path: Path, img_dir: Path) -> list[Path]:
    import plots  # noqa: PLC0415 - matplotlib only when drawing

    img_dir.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    m = results["machine"]
    machine = machine_line(m)
    command = results["command"]
    rel = os.path.relpath(img_dir, md_path.parent)
    written = []
    out = [
        "# Benchmarks",
        "",
        "fdhandoff against the usual way of serving the same thing in Python — nginx "
        "`proxy_pass` in front of uvicorn — and against uvicorn alone, all on one machine, in "
        "one run. Generated by `bench/run_all.py`; every figure below comes from the run of "
        f"{results['date']}.",
        "",
        "Rerun everything (progress, with an ETA, on stderr; this run took "
        f"{duration(results.get('seconds', 0))}):",
        "",
        "```sh",
        command,
        "```",
        "",
        "`--quick` is a smoke run (small N, one repeat) written under `bench/results/quick/`. "
        "Each benchmark also runs on its own: see [bench/README.md](../bench/README.md).",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPUs (`nproc`) | {m['nproc']} |",
        f"| CPU model (`/proc/cpuinfo`) | {m['cpu']} |",
        f"| memory | {m['memory']} |",
        f"| kernel | Linux {m['kernel']} |",
        f"| Python | {m['python']} |",
        f"| uvloop, httptools | {m['uvloop']}, {m['httptools']} |",
        f"| nginx | {m['nginx']} |",
        f"| uvicorn, starlette, sse-starlette, websockets | {m['uvicorn']}, {m['starlette']}, "
        f"{m['sse-starlette']}, {m['websockets']} |",
        "",
        "The load clients run on the same cores as the servers, and the machine is a shared "
        f"virtual machine: single figures move by 10{DASH}20 % from run to run. Ratios are "
        "measured side by side in the same run and move less.",
        "",
    ]
    if results.get("rate"):
        caption = (
            f"*Machine: {machine}. Rerun: `{command} --only rate`, or on its own: "
            f"`{results['rate']['command']}`.*"
        )
        name = "bench-rate.png"
        plots.rate(results["rate"], img_dir / name, f"{machine}. {command} --only rate")
        written.append(img_dir / name)
        out += rate_section(results["rate"], caption, f"{rel}/{name}")
    if results.get("memory"):
        caption = (
            f"*Machine: {machine}. Rerun: `{command} --only memory`; one point: "
            "`.venv/bin/python bench/stack_memory.py --stack 'nginx->uvicorn' --kind ws "
            "-n 10000`.*"
        )
        name = "bench-memory.png"
        plots.memory(
            results["memory"]["points"], img_dir / name, f"{machine}. {command} --only memory"
        )
        written.append(img_dir / name)
        out += memory_section(results["memory"], caption, f"{rel}/{name}")
    if results.get("broadcast"):
        caption = (
            f"*Machine: {machine}. Rerun: `{command} --only broadcast`; one line: "
            "`.venv/bin/python bench/broadcast.py --stack fdhandoff --kind ws -n 10000`.*"
        )
        name = "bench-broadcast.png"
        plots.broadcast(
            results["broadcast"], img_dir / name, f"{machine}. {command} --only broadcast"
        )
        written.append(img_dir / name)
        out += broadcast_section(results["broadcast"], caption, f"{rel}/{name}")
    errors = results.get("errors", [])
    if errors:
        out += ["## Steps that failed", ""]
        out += [f"* {error}" for error in errors]
        out.append("")
    md_path.write_text("\n".join(out))
    written.append(md_path)
    return written


# --- main -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every finally block stops what it started."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def save(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def run(args: argparse.Namespace, results: dict[str, Any], json_path: Path) -> None:
    settings = QUICK if args.quick else FULL
    phases = args.only or list(PHASES)
    steps: list[Step] = []
    if "rate" in phases:
        per_repeat = 4 * (settings.rate_seconds + settings.rate_latency_seconds + 0.6)
        steps += [
            Step("rate", f"handoff_rate.py repeat {k + 1}/{settings.rate_repeats}", per_repeat)
            for k in range(settings.rate_repeats)
        ]
        steps[0].estimate += 10  # start-up and warm-up
    memory_plan = [
        (repeat, n, stack, kind)
        for repeat in range(settings.memory_repeats)
        for n in settings.memory_sizes
        for stack in s.STACKS
        for kind in s.KINDS
    ]
    if "memory" in phases:
        steps += [
            Step(
                "memory",
                f"{stack} {KIND_TITLES[kind]} N={n:,}"
                + (
                    f" (run {repeat + 1}/{settings.memory_repeats})"
                    if settings.memory_repeats > 1
                    else ""
                ),
                memory_estimate(stack, n),
            )
            for repeat, n, stack, kind in memory_plan
        ]
    n_sub, messages = settings.broadcast_subscribers, settings.broadcast_messages
    if "broadcast" in phases:
        b_runs = settings.broadcast_runs
        steps += [
            Step(
                "broadcast",
                f"{stack} {KIND_TITLES[kind]} to {n_sub:,} subscribers"
                + (f" (run {run + 1}/{b_runs})" if b_runs > 1 else ""),
                broadcast_estimate(stack, n_sub, messages),
            )
            for run, stack, kind in broadcast_plan(settings)
        ]
    progress = Progress(steps)
    print(
        f"{len(steps)} steps, about {clock(sum(st.estimate for st in steps))} minutes; "
        f"results saved to {os.path.relpath(json_path, ROOT)}",
        file=sys.stderr,
    )
    index = 0

    def failed(what: str) -> None:
        text = traceback.format_exc(limit=3).strip().splitlines()[-1]
        results.setdefault("errors", []).append(f"{what}: {text}")
        progress.finish(f"FAILED: {text}")

    if "rate" in phases:
        try:
            results["rate"] = run_rate(settings, progress, index)
        except (RuntimeError, OSError, subprocess.SubprocessError):
            failed("rate")
        index += settings.rate_repeats
        save(results, json_path)
    if "memory" in phases:
        if "rate" in phases:
            time.sleep(SETTLE_BETWEEN_PHASES)
        memory_runs: list[dict[str, Any]] = []
        results["memory"] = {
            "settings": {"sizes": list(settings.memory_sizes), "repeats": settings.memory_repeats},
            "runs": memory_runs,
            "points": [],
        }
        for repeat, n, stack, kind in memory_plan:
            progress.start(index)
            index += 1
            try:
                point = stack_memory.measure(stack, kind, n, progress.update)
            except (RuntimeError, OSError) as exc:
                memory_runs.append({"stack": stack, "kind": kind, "n": n, "error": str(exc)[:300]})
                failed(f"memory {stack} {kind} N={n}")
            else:
                point["repeat"] = repeat
                memory_runs.append(point)
                per = point["kib_per_conn"]
                progress.finish(
                    f"{point['reached']:,} held, {point['rss_kib'] / 1024:,.0f} MiB, "
                    f"{fmt(per, '.2f')} KiB/connection"
                )
            results["memory"]["points"] = aggregate_memory(memory_runs)
            save(results, json_path)
    if "broadcast" in phases:
        if "memory" in phases or "rate" in phases:
            time.sleep(SETTLE_BETWEEN_PHASES)
        results["broadcast"] = []
        raw: dict[tuple[str, str], list[dict[str, Any]]] = {}
        results["broadcast_runs"] = []
        for _, stack, kind in broadcast_plan(settings):
            progress.start(index)
            index += 1
            try:
                if stack == bc.FLOOR:
                    result = bc.measure_floor(kind, n_sub, messages, progress.update)
                else:
                    result = bc.measure(stack, kind, n_sub, messages, progress.update)
            except (RuntimeError, OSError) as exc:
                failed(f"broadcast {stack} {kind}: {str(exc)[:200]}")
            else:
                results["broadcast_runs"].append(result)
                raw.setdefault((stack, kind), []).append(result)
                results["broadcast"] = [bc.combine(group) for group in raw.values()]
                progress.finish(
                    f"p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, "
                    f"last {result['max_ms']:.0f} ms"
                )
            save(results, json_path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small N, one repeat (smoke run)")
    parser.add_argument("--only", action="append", choices=PHASES, help="run only this phase")
    parser.add_argument(
        "--out", type=Path, help="directory for benchmarks.md and img/ (default: see above)"
    )
    parser.add_argument(
        "--from-json", type=Path, metavar="FILE", help="write the documents from saved results"
    )
    args = parser.parse_args()
    try:  # before minutes of measuring, not after
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        print("bench/run_all.py draws with matplotlib: run ./scripts/bench", file=sys.stderr)
        return 2
    if args.out is not None:
        md_path, img_dir = args.out / "benchmarks.md", args.out / "img"
    elif args.quick or args.only:
        sub = "quick" if args.quick else "partial"
        md_path, img_dir = RESULTS / sub / "benchmarks.md", RESULTS / sub / "img"
    else:
        md_path, img_dir = ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "img"
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        json_path = RESULTS / f"results-{stamp}{'-quick' if args.quick else ''}.json"
        results = {
            "date": datetime.date.today().isoformat(),
            "quick": args.quick,
            "command": "./scripts/bench" + (" --quick" if args.quick else ""),
            "machine": s.machine(),
        }
        started = time.monotonic()
        try:
            with sigterm_as_interrupt():
                run(args, results, json_path)
        except KeyboardInterrupt:
            print("\ninterrupted: everything started was stopped", file=sys.stderr)
            save(results, json_path)
            return 130
        results["seconds"] = time.monotonic() - started
        save(results, json_path)
    for path in write_documents(results, md_path, img_dir):
        print(os.path.relpath(path, Path.cwd()), file=sys.stderr)
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
