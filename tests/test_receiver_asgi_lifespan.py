"""ASGI lifespan: startup before any request, shutdown at exit, apps without lifespan tolerated."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fdhandoff.errors import ConfigError
from fdhandoff.receiver import Options
from fdhandoff.receiver.listeners import close_listener
from test_receiver_asgi_support import ASGIReceiver, hand_over, read_one

LOOPS = ["asyncio", "uvloop"]


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "asgi.sock")


def recording_app(events: list[str], *, fail_startup: bool = False) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await asyncio.sleep(0.1)  # a slow startup: requests must wait for it
        if fail_startup:
            raise RuntimeError("database unreachable")
        events.append("startup")
        yield {"resource": "ready"}
        await asyncio.sleep(0.05)
        events.append("shutdown")

    async def page(request: Request) -> Response:
        events.append("request")
        return PlainTextResponse(request.state.resource)

    return Starlette(routes=[Route("/", page)], lifespan=lifespan)


@pytest.mark.parametrize("loop", LOOPS)
def test_startup_before_requests_and_shutdown_after(sock_path: str, loop: str) -> None:
    events: list[str] = []
    with ASGIReceiver(recording_app(events), sock_path, loop=loop):
        assert events == ["startup"]
        client = hand_over(sock_path)
        assert read_one(client).body == b"ready"
        client.close()
    assert events == ["startup", "request", "shutdown"]


@pytest.mark.parametrize("loop", LOOPS)
def test_without_a_startup_call_the_first_handoff_runs_it(sock_path: str, loop: str) -> None:
    """No engine hook: startup runs before the first request, shutdown as the loop ends."""
    events: list[str] = []
    with ASGIReceiver(recording_app(events), sock_path, loop=loop, lifespan=False):
        assert events == []
        clients = [hand_over(sock_path) for _ in range(3)]  # all wait for the one startup
        assert [read_one(c).body for c in clients] == [b"ready"] * 3
        for client in clients:
            client.close()
    assert events == ["startup", "request", "request", "request", "shutdown"]


def test_startup_failure_is_reported(sock_path: str) -> None:
    events: list[str] = []
    receiver = ASGIReceiver(recording_app(events, fail_startup=True), sock_path)
    with pytest.raises(ConfigError, match="database unreachable"):
        receiver.start()
    for listener in receiver.listeners:
        close_listener(listener)
    assert events == []


def test_startup_failure_without_a_startup_call_answers_503(
    sock_path: str, no_fd_leak: None
) -> None:
    events: list[str] = []
    with ASGIReceiver(recording_app(events, fail_startup=True), sock_path, lifespan=False):
        for _ in range(2):
            client = hand_over(sock_path)
            assert read_one(client).status == 503
            client.close()
    assert events == []


@pytest.mark.parametrize("how", ["raises", "returns"])
def test_apps_without_lifespan_support_are_served(
    sock_path: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            if how == "raises":
                raise ValueError(f"unknown scope type {scope['type']}")
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"plain"})

    caplog.set_level(logging.DEBUG, "fdhandoff.receiver.asgi")
    with ASGIReceiver(app, sock_path):
        client = hand_over(sock_path)
        assert read_one(client).body == b"plain"
        client.close()
    if how == "raises":
        assert "does not support the lifespan protocol" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_shutdown_failure_is_logged(sock_path: str, caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.failed", "message": "could not flush"})

    with ASGIReceiver(app, sock_path):
        pass
    assert "could not flush" in caplog.text


def test_stuck_shutdown_is_cut_after_the_grace(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    cancelled = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    started = time.monotonic()
    with ASGIReceiver(app, sock_path, Options(grace=0.2)):
        pass
    assert time.monotonic() - started < 20
    assert cancelled == [True]
    assert "did not end within" in caplog.text


LIFESPAN_APP = """
import pathlib

MARKS = pathlib.Path(__file__).parent / "marks"

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                MARKS.write_text("started\\n")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                with MARKS.open("a") as marks:
                    marks.write("stopped\\n")
                await send({"type": "lifespan.shutdown.complete"})
                return
"""


def test_serve_runs_startup_before_any_handoff_and_shutdown_at_exit(tmp_path: Path) -> None:
    (tmp_path / "lifeapp.py").write_text(LIFESPAN_APP)
    marks = tmp_path / "marks"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fdhandoff", "serve", "lifeapp:app",
         "--bind", f"unix:{tmp_path / 'r.sock'}"],
        cwd=tmp_path,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not marks.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marks.read_text() == "started\n"  # no handoff was ever sent
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert marks.read_text() == "started\nstopped\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
