"""Handoffs their sender gave up on are not run (both engines).

The fdhandoff front closes the UNIX connection when handoffs stay unread for
``timeouts.handoff`` and answers their clients 503 itself.  The kernel still
delivers what it had sent, so a receiver that was blocked or overloaded reads
them later: running them would answer those clients a second time and apply
requests they were told had failed.  A handoff read after its sender closed
is therefore closed unanswered, when the description says the sender waits
(``HANDOFF_CHANNEL``, 1 or 0); nginx ``fd_pass`` (no such header) closes
after every sendmsg, and its handoffs run.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from fdhandoff import fdpass, scgi
from fdhandoff.message import CHANNEL_ACK
from fdhandoff.receiver import Handoff, Options
from fdhandoff.receiver.listeners import Bind
from test_receiver_support import (
    ReceiverThread,
    SyncReceiverThread,
    echo,
    front_headers,
    read_all,
    read_to_fin,
    sync_echo,
    tcp_pair,
)

ENGINES = ["asyncio", "uvloop", "sync"]


def receiver(engine: str, path: str) -> ReceiverThread | SyncReceiverThread:
    """The listener is bound now; the engine starts when the result is entered."""
    if engine == "sync":
        return SyncReceiverThread(sync_echo, [Bind(path)])
    return ReceiverThread(echo, [Bind(path)], loop=engine)


def description(target: str, offer: str | None) -> bytes:
    extra = {} if offer is None else {"HANDOFF_CHANNEL": offer}
    return scgi.encode(front_headers("GET", target, **extra))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("offer", "runs"),
    [("1", False), ("0", False), (None, True)],
    ids=["channel", "no-channel", "nginx"],
)
def test_a_handoff_read_after_its_sender_closed_is_not_run(
    tmp_path: Path,
    engine: str,
    offer: str | None,
    runs: bool,
    no_fd_leak: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = str(tmp_path / "r.sock")
    client, server_side = tcp_pair()
    with ExitStack() as stack:
        made = receiver(engine, path)
        # Connected, sent and closed while the receiver is not reading yet:
        # the sender had given up before the read.
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(path)
            fdpass.send_fd(conn, description("/late", offer), server_side.fileno())
        server_side.close()
        with caplog.at_level(logging.WARNING, logger="fdhandoff.receiver"):
            running = stack.enter_context(made)
            answer = read_to_fin(client, timeout=5)
        if runs:
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"GET /late 0\n")
        else:
            assert answer == b"", "the client got a second answer"
            assert any(
                "GET /late read after its sender closed" in r.message for r in caplog.records
            )
            if isinstance(running, ReceiverThread):
                assert running.receiver is not None
                counted = running.receiver.metrics.value("handoff_errors_total", reason="abandoned")
                assert counted == 1
    client.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_blocked_receiver_runs_what_it_read_before_the_sender_gave_up_and_nothing_after(
    tmp_path: Path, loop: str, no_fd_leak: None
) -> None:
    """The front's scenario: a handler blocks the event loop past the front's
    deadline; the front gives up on the handoff queued behind it and closes
    the channel.  The blocked handoff is answered, the queued one never runs."""
    path = str(tmp_path / "r.sock")
    blocking = threading.Event()
    ran: list[str] = []

    async def handler(handoff: Handoff) -> None:
        ran.append(handoff.path or "")
        if handoff.path == "/block":
            blocking.set()
            time.sleep(0.5)  # a sync call, a GC pause: the whole loop waits
        await echo(handoff)

    one, one_server = tcp_pair()
    two, two_server = tcp_pair()
    with ReceiverThread(handler, [Bind(path)], loop=loop), socket.socket(socket.AF_UNIX) as conn:
        conn.connect(path)
        fdpass.send_fd(conn, description("/block", "1"), one_server.fileno())
        assert blocking.wait(5)
        fdpass.send_fd(conn, description("/queued", "1"), two_server.fileno())
        one_server.close()
        two_server.close()
        conn.settimeout(5)
        assert conn.recv(1) == CHANNEL_ACK  # /block was taken
        conn.close()  # the deadline of /queued passed: the front gives up
        assert read_all(one, timeout=5).endswith(b"GET /block 0\n")
        assert read_to_fin(two, timeout=5) == b""
    assert ran == ["/block"]
    one.close()
    two.close()


#: A description no request can be made of: no REQUEST_METHOD (answered 400).
UNUSABLE = scgi.encode([("CONTENT_LENGTH", "0"), ("SCGI", "1"), ("REQUEST_URI", "/x")])


@pytest.mark.parametrize(
    ("first", "answer"),
    [(description("/late", "1"), b""), (UNUSABLE, b"HTTP/1.1 400")],
    ids=["abandoned", "unusable"],
)
def test_a_handoff_that_never_runs_frees_its_place_under_max_connections(
    tmp_path: Path, first: bytes, answer: bytes, no_fd_leak: None
) -> None:
    """Reading a handoff counts towards --max-connections (accepting pauses);
    one dropped or refused at once must not leave accepting paused."""
    path = str(tmp_path / "r.sock")
    client, server_side = tcp_pair()
    with ExitStack() as stack:
        made = ReceiverThread(echo, [Bind(path)], Options(max_connections=1))
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(path)
            fdpass.send_fd(conn, first, server_side.fileno())
        server_side.close()
        stack.enter_context(made)
        assert read_to_fin(client, timeout=5).startswith(answer)
        client.close()
        fresh, fresh_server = tcp_pair()
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(path)
            fdpass.send_fd(conn, description("/next", "0"), fresh_server.fileno())
            fresh_server.close()
            assert read_all(fresh, timeout=5).endswith(b"GET /next 0\n")
        fresh.close()
