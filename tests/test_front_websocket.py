"""WebSocket mode: the front answers the upgrade (101) and hands off the open connection.

The client is the ``websockets`` library; the receiver frames with the same
library's sans-IO protocol started in the OPEN state, i.e. it never saw the
handshake, exactly like a daemon behind the front.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
from collections.abc import Callable

import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.sync.client import connect
from websockets.typing import Subprotocol

from cdp import chromium_path, launch
from handoff_receiver import (
    IO_TIMEOUT,
    FrontProcess,
    Handoff,
    TestReceiver,
    fronts_fixture,  # noqa: F401  (fixture)
    http_exchange,
    read_to_close,
    receivers_fixture,  # noqa: F401  (fixture)
    sockdir_fixture,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.timeout(120)

KEY = base64.b64encode(os.urandom(16))


def upgrade_request(path: bytes = b"/ws", *, version: bytes = b"13", key: bytes = KEY) -> bytes:
    return (
        b"GET %s HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: %s\r\n\r\n" % (path, key, version)
    )


def masked_text_frame(text: bytes) -> bytes:
    mask = os.urandom(4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(text))
    return bytes((0x81, 0x80 | len(text))) + mask + payload


def ws_echo(receiver: TestReceiver, handoff: Handoff, client: socket.socket) -> None:
    """Echo text messages until the client closes; report what arrived."""
    protocol = ServerProtocol(state=State.OPEN)
    client.settimeout(IO_TIMEOUT)
    received = []
    while protocol.state is State.OPEN:
        data = client.recv(65536)
        protocol.receive_data(data) if data else protocol.receive_eof()
        for event in protocol.events_received():
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                received.append(event.data)
                protocol.send_text(b"echo:" + event.data)
        for out in protocol.data_to_send():
            if out:
                client.sendall(out)
        if not data:
            break
    handoff.body = b"|".join(received)


def test_websockets_client_through_the_front(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers(behaviour=ws_echo)
    front = fronts(
        config=f'[[route]]\nprefix = "/ws"\nmode = "websocket"\nbackend = "unix:{receiver.path}"\n'
    )
    baseline = front.fd_count()
    with connect(
        f"ws://{front.addresses[0]}/ws/chat?room=1",
        proxy=None,
        compression=None,
        open_timeout=IO_TIMEOUT,
    ) as ws:
        ws.send("hello")
        assert ws.recv(timeout=IO_TIMEOUT) == "echo:hello"
        ws.send("again")
        assert ws.recv(timeout=IO_TIMEOUT) == "echo:again"
    handoff = receiver.next()
    headers = handoff.headers
    assert headers[b"HANDOFF_UPGRADED"] == b"websocket"
    assert headers[b"HANDOFF_ROUTE"] == b"/ws"
    assert headers[b"REQUEST_URI"] == b"/ws/chat?room=1"
    assert headers[b"HTTP_SEC_WEBSOCKET_VERSION"] == b"13"
    assert handoff.body == b"hello|again"
    front.wait_for(r'"GET /ws/chat\?room=1" route=/ws 101 handed-off')
    assert front.settled_fd_count(baseline) == baseline


def test_refused_upgrade_to_head_is_the_head_alone(
    no_fd_leak: None, receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    """RFC 9110 §9.3.2: the answer to HEAD is the head a GET would get."""
    receiver = receivers(behaviour=ws_echo)
    front = fronts(
        config=f'[[route]]\nprefix = "/ws"\nmode = "websocket"\nbackend = "unix:{receiver.path}"\n'
    )
    got, headers, body = http_exchange(front, upgrade_request().replace(b"GET", b"HEAD", 1))
    assert (got, body) == (400, b"")
    assert int(headers["content-length"]) > 0  # what the GET's body would have been
    front.wait_for(r'"HEAD /ws" route=/ws 400 "WebSocket upgrade must use GET')


SUBPROTOCOL_ROUTE = (
    '[[route]]\nprefix = "/ws"\nmode = "websocket"\nbackend = "unix:{path}"\n'
    'subprotocols = ["chat", "superchat"]\n'
)


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (["superchat", "chat"], "superchat"),  # the client's order of preference
        (["mqtt", "chat"], "chat"),
        (["mqtt"], None),  # nothing in common: no protocol, the client decides
        (None, None),  # nothing offered: none may be sent
    ],
)
def test_the_front_agrees_a_subprotocol_of_the_route(
    no_fd_leak: None,
    receivers: Callable[..., TestReceiver],
    fronts: Callable[..., FrontProcess],
    offered: list[str] | None,
    chosen: str | None,
) -> None:
    """RFC 6455 §4.2.2: the 101 names one of the client's offers that the
    route's backend speaks, and the receiver learns which; a browser that
    offered subprotocols fails a 101 without one."""
    receiver = receivers(behaviour=ws_echo)
    front = fronts(config=SUBPROTOCOL_ROUTE.format(path=receiver.path))
    with connect(
        f"ws://{front.addresses[0]}/ws",
        proxy=None,
        compression=None,
        open_timeout=IO_TIMEOUT,
        subprotocols=[Subprotocol(name) for name in offered] if offered else None,
    ) as ws:
        assert ws.subprotocol == chosen
        ws.send("hi")
        assert ws.recv(timeout=IO_TIMEOUT) == "echo:hi"
    headers = receiver.next().headers
    assert headers.get(b"HANDOFF_SUBPROTOCOL") == (chosen.encode() if chosen else None)


def test_a_malformed_subprotocol_offer_is_400_where_the_route_lists_some(
    no_fd_leak: None, receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers(behaviour=ws_echo)
    front = fronts(config=SUBPROTOCOL_ROUTE.format(path=receiver.path))
    request = upgrade_request().replace(
        b"\r\n\r\n", b"\r\nSec-WebSocket-Protocol: chat, a/b\r\n\r\n"
    )
    status, _, body = http_exchange(front, request)
    assert status == 400
    assert "Sec-WebSocket-Protocol element b'a/b' is not a token" in body.decode()
    assert receiver.handoffs.empty()


ORIGIN_ROUTE = (
    '[[route]]\nprefix = "/ws"\nmode = "websocket"\nbackend = "unix:{path}"\n'
    'allowed_origins = ["https://app.example.com", "http://127.0.0.1:8080"]\n'
)


@pytest.mark.parametrize(
    ("origins", "status"),
    [
        ([b"https://app.example.com"], 101),
        ([b"HTTPS://APP.EXAMPLE.COM"], 101),  # scheme and host are case-insensitive
        ([], 101),  # not a browser page: nothing to check
        ([b"https://evil.example"], 403),
        ([b"https://app.example.com:8443"], 403),
        ([b"null"], 403),
        ([b"https://app.example.com", b"https://evil.example"], 403),  # RFC 6454 §7.3: one
    ],
)
def test_allowed_origins_refuse_other_pages_with_403(
    no_fd_leak: None,
    receivers: Callable[..., TestReceiver],
    fronts: Callable[..., FrontProcess],
    origins: list[bytes],
    status: int,
) -> None:
    """RFC 6455 §10.2: a server that serves only some origins answers others 403;
    the front sends the 101 itself, so it is where a cross-site page is refused."""
    receiver = receivers(behaviour=ws_echo)
    front = fronts(config=ORIGIN_ROUTE.format(path=receiver.path))
    baseline = front.fd_count()
    lines = b"".join(b"Origin: %s\r\n" % origin for origin in origins)
    request = upgrade_request().replace(b"\r\n\r\n", b"\r\n" + lines + b"\r\n")
    if status == 101:
        with front.connect() as sock:
            sock.sendall(request + masked_text_frame(b"hi"))
            sock.settimeout(IO_TIMEOUT)
            data = b""
            while b"echo:hi" not in data:
                chunk = sock.recv(65536)
                assert chunk, f"closed early: {data!r}"
                data += chunk
        assert data.startswith(b"HTTP/1.1 101 ")
        assert receiver.next().body == b"hi"
        return
    got, headers, body = http_exchange(front, request)
    assert (got, headers["connection"]) == (403, "close")
    assert "may not open WebSockets on this route" in body.decode()
    assert receiver.handoffs.empty()
    front.wait_for(r'route=/ws 403 "Origin .* may not open WebSockets')
    assert front.settled_fd_count(baseline) == baseline


def _in_chromium(executable: str, url: str, protocols: list[str], message: str) -> str:
    """What a page (about:blank) sees opening ``url``: ``"<protocol> <first
    message>"`` once it is open and has sent ``message``, or ``"closed <code>"``."""
    with launch(executable) as browser:
        page = browser.open("about:blank")
        page.evaluate(
            "window.result = null; (() => {"
            f" const ws = new WebSocket({url!r}, {protocols!r});"
            f" ws.onopen = () => ws.send({message!r});"
            " ws.onmessage = (e) => { window.result = ws.protocol + ' ' + e.data; ws.close(); };"
            " ws.onclose = (e) => { window.result = window.result || 'closed ' + e.code; };"
            "})()"
        )
        result: str = page.wait_for("window.result")
        return result


