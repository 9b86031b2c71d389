"""WebSocket opening handshake (RFC 6455 §4.2): validation, response, interop with `websockets`."""

from __future__ import annotations

import base64
import contextlib
import email.utils
import time

import httptools
import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response
from websockets.protocol import State as WsState
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from fdhandoff.errors import ProtocolError
from fdhandoff.websocket import (
    GUID,
    accept_key,
    check_key,
    check_upgrade,
    error_headers,
    error_response,
    expects_continue,
    handshake_response,
    parse_subprotocols,
    wants_websocket,
)

pytestmark = pytest.mark.usefixtures("no_fd_leak")

# The sample handshake of RFC 6455 §1.2 / §1.3.
RFC_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

VALID = [
    (b"Host", b"server.example.com"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Key", RFC_KEY),
    (b"Origin", b"http://example.com"),
    (b"Sec-WebSocket-Protocol", b"chat, superchat"),
    (b"Sec-WebSocket-Version", b"13"),
]


def replace(name: bytes, value: bytes | None) -> list[tuple[bytes, bytes]]:
    """VALID with header ``name`` replaced by ``value`` (dropped when None)."""
    out = [(k, v) for k, v in VALID if k.lower() != name.lower()]
    if value is not None:
        out.append((name, value))
    return out


def parse_head(raw: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """Parse a request head with httptools, the parser the front uses."""

    class Sink:
        def __init__(self) -> None:
            self.headers: list[tuple[bytes, bytes]] = []

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

    sink = Sink()
    parser = httptools.HttpRequestParser(sink)
    # HttpParserUpgrade is expected for an upgrade request: the rest is not HTTP.
    with contextlib.suppress(httptools.HttpParserUpgrade):
        parser.feed_data(raw)
    return parser.get_method(), parser.get_http_version().encode(), sink.headers


# --- accept key -----------------------------------------------------------------


def test_accept_key_matches_rfc_example() -> None:
    assert GUID == b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    assert accept_key(RFC_KEY) == RFC_ACCEPT


# --- check_upgrade: accepted requests ----------------------------------------------


def test_rfc_example_request_is_accepted() -> None:
    assert check_upgrade(b"GET", b"1.1", VALID) == RFC_KEY
    assert check_upgrade(b"GET", b"HTTP/1.1", iter(VALID)) == RFC_KEY


@pytest.mark.parametrize("version", [b"1.1", b"HTTP/1.1", b"2.0", b"HTTP/3.0"])
def test_http_versions_from_1_1_up(version: bytes) -> None:
    assert check_upgrade(b"GET", version, VALID) == RFC_KEY


def test_names_are_case_insensitive_and_values_trimmed() -> None:
    headers = [(name.upper(), b" \t" + value + b" ") for name, value in VALID]
    assert check_upgrade(b"GET", b"1.1", headers) == RFC_KEY
    lower = [(name.lower(), value) for name, value in VALID]
    assert check_upgrade(b"GET", b"1.1", lower) == RFC_KEY


@pytest.mark.parametrize(
    ("upgrade", "connection"),
    [
        ([b"WebSocket"], [b"upgrade"]),
        ([b"h2c, websocket"], [b"keep-alive, Upgrade"]),
        ([b"foo/2", b"websocket"], [b"keep-alive", b"UPGRADE"]),
        ([b",websocket,"], [b" , upgrade ,"]),
    ],
)
def test_token_lists_over_several_lines(upgrade: list[bytes], connection: list[bytes]) -> None:
    headers = [(k, v) for k, v in VALID if k not in (b"Upgrade", b"Connection")]
    headers += [(b"Upgrade", v) for v in upgrade] + [(b"Connection", v) for v in connection]
    assert check_upgrade(b"GET", b"1.1", headers) == RFC_KEY


@pytest.mark.parametrize("length", [b"0", b"00", b" 0 "])
def test_an_empty_content_length_is_no_content(length: bytes) -> None:
    assert check_upgrade(b"GET", b"1.1", [*VALID, (b"Content-Length", length)]) == RFC_KEY


def test_any_16_byte_key_is_accepted() -> None:
    for raw in (bytes(16), b"\xff" * 16, bytes(range(16))):
        key = base64.b64encode(raw)
        assert check_upgrade(b"GET", b"1.1", replace(b"Sec-WebSocket-Key", key)) == key


# --- check_upgrade: rejected requests ----------------------------------------------


@pytest.mark.parametrize(
    ("method", "version", "headers", "message"),
    [
        (b"POST", b"1.1", VALID, "must use GET"),
        (b"get", b"1.1", VALID, "must use GET"),
        (b"GET", b"1.0", VALID, "HTTP/1.1 or later"),
        (b"GET", b"HTTP/1.0", VALID, "HTTP/1.1 or later"),
        (b"GET", b"0.9", VALID, "HTTP/1.1 or later"),
        (b"GET", b"1.1x", VALID, "malformed HTTP version"),
        (b"GET", b"", VALID, "malformed HTTP version"),
        (b"GET", b"1.1", replace(b"Host", None), "missing Host"),
        (b"GET", b"1.1", [*VALID, (b"host", b"other")], "more than one Host"),
        (b"GET", b"1.1", replace(b"Upgrade", None), "Upgrade header does not list"),
        (b"GET", b"1.1", replace(b"Upgrade", b"h2c"), "Upgrade header does not list"),
        (b"GET", b"1.1", replace(b"Upgrade", b"websocketx"), "Upgrade header does not list"),
        (b"GET", b"1.1", replace(b"Upgrade", b"web socket"), "Upgrade header does not list"),
        (b"GET", b"1.1", replace(b"Connection", None), "Connection header does not list"),
        (b"GET", b"1.1", replace(b"Connection", b"keep-alive"), "Connection header does not"),
        (b"GET", b"1.1", replace(b"Connection", b"upgraded"), "Connection header does not"),
        (b"GET", b"1.1", replace(b"Sec-WebSocket-Key", None), "missing Sec-WebSocket-Key"),
        (b"GET", b"1.1", [*VALID, (b"Sec-WebSocket-Key", RFC_KEY)], "more than one Sec-W"),
        (b"GET", b"1.1", replace(b"Sec-WebSocket-Key", b""), "not base64 of 16 bytes"),
        (b"GET", b"1.1", replace(b"Sec-WebSocket-Key", b"abc"), "not base64 of 16 bytes"),
        # 15 and 17 bytes
        (b"GET", b"1.1", replace(b"Sec-WebSocket-Key", base64.b64encode(bytes(15))), "16 bytes"),
        (b"GET", b"1.1", replace(b"Sec-WebSocket-Key", base64.b64encode(bytes(17))), "16 bytes"),
        # right length, characters outside the alphabet, missing padding
        (b"GET", b"1.1", replace(b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ!="), "16 bytes"),
        (b"GET", b"1.1", replace(b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ"), "16 bytes"),
        (b"GET", b"1.1", replace(b"Sec-WebSocket-Key", b"dGhlIHNhbXB sZSBub25jZQ="), "16 bytes"),
        (b"GET", b"1.1", [*VALID, (b"Sec-WebSocket-Version", b"13")], "more than one Sec-W"),
        # RFC 9110 §7.8, §9.3.1: its content would be read as WebSocket frames.
        (b"GET", b"1.1", [*VALID, (b"Content-Length", b"5")], "upgrade request with content"),
        (b"GET", b"1.1", [*VALID, (b"content-length", b"01")], "upgrade request with content"),
        (b"GET", b"1.1", [*VALID, (b"Transfer-Encoding", b"chunked")], "request with content"),
    ],
)
def test_rejected_with_400(
    method: bytes, version: bytes, headers: list[tuple[bytes, bytes]], message: str
) -> None:
    with pytest.raises(ProtocolError, match=message) as info:
        check_upgrade(method, version, headers)
    assert info.value.status_hint == 400


@pytest.mark.parametrize("value", [None, b"", b"8", b"12", b"14", b"13, 8", b"013"])
def test_missing_or_unsupported_version_is_426(value: bytes | None) -> None:
    headers = replace(b"Sec-WebSocket-Version", value)
    with pytest.raises(ProtocolError, match="Sec-WebSocket-Version") as info:
        check_upgrade(b"GET", b"1.1", headers)
    assert info.value.status_hint == 426


def test_old_draft_without_key_learns_the_version() -> None:
    # hixie-76 clients send Key1/Key2 and no version: 426 names version 13.
    dropped = (b"Sec-WebSocket-Key", b"Sec-WebSocket-Version")
    headers = [(k, v) for k, v in VALID if k not in dropped]
    headers += [(b"Sec-WebSocket-Key1", b"4 @1  46546xW%0l 1 5"), (b"Sec-WebSocket-Key2", b"12998")]
    with pytest.raises(ProtocolError) as info:
        check_upgrade(b"GET", b"1.1", headers)
    assert info.value.status_hint == 426


def test_error_headers_and_response_for_426() -> None:
    assert error_headers(426) == [(b"Sec-WebSocket-Version", b"13"), (b"Upgrade", b"websocket")]
    assert error_headers(400) == []
    response = error_response(ProtocolError("unsupported version", status_hint=426))
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 426 Upgrade Required"
    assert b"Sec-WebSocket-Version: 13" in lines
    assert b"Upgrade: websocket" in lines
    assert b"Connection: upgrade, close" in lines
    assert body == b"unsupported version\n"
    assert f"Content-Length: {len(body)}".encode() in lines


def test_error_response_for_400_has_no_upgrade_headers() -> None:
    response = error_response(ProtocolError("missing Host header"))
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 400 Bad Request"
    assert b"Sec-WebSocket-Version" not in head
    assert b"Connection: close" in head.split(b"\r\n")
    assert body == b"missing Host header\n"


def test_error_response_to_head_has_no_body() -> None:
    error = ProtocolError("WebSocket upgrade must use GET")
    whole = error_response(error)
    head_only = error_response(error, head_only=True)
    assert whole.startswith(head_only) and head_only.endswith(b"\r\n\r\n")
    assert whole[len(head_only) :] == b"WebSocket upgrade must use GET\n"


@pytest.mark.parametrize("status", [400, 426])
def test_error_response_carries_a_date(status: int) -> None:
    # RFC 9110 §6.6.1: an origin server with a clock MUST send Date in a 4xx.
    head = error_response(ProtocolError("no", status_hint=status)).partition(b"\r\n\r\n")[0]
    dates = [line for line in head.split(b"\r\n") if line.startswith(b"Date: ")]
    assert len(dates) == 1
    sent = email.utils.parsedate_to_datetime(dates[0][6:].decode())
    assert abs(sent.timestamp() - time.time()) < 5


def test_wants_websocket() -> None:
    assert wants_websocket(VALID)
    assert wants_websocket([(b"UPGRADE", b"h2c, WebSocket")])
    assert not wants_websocket([(b"Upgrade", b"h2c")])
    assert not wants_websocket([(b"Host", b"x")])


# --- subprotocols ----------------------------------------------------------------


def test_parse_subprotocols_in_order_over_lines() -> None:
    assert parse_subprotocols(VALID) == [b"chat", b"superchat"]
    headers = [(b"sec-websocket-protocol", b"a, b"), (b"SEC-WEBSOCKET-PROTOCOL", b" c ,, d")]
    assert parse_subprotocols(headers) == [b"a", b"b", b"c", b"d"]
    assert parse_subprotocols([(b"Host", b"x")]) == []


@pytest.mark.parametrize("value", [b"a b", b"chat, sup@r", b'"quoted"', b"x/y"])
def test_parse_subprotocols_rejects_non_tokens(value: bytes) -> None:
    with pytest.raises(ProtocolError, match="not a token") as info:
        parse_subprotocols([(b"Sec-WebSocket-Protocol", value)])
    assert info.value.status_hint == 400


# --- handshake_response ---------------------------------------------------------------


def test_handshake_response_rfc_example() -> None:
    assert handshake_response(RFC_KEY) == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"\r\n"
    )


def test_handshake_response_with_subprotocol_and_extra_headers() -> None:
    response = handshake_response(
        RFC_KEY, subprotocol=b"chat", extra_headers=[(b"Set-Cookie", b"a=b; Path=/")]
    )
    assert response.endswith(
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"Sec-WebSocket-Protocol: chat\r\n"
        b"Set-Cookie: a=b; Path=/\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subprotocol": b"a b"}, "not a token"),
        ({"subprotocol": b""}, "not a token"),
        ({"extra_headers": [(b"X-A", b"1\r\nX-Injected: 1")]}, "control character"),
        ({"extra_headers": [(b"X-A", b"1\n")]}, "control character"),
        ({"extra_headers": [(b"X-A", b"\x00")]}, "control character"),
        ({"extra_headers": [(b"X-A", b"a\x01b")]}, "control character"),  # RFC 9110 §5.5
        ({"extra_headers": [(b"X-A", b"a\x7f")]}, "control character"),
        ({"extra_headers": [(b"X A", b"1")]}, "not a token"),
        ({"extra_headers": [(b"", b"1")]}, "not a token"),
        ({"extra_headers": [(b"connection", b"close")]}, "set by the handshake"),
        ({"extra_headers": [(b"Sec-WebSocket-Extensions", b"x")]}, "set by the handshake"),
        ({"extra_headers": [(b"Sec-WebSocket-Accept", b"x")]}, "set by the handshake"),
        ({"extra_headers": [(b"Content-Length", b"0")]}, "set by the handshake"),
    ],
)
def test_handshake_response_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        handshake_response(RFC_KEY, **kwargs)  # type: ignore[arg-type]


# --- interop with the websockets library (sans-IO client) ---------------------------


def ws_client(subprotocols: list[str] | None = None) -> ClientProtocol:
    subs = [Subprotocol(s) for s in subprotocols] if subprotocols else None
    return ClientProtocol(parse_uri("ws://127.0.0.1:8080/chat?x=1"), subprotocols=subs)


def test_websockets_client_accepts_our_response() -> None:
    client = ws_client(["chat", "superchat"])
    client.send_request(client.connect())
    (raw,) = client.data_to_send()
    method, version, headers = parse_head(raw)
    key = check_upgrade(method, version, headers)
    offered = parse_subprotocols(headers)
    assert offered == [b"chat", b"superchat"]
    client.receive_data(handshake_response(key, subprotocol=offered[1]))
    (event,) = client.events_received()
    assert isinstance(event, Response)
    assert event.status_code == 101
    assert client.handshake_exc is None
    assert client.state is WsState.OPEN
    assert client.subprotocol == "superchat"


def test_websockets_client_rejects_a_wrong_accept() -> None:
    # Makes sure the interop test above can fail: a response for another key.
    client = ws_client()
    client.send_request(client.connect())
    client.receive_data(handshake_response(RFC_KEY))
    client.events_received()
    assert client.handshake_exc is not None
    assert client.state is not WsState.OPEN


def test_websockets_client_sees_426() -> None:
    client = ws_client()
    client.send_request(client.connect())
    (raw,) = client.data_to_send()
    method, version, headers = parse_head(raw)
    headers = [(k, b"8" if k.lower() == b"sec-websocket-version" else v) for k, v in headers]
    with pytest.raises(ProtocolError) as info:
        check_upgrade(method, version, headers)
    client.receive_data(error_response(info.value))
    client.events_received()
    assert isinstance(client.handshake_exc, InvalidStatus)
    assert client.handshake_exc.response.status_code == 426
    assert client.handshake_exc.response.headers["Sec-WebSocket-Version"] == "13"


def test_check_key_trims_ows_and_refuses_what_is_not_base64_of_16_bytes() -> None:
    # RFC 6455 §4.2.1 item 5, for a key that came without a header (Apache payload).
    assert check_key(b" dGhlIHNhbXBsZSBub25jZQ== \t") == b"dGhlIHNhbXBsZSBub25jZQ=="
    for bad in (b"bogus", b"", b"   ", b"dGhlIHNhbXBsZSBub25jZQ", b"dGhlIHNhbXBsZSBub25jZQ=!"):
        with pytest.raises(ProtocolError, match="not base64 of 16 bytes") as info:
            check_key(bad)
        assert info.value.status_hint == 400


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], False),
        ([b"100-continue"], True),
        ([b"100-Continue"], True),
        ([b" 100-continue "], True),
        ([b"foo, 100-continue"], True),
        ([b"100-continues"], False),
    ],
)
def test_expects_continue(values: list[bytes], expected: bool) -> None:
    headers = [(b"Host", b"a"), *((b"Expect", value) for value in values)]
    assert expects_continue(headers) is expected


def test_handshake_response_can_put_a_100_before_the_101() -> None:
    # RFC 9110 §7.8: Upgrade with Expect: 100-continue, 100 (Continue) first.
    plain = handshake_response(b"dGhlIHNhbXBsZSBub25jZQ==")
    both = handshake_response(b"dGhlIHNhbXBsZSBub25jZQ==", continue_first=True)
    assert both == b"HTTP/1.1 100 Continue\r\n\r\n" + plain
