"""Closing a connection after the response: at once when the client has nothing to send,
lingering (reading and dropping) when it may still send, so no reset destroys the answer."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from fdhandoff.receiver import Handoff
from fdhandoff.receiver.listeners import Bind
from test_receiver_support import ReceiverThread, front_headers, read_all, send_scgi, tcp_pair


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