def test_browser_page_of_another_origin_is_refused(
    require_tool: Callable[[str], str],
    receivers: Callable[..., TestReceiver],
    fronts: Callable[..., FrontProcess],
) -> None:
    """Chromium sends the page's origin (``null`` for about:blank): a route
    that does not allow it answers 403 and the page never sees an open."""
    require_tool("chromium")
    executable = chromium_path()
    assert executable is not None
    receiver = receivers(behaviour=ws_echo)
    front = fronts(
        config=(
            '[[route]]\nprefix = "/shut"\nmode = "websocket"\n'
            f'backend = "unix:{receiver.path}"\nallowed_origins = ["https://app.example.com"]\n'
            '[[route]]\nprefix = "/open"\nmode = "websocket"\n'
            f'backend = "unix:{receiver.path}"\nallowed_origins = ["null"]\n'
        )
    )
    base = f"ws://{front.addresses[0]}"
    results = {path: _in_chromium(executable, base + path, [], "hi") for path in ("/shut", "/open")}
    assert results == {"/shut": "closed 1006", "/open": " echo:hi"}
    front.wait_for(r'"GET /shut" route=/shut 403 "Origin b\'null\' may not open WebSockets')


def test_browser_gets_the_subprotocol_it_asked_for(
    require_tool: Callable[[str], str],
    receivers: Callable[..., TestReceiver],
    fronts: Callable[..., FrontProcess],
) -> None:
    """Chromium fails a connection whose 101 names no subprotocol when it
    offered some (close code 1006 before the open event)."""
    require_tool("chromium")
    executable = chromium_path()
    assert executable is not None
    receiver = receivers(behaviour=ws_echo)
    front = fronts(config=SUBPROTOCOL_ROUTE.format(path=receiver.path))
    url = f"ws://{front.addresses[0]}/ws"
    got = _in_chromium(executable, url, ["graphql-ws", "chat"], "from chromium")
    assert got == "chat echo:from chromium"
    assert receiver.next().headers[b"HANDOFF_SUBPROTOCOL"] == b"chat"


