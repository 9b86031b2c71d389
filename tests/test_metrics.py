"""Prometheus metrics: the text rendering, and a real receiver serving them."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from fdhandoff import fdpass, message
from fdhandoff.metrics import Metrics, parse_address
from handoff_receiver import (
    FrontProcess,
    TestReceiver,
    fronts_fixture,  # noqa: F401  (fixture)
    http_exchange,
    receivers_fixture,  # noqa: F401  (fixture)
    sockdir_fixture,  # noqa: F401  (fixture)
)

HANDLER = """
async def handler(handoff):
    await handoff.respond(200, [("Content-Type", "text/plain")], b"ok\\n")
"""


def test_render_lists_declared_counters_at_zero_and_labelled_series() -> None:
    metrics = Metrics("x_")
    metrics.counter("hits_total", "Hits.")
    metrics.counter("errors_total", "Errors.")
    metrics.gauge("open", "Open things.", lambda: 3)
    metrics.inc("hits_total", format="scgi")
    metrics.inc("hits_total", 2, format='we"ird\\')
    text = metrics.render().decode()
    assert "# TYPE x_hits_total counter" in text
    assert 'x_hits_total{format="scgi"} 1' in text
    assert 'x_hits_total{format="we\\"ird\\\\"} 2' in text
    assert "x_errors_total 0" in text
    assert "x_open 3" in text
    assert metrics.value("hits_total", format="scgi") == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9100", ("127.0.0.1", 9100)), ("[::1]:80", ("::1", 80))],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9100", "host:", ":80", "h:99999", "h:x"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="metrics"):
        parse_address(text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        body: bytes = reply.read()
        return body.decode()


def test_receiver_counts_handoffs_and_errors(tmp_path: Path) -> None:
    (tmp_path / "mhandler.py").write_text(HANDLER)
    path = tmp_path / "r.sock"
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fdhandoff", "serve", "mhandler:handler",
         "--interface", "handoff", "--bind", f"unix:{path}", "--metrics", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(2):
            client, ours = socket.socketpair()
            with socket.socket(socket.AF_UNIX) as unix:
                unix.connect(str(path))
                scgi = message.encode_scgi(
                    [("SCGI", "1"), ("REQUEST_METHOD", "GET"), ("REQUEST_URI", "/")]
                )
                fdpass.send_fd(unix, scgi, ours.fileno())
                ours.close()
                unix.settimeout(10)
                assert unix.recv(1) == b""  # taken
            client.settimeout(10)
            assert client.recv(100).startswith(b"HTTP/1.1 200 OK")
            client.close()
        with socket.socket(socket.AF_UNIX) as unix:
            unix.connect(str(path))
            unix.sendall(b"not a handoff")
            unix.settimeout(10)
            assert unix.recv(1) == b""
        text = ""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = _scrape(port)
            if 'reason="invalid"} 1' in text:
                break
            time.sleep(0.1)
        assert 'fdhandoff_receiver_handoffs_total{format="scgi"} 2' in text
        assert 'fdhandoff_receiver_handoff_errors_total{reason="invalid"} 1' in text
        assert "fdhandoff_receiver_accepting 1" in text
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
        assert refused.value.code == 404
        assert refused.value.headers["Date"].endswith(" GMT")  # RFC 9110 §6.6.1
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.headers["Date"].endswith(" GMT")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_front_counts_outcomes(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers()
    port = _free_port()
    front = fronts(
        f"/fd=unix:{receiver.path}",
        config=f'[[route]]\nprefix = "/x"\nbackend = "unix:{receiver.path}"\n'
        f'[metrics]\naddress = "127.0.0.1:{port}"\n',
    )
    request = b"GET /fd/a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    assert http_exchange(front, request)[0] == 200
    assert http_exchange(front, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 404
    text = ""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = _scrape(port)
        if 'outcome="404"} 1' in text and 'outcome="handed_off"} 1' in text:
            break
        time.sleep(0.1)
    assert 'fdhandoff_front_requests_total{outcome="handed_off"} 1' in text
    assert 'fdhandoff_front_requests_total{outcome="404"} 1' in text
    assert "fdhandoff_front_accepting 1" in text
    # This receiver takes one handoff per connection (as nginx fd_pass
    # receivers do): no channel is kept.
    assert "fdhandoff_front_channels 0" in text


def test_check_rejects_a_bad_metrics_address(tmp_path: Path) -> None:
    config = tmp_path / "f.toml"
    config.write_text(
        '[[listen]]\naddress = "127.0.0.1:0"\n[[route]]\nprefix = "/"\n'
        'backend = "unix:/run/x.sock"\n[metrics]\naddress = "localhost"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "fdhandoff", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "metrics.address" in done.stderr
