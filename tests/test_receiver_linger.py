"""Closing a connection after the response: at once when the client has nothing to send,
lingering (reading and dropping) when it may still send, so no reset destroys the answer."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from fdhandoff.receiver import Handoff
from fdhandoff.receiver.listeners import Bind
from fdhandoff.receiver.sync import Handoff as SyncHandoff
from fdhandoff.websocket import Opcode, encode_frame
from test_receiver_support import (
    ReceiverThread,
    SyncReceiverThread,
    front_headers,
    read_all,
    read_to_fin,
    send_scgi,
    split_response,
    tcp_pair,
)


async def answer_without_reading(handoff: Handoff) -> None:
    await handoff.respond(200, [("Content-Type", "text/plain")], b"ok\n")


def _closed_by_peer(client: socket.socket) -> bool:
    """After EOF: does the peer still hold its end?  A closed end resets new data."""
    client.sendall(b"more")
    time.sleep(0.2)
    try:
        client.sendall(b"more")  # the first was answered with a reset if nobody reads
    except (ConnectionResetError, BrokenPipeError):
        return True
    return False


def test_no_body_and_nothing_pending_closes_at_once(tmp_path: Path, no_fd_leak: None) -> None:
    path = str(tmp_path / "r.sock")
    with ReceiverThread(answer_without_reading, [Bind(path)]):
        client, server_side = tcp_pair()
        with client:
            send_scgi(path, front_headers("GET", "/"), server_side)
            assert read_all(client).endswith(b"\r\n\r\nok\n")
            assert _closed_by_peer(client)  # no 2 s linger held the socket


def test_unread_body_lingers_so_the_answer_survives(tmp_path: Path, no_fd_leak: None) -> None:
    path = str(tmp_path / "r.sock")
    with ReceiverThread(answer_without_reading, [Bind(path)]):
        client, server_side = tcp_pair()
        with client:
            headers = front_headers("POST", "/", [("Content-Length", "100000")])
            send_scgi(path, headers, server_side)
            client.sendall(b"x" * 1000)  # the body keeps coming after the answer
            client.settimeout(10)
            head = client.recv(65536)
            assert head.startswith(b"HTTP/1.1 200")
            client.sendall(b"x" * 1000)
            assert not _closed_by_peer(client)  # still read and dropped: no reset


async def small_body_only(handoff: Handoff) -> None:
    if handoff.path == "/ws":
        await handoff.websocket()
    await handoff.respond(200, [], await handoff.read_body(1000))


def sync_small_body_only(handoff: SyncHandoff) -> None:
    if handoff.path == "/ws":
        handoff.websocket()
    handoff.respond(200, [], handoff.read_body(1000))


_UPGRADE_V8 = [
    ("Host", "x"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Version", "8"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
]


@pytest.mark.parametrize("flavour", ["asyncio", "sync"])
@pytest.mark.parametrize(
    ("target", "headers", "status"),
    [
        ("/body", [("Content-Length", "100000")], 413),  # read_body(1000) refuses it
        ("/ws", _UPGRADE_V8, 426),  # handoff.websocket() refuses the version
    ],
)
def test_error_answer_with_client_bytes_unread_ends_with_fin(
    tmp_path: Path,
    flavour: str,
    target: str,
    headers: list[tuple[str, str]],
    status: int,
    no_fd_leak: None,
) -> None:
    """The handler raised ProtocolError after its error answer was complete, with
    client bytes unread: the answer ends with FIN (lingering close), not a reset."""
    path = str(tmp_path / "r.sock")
    runner: Any = (
        ReceiverThread(small_body_only, [Bind(path)])
        if flavour == "asyncio"
        else SyncReceiverThread(sync_small_body_only, [Bind(path)])
    )
    with runner:
        client, server_side = tcp_pair()
        with client:
            # Sent with the request, before the handoff: in the receiver's socket
            # buffer, unread, when the handler gives up.
            if target == "/ws":
                client.sendall(encode_frame(Opcode.BINARY, b"x" * 20000, mask=b"abcd"))
            else:
                client.sendall(b"x" * 20000)
            method = "GET" if target == "/ws" else "POST"
            send_scgi(path, front_headers(method, target, headers), server_side)
            got, hdrs, body = split_response(read_to_fin(client))  # a reset raises here
    assert got == status
    assert len(body) == int(hdrs["content-length"])
