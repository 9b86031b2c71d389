"""The examples, run as a user would: ``fdhandoff serve examples.<mod>:handler``."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from websockets.sync.client import connect

from fdhandoff.websocket import Opcode, encode_frame
from test_receiver_support import (
    MiniFront,
    front_headers,
    nginx_fixture,
    read_all,
    send_payload,
    send_raw_scgi,
    send_scgi,
    serve_process,
    split_response,
    tcp_pair,
)

FAST = {"SSE_TOKENS_DELAY": "0.001"}


def _events(body: bytes) -> list[str]:
    return [
        block.removeprefix(b"data: ").decode()
        for block in body.split(b"\n\n")
        if block.startswith(b"data: ")
    ]


def _tokens(events: list[str]) -> str:
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["content"] for e in events[:-1])


def test_sse_tokens_for_apache_front_and_nginx(tmp_path: Path) -> None:
    apache = str(tmp_path / "apache.sock")
    front = str(tmp_path / "front.sock")
    with serve_process(
        "examples.sse_tokens:handler",
        [f"unix-seqpacket:{apache}", f"unix:{front}"],
        env=FAST,
    ):
        # Apache mod_socket_handoff: the application's JSON, unchanged.
        payload = b'{"user_id":12345,"prompt":"hi","uri":"\\/handoff.php?prompt=hi","method":"GET"}'
        client, server_side = tcp_pair()
        send_payload(apache, payload, server_side)
        status, headers, body = split_response(read_all(client))
        client.close()
        assert status == 200
        assert headers["content-type"] == "text/event-stream"
        assert _tokens(_events(body)).startswith("You asked: hi. ")

        # The fdhandoff front: the prompt from the query string.
        client, server_side = tcp_pair()
        send_scgi(front, front_headers("GET", "/chat?prompt=what%20now"), server_side)
        status, _, body = split_response(read_all(client))
        client.close()
        assert _tokens(_events(body)).startswith("You asked: what now. ")

        # nginx fd_pass, byte for byte as captured (prompt-less query: 400).
        client, server_side = tcp_pair()
        send_raw_scgi(front, nginx_fixture("get-query.bin", client), server_side)
        assert split_response(read_all(client))[0] == 400
        client.close()


def test_sse_tokens_refuses_bad_payloads(tmp_path: Path) -> None:
    apache = str(tmp_path / "apache.sock")
    with serve_process("examples.sse_tokens:handler", [f"unix-seqpacket:{apache}"], env=FAST):
        for payload, status in ((b"not json", 400), (b"", 400), (b'{"prompt":"x"}', 200)):
            client, server_side = tcp_pair()
            send_payload(apache, payload, server_side)
            assert split_response(read_all(client))[0] == status, payload
            client.close()


def test_sse_tokens_stops_when_the_client_leaves(tmp_path: Path) -> None:
    front = str(tmp_path / "front.sock")
    with serve_process(
        "examples.sse_tokens:handler", [f"unix:{front}"], env={"SSE_TOKENS_DELAY": "0.2"}
    ) as proc:
        client, server_side = tcp_pair()
        send_scgi(front, front_headers("GET", "/chat?prompt=long"), server_side)
        client.settimeout(10)
        assert client.recv(4096).startswith(b"HTTP/1.1 200")
        client.close()
        deadline = time.monotonic() + 20
        log = ""
        while "generation stopped" not in log and time.monotonic() < deadline:
            time.sleep(0.1)
            log = proc.log_path.read_text()
        assert "generation stopped" in log


def test_ws_chat_broadcasts_to_everyone(tmp_path: Path) -> None:
    path = str(tmp_path / "chat.sock")
    with (
        serve_process("examples.ws_chat:handler", [f"unix:{path}"]),
        MiniFront(path) as front,
        contextlib.ExitStack() as stack,
    ):
        url = f"ws://127.0.0.1:{front.port}/chat"
        alice = stack.enter_context(connect(url + "?name=alice", open_timeout=10))
        bob = stack.enter_context(connect(url + "?name=bob", open_timeout=10))
        assert alice.recv(timeout=10) == "* bob joined"
        carol = stack.enter_context(connect(url + "?name=carol", open_timeout=10))
        assert alice.recv(timeout=10) == "* carol joined"
        assert bob.recv(timeout=10) == "* carol joined"
        bob.send("hello everyone")
        for member in (alice, bob, carol):
            assert member.recv(timeout=10) == "bob: hello everyone"
        carol.close()
        assert alice.recv(timeout=10) == "* carol left"
        # An oversized message ends only its sender's connection.
        with contextlib.suppress(Exception):
            bob.send("x" * 20_000)
            bob.recv(timeout=10)
        assert alice.recv(timeout=10) == "* bob left"
        alice.send("still here")
        assert alice.recv(timeout=10) == "alice: still here"


def test_ws_chat_behind_an_upgrading_front(tmp_path: Path) -> None:
    """The front answered 101 itself; frames it read ride along."""
    path = str(tmp_path / "chat.sock")
    with serve_process("examples.ws_chat:handler", [f"unix:{path}"]):
        client, server_side = tcp_pair()
        first = encode_frame(Opcode.TEXT, b"early bird", mask=b"abcd")
        headers = front_headers(
            "GET", "/chat?name=zed", [], first, HANDOFF_UPGRADED="websocket"
        )
        send_scgi(path, headers, server_side, first)
        client.settimeout(10)
        data = b""
        while b"zed: early bird" not in data:
            chunk = client.recv(4096)
            assert chunk, data
            data += chunk
        client.close()
    assert not data.startswith(b"HTTP/")

