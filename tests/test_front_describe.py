"""The SCGI description the front sends with a client fd (fdhandoff.front.describe), bytes only."""

from __future__ import annotations

from fdhandoff import scgi
from fdhandoff.front.describe import Endpoint, describe
from fdhandoff.httphead import HeadLimits, parse_head

REMOTE = Endpoint(b"127.0.0.1", b"5555")
SERVER = Endpoint(b"127.0.0.1", b"8080")


def pairs(
    raw: bytes, *, body_consumed: bool = False
) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    message, dropped = describe(
        parse_head(raw), remote=REMOTE, server=SERVER, route=b"/", body_consumed=body_consumed
    )
    headers, _ = scgi.decode(message)
    return headers, dropped


def test_nginx_order_and_values_first() -> None:
    headers, _ = pairs(b"GET /a?b=1 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [name for name, _ in headers[:9]] == [
        b"CONTENT_LENGTH",
        b"SCGI",
        b"REMOTE_ADDR",
        b"REMOTE_PORT",
        b"REQUEST_METHOD",
        b"REQUEST_URI",
        b"SERVER_ADDR",
        b"SERVER_PORT",
        b"QUERY_STRING",
    ]
    assert dict(headers)[b"SCGI"] == b"1+fd_pass"  # what nginx fd_pass sends


def test_names_cgi_cannot_spell_are_dropped() -> None:
    # nginx: underscores_in_headers off, ignore_invalid_headers on.
    headers, dropped = pairs(
        b"GET / HTTP/1.1\r\nHost: h\r\nX_A: 1\r\nX.B: 2\r\nX-C: 3\r\nX~D: 4\r\n\r\n"
    )
    assert dropped == [b"X_A", b"X.B", b"X~D"]
    names = [name for name, _ in headers]
    assert b"HTTP_X_C" in names
    assert not [name for name in names if b"X_A" in name or b"X.B" in name or b"X~D" in name]


def test_absolute_form_sends_origin_form_and_the_targets_host() -> None:
    # RFC 9112 §3.2.2: the authority of an absolute-form target replaces Host.
    headers, _ = pairs(b"GET http://Example.com:81/p?q=1 HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    values = dict(headers)
    assert values[b"REQUEST_URI"] == b"/p?q=1"
    assert values[b"QUERY_STRING"] == b"q=1"
    assert values[b"HTTP_HOST"] == b"example.com:81"
    assert values[b"SERVER_NAME"] == b"example.com"


def test_consumed_body_is_not_described() -> None:
    raw = (
        b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n"
        b"X-K: v\r\n\r\n"
    )
    kept, _ = pairs(raw)
    assert dict(kept)[b"HTTP_CONTENT_LENGTH"] == b"3"
    consumed, _ = pairs(raw, body_consumed=True)
    names = [name for name, _ in consumed]
    assert b"HTTP_CONTENT_LENGTH" not in names and b"HTTP_EXPECT" not in names
    assert dict(consumed)[b"HTTP_X_K"] == b"v"
    assert dict(consumed)[b"CONTENT_LENGTH"] == b"0"


def test_a_description_receivers_would_refuse_is_431_or_500_with_a_payload() -> None:
    """Over scgi.MAX_BLOCK_SIZE the receiver refuses the handoff, and the client
    would get a 503 for a receiver that works: the front answers first."""
    import pytest  # noqa: PLC0415

    from fdhandoff.errors import ProtocolError  # noqa: PLC0415

    big = b"x" * 200_000
    head = parse_head(
        b"GET /?" + big + b" HTTP/1.1\r\nHost: h\r\n\r\n",
        HeadLimits(max_head_size=1 << 20, max_uri_length=1 << 20),
    )
    ends = {"remote": Endpoint(b"10.0.0.1", b"4000"), "server": Endpoint(b"10.0.0.2", b"80")}
    with pytest.raises(ProtocolError) as refused:
        describe(head, route=b"/", **ends)
    assert refused.value.status_hint == 431
    small = parse_head(b"GET /?q HTTP/1.1\r\nHost: h\r\n\r\n")
    describe(small, route=b"/", handoff_data=b"p" * 212_960, **ends)  # Apache's largest fits
    with pytest.raises(ProtocolError) as refused:
        describe(head, route=b"/", handoff_data=b"p" * 100_000, **ends)
    assert refused.value.status_hint == 500