def test_frames_sent_with_the_upgrade_request_reach_the_receiver(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers(behaviour=ws_echo)
    front = fronts(
        config=f'[[route]]\nprefix = "/ws"\nmode = "websocket"\nbackend = "unix:{receiver.path}"\n'
    )
    with front.connect() as sock:
        # ONE write: the upgrade request and a masked frame (OpenResty loses it).
        sock.sendall(upgrade_request() + masked_text_frame(b"early"))
        sock.settimeout(IO_TIMEOUT)
        data = b""
        while b"echo:early" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed early: {data!r}"
            data += chunk
        head, _, frames = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols")
        assert frames == b"\x81\x0aecho:early"
        sock.sendall(bytes((0x88, 0x82)) + b"\x00\x00\x00\x00" + struct.pack("!H", 1000))
    assert receiver.next().body == b"early"


def test_expect_100_continue_gets_100_before_the_101(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    """RFC 9110 §7.8: a server receiving Upgrade and Expect: 100-continue MUST
    send 100 (Continue) before the 101."""
    receiver = receivers(behaviour=ws_echo)
    front = fronts(
        config=f'[[route]]\nprefix = "/ws"\nmode = "websocket"\nbackend = "unix:{receiver.path}"\n'
    )
    request = upgrade_request().replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n")
    with front.connect() as sock:
        sock.sendall(request)
        sock.settimeout(IO_TIMEOUT)
        data = b""
        while b"Sec-WebSocket-Accept" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed early: {data!r}"
            data += chunk
        assert data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n")
        sock.sendall(masked_text_frame(b"after"))
        while b"echo:after" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed early: {data!r}"
            data += chunk
        sock.sendall(bytes((0x88, 0x82)) + b"\x00\x00\x00\x00" + struct.pack("!H", 1000))
    assert receiver.next().body == b"after"


@pytest.mark.parametrize(
    ("request_bytes", "status", "why"),
    [
        (upgrade_request(version=b"8"), 426, "unsupported Sec-WebSocket-Version"),
        (upgrade_request(key=b"short"), 400, "Sec-WebSocket-Key"),
        (b"GET /ws HTTP/1.1\r\nHost: a\r\n\r\n", 400, "Upgrade header does not list"),
        (upgrade_request().replace(b"GET", b"POST"), 400, "must use GET"),
        # RFC 9110 §7.8, §9.3.1: content would be read as the first frames.
        (
            upgrade_request().replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\nhello"),
            400,
            "upgrade request with content",
        ),
        (
            upgrade_request().replace(
                b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            400,
            "upgrade request with content",
        ),
    ],
)
def test_invalid_upgrades(
    no_fd_leak: None,
    receivers: Callable[..., TestReceiver],
    fronts: Callable[..., FrontProcess],
    request_bytes: bytes,
    status: int,
    why: str,
) -> None:
    receiver = receivers(behaviour=ws_echo)
    front = fronts(
        config=f'[[route]]\nprefix = "/ws"\nmode = "websocket"\nbackend = "unix:{receiver.path}"\n'
    )
    baseline = front.fd_count()
    got, headers, body = http_exchange(front, request_bytes)
    assert got == status
    assert why in body.decode()
    if status == 426:
        assert headers["sec-websocket-version"] == "13"
    assert "close" in headers["connection"]
    assert headers["date"].endswith(" GMT")  # RFC 9110 §6.6.1: every 4xx of an origin
    assert receiver.handoffs.empty()
    front.wait_for(rf'route=/ws {status} ".*{why}')
    assert front.settled_fd_count(baseline) == baseline


def test_backend_down_is_a_503_not_a_101(
    no_fd_leak: None, fronts: Callable[..., FrontProcess]
) -> None:
    front = fronts(
        config='[[route]]\nprefix = "/ws"\nmode = "websocket"\n'
        'backend = "unix:/nonexistent/ws.sock"\n'
    )
    baseline = front.fd_count()
    status, _, body = http_exchange(front, upgrade_request())
    assert status == 503
    front.hid_detail(body, "socket file missing")
    assert front.settled_fd_count(baseline) == baseline


def test_receiver_not_taking_it_after_the_101_gets_a_close_1013(
    no_fd_leak: None, receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers(mode="hold")
    front = fronts(
        config=f'[timeouts]\nhandoff = 0.5\n[[route]]\nprefix = "/ws"\n'
        f'mode = "websocket"\nbackend = "unix:{receiver.path}"\n'
    )
    baseline = front.fd_count()
    with front.connect() as sock:
        sock.sendall(upgrade_request())
        sock.settimeout(IO_TIMEOUT)
        data = read_to_close(sock)
    head, _, frame = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    assert frame[0] == 0x88  # close frame, unmasked
    assert struct.unpack("!H", frame[2:4])[0] == 1013
    front.wait_for(r'route=/ws 101 closed-1013 "receiver did not take the connection')
    assert front.settled_fd_count(baseline) == baseline
