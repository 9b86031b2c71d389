"""Access-log lines: written before the lingering close, timed to the end of the response."""

from __future__ import annotations

import logging
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from fdhandoff.receiver import Handoff, Options
from fdhandoff.receiver.listeners import Bind
from test_receiver_asgi_support import ASGIReceiver, ResponseReader, hand_over
from test_receiver_support import (
    ReceiverThread,
    SyncReceiverThread,
    front_headers,
    send_scgi,
    split_response,
    tcp_pair,
)

BODY = b"ok\n"


async def answer(handoff: Handoff) -> None:
    await handoff.respond(200, [("Content-Type", "text/plain")], BODY)


def answer_sync(handoff: Any) -> None:
    handoff.respond(200, [("Content-Type", "text/plain")], BODY)


def _response(path: str, target: str) -> socket.socket:
    """Hand a connection over and read its whole response; the client stays open."""
    client, server_side = tcp_pair()
    send_scgi(path, front_headers("GET", target), server_side)
    client.settimeout(10)
    data = b""
    while not data.endswith(BODY):
        more = client.recv(4096)
        assert more, f"closed before the response ended: {data!r}"
        data += more
    assert split_response(data)[0] == 200
    return client


def _access_lines(caplog: pytest.LogCaptureFixture, target: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "fdhandoff.access" and f'"GET {target}"' in r.getMessage()
    ]


def _wait_lines(caplog: pytest.LogCaptureFixture, target: str) -> list[str]:
    deadline = time.monotonic() + 10
    while not (lines := _access_lines(caplog, target)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return lines


def test_line_of_a_response_lingering_at_shutdown_is_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, no_fd_leak: None
) -> None:
    """The client keeps its end open: the lingering close is cut by the shutdown."""
    caplog.set_level(logging.INFO, logger="fdhandoff")
    path = str(tmp_path / "r.sock")
    receiver = ReceiverThread(answer, [Bind(path)], Options(grace=0.2)).start()
    client = _response(path, "/lingering")
    receiver.stop()
    client.close()
    lines = _access_lines(caplog, "/lingering")
    assert len(lines) == 1, caplog.text
    assert re.search(r'"GET /lingering" 200 \d+ 0\.\d{3}s', lines[0])


@pytest.mark.parametrize("flavour", ["asyncio", "sync"])
def test_duration_ends_with_the_response_not_the_lingering_close(
    tmp_path: Path, flavour: str, caplog: pytest.LogCaptureFixture, no_fd_leak: None
) -> None:
    caplog.set_level(logging.INFO, logger="fdhandoff")
    path = str(tmp_path / "r.sock")
    server: ReceiverThread | SyncReceiverThread = (
        ReceiverThread(answer, [Bind(path)])
        if flavour == "asyncio"
        else SyncReceiverThread(answer_sync, [Bind(path)])
    )
    with server:
        client = _response(path, "/timed")
        time.sleep(1.0)  # the receiver lingers meanwhile, waiting for our FIN
        client.close()
        lines = _wait_lines(caplog, "/timed")
    assert len(lines) == 1, caplog.text
    duration = float(re.findall(r" (\d+\.\d+)s", lines[0])[-1])
    assert duration < 0.5, lines[0]


def test_asgi_refused_websocket_is_timed_to_its_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, no_fd_leak: None
) -> None:
    """A WebSocket closed before accepting is answered 403, then lingers."""

    async def refuse(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.close"})

    caplog.set_level(logging.INFO, logger="fdhandoff")
    path = str(tmp_path / "r.sock")
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ]
    with ASGIReceiver(refuse, path):
        client = hand_over(path, "GET", "/refused", headers)
        assert ResponseReader(client).read().status == 403
        time.sleep(1.0)
        client.close()
        lines = _wait_lines(caplog, "/refused")
    assert len(lines) == 1, caplog.text
    duration = float(re.findall(r" (\d+\.\d+)s", lines[0])[-1])
    assert duration < 0.5, lines[0]
