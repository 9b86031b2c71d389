"""Response heads of the ASGI adapter, bytes only (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest

from fdhandoff.receiver.asgi_response import (
    NO_BODY_STATUSES,
    app_head,
    error_response,
    finish_head,
)


def start(status: int = 200, headers: list[tuple[Any, Any]] | None = None) -> dict[str, Any]:
    return {"type": "http.response.start", "status": status, "headers": headers or []}


def test_app_head_keeps_app_headers_and_drops_hop_by_hop_ones() -> None:
    head = app_head(
        start(
            201,
            [
                (b"content-type", b"text/plain"),
                (b"transfer-encoding", b"chunked"),
                (b"connection", b"keep-alive, close"),
                (b"keep-alive", b"timeout=5"),
                (b"set-cookie", b"a=1"),
                (b"set-cookie", b"b=2"),
                ("x-str", "latin-1 \xe9"),
            ],
        ),
        cgi=False,
        head_sent=False,
    )
    assert head.status == 201
    assert head.close is True
    assert head.length is None
    lines = head.head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 201 Created"
    assert lines[1].startswith(b"Date: ")
    assert lines[2:] == [
        b"content-type: text/plain",
        b"set-cookie: a=1",
        b"set-cookie: b=2",
        b"x-str: latin-1 \xe9",
        b"",
    ]


def test_app_date_and_content_length_are_kept() -> None:
    head = app_head(
        start(200, [(b"Date", b"Thu, 01 Jan 2026 00:00:00 GMT"), (b"Content-Length", b"5")]),
        cgi=False,
        head_sent=False,
    )
    assert head.length == 5
    assert head.head.count(b"Date:") == 1
    assert b"Content-Length: 5\r\n" in head.head


def test_cgi_head_and_head_sent_by_apache() -> None:
    cgi = app_head(start(404, [(b"x", b"1")]), cgi=True, head_sent=False)
    assert cgi.head == b"Status: 404 Not Found\r\nx: 1\r\n"
    assert app_head(start(200, [(b"content-length", b"3")]), cgi=False, head_sent=True).head == b""


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (start(100), "invalid response status"),
        (start(1000), "invalid response status"),
        (start(600), "invalid response status"),  # RFC 9110 section 15: 100 to 599
        (start(999), "invalid response status"),
        (start(199), "invalid response status"),
        ({"type": "http.response.start", "status": "200"}, "invalid response status"),
        (start(200, [(b"x-split", b"a\r\nInjected: 1")]), "control character"),
        # RFC 9110 section 5.5: VCHAR, obs-text, SP and HTAB only.
        (start(200, [(b"x-a", b"a\x01b\x7f")]), "control character"),
        (start(200, [(b"x-a", b"a\x1b[31m")]), "control character"),
        (start(200, [(b"x-a", "a\x7f")]), "control character"),
        (start(200, [(b"bad name", b"v")]), "invalid response header name"),
        (start(200, [(b"content-length", b"-1")]), "invalid Content-Length"),
        (start(200, [(b"content-length", b"1"), (b"content-length", b"2")]), "more than one"),
        (start(200, [(b"content-length", b"2"), (b"Content-Length", b"2")]), "more than one"),
        (start(304, [(b"content-length", b"2"), (b"content-length", b"2")]), "more than one"),
        (start(200, [(b"content-length", b"2, 2")]), "invalid Content-Length"),
    ],
)
def test_bad_start_messages(message: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        app_head(message, cgi=False, head_sent=False)


def test_finish_head_framing_and_persistence() -> None:
    head = b"HTTP/1.1 200 OK\r\n"
    assert finish_head(head, length=3) == head + b"Content-Length: 3\r\n\r\n"
    assert finish_head(head, chunked=True) == head + b"Transfer-Encoding: chunked\r\n\r\n"
    assert finish_head(head, close=True) == head + b"Connection: close\r\n\r\n"


def test_finish_head_for_plain_scgi() -> None:
    head = b"Status: 200 OK\r\n"
    # Streamed until the close: nginx must not buffer it.
    assert finish_head(head, close=True, cgi=True) == head + b"X-Accel-Buffering: no\r\n\r\n"
    assert finish_head(head, length=2, close=True, cgi=True) == head + b"Content-Length: 2\r\n\r\n"
    with_length = head + b"content-length: 9\r\n"
    assert finish_head(with_length, close=True, cgi=True) == with_length + b"\r\n"
    own = head + b"X-Accel-Buffering: yes\r\n"
    assert finish_head(own, close=True, cgi=True) == own + b"\r\n"


def test_error_response() -> None:
    data = error_response(431)
    assert data.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"\r\nConnection: close\r\n" in data
    assert data.endswith(b"\r\n\r\n431 Request Header Fields Too Large\n")
    assert error_response(500, head_only=True).endswith(b"\r\n\r\n")
    assert error_response(500, cgi=True).startswith(b"Status: 500 Internal Server Error\r\n")


def test_no_content_length_in_a_204() -> None:
    # RFC 9110 section 8.6: a server MUST NOT send Content-Length in a 204;
    # a 304 may keep it (it describes the selected representation).
    head = app_head(
        start(204, [(b"Content-Length", b"5"), (b"X-A", b"1")]), cgi=False, head_sent=False
    )
    assert b"content-length" not in head.head.lower()
    assert b"X-A: 1\r\n" in head.head
    assert head.length is None
    head = app_head(start(304, [(b"Content-Length", b"5")]), cgi=False, head_sent=False)
    assert b"Content-Length: 5\r\n" in head.head


def test_tab_space_and_obs_text_are_valid_in_values() -> None:
    head = app_head(start(200, [(b"x-a", b"a\tb c\xe9\xff")]), cgi=False, head_sent=False)
    assert b"x-a: a\tb c\xe9\xff\r\n" in head.head


def test_205_has_no_content_and_a_zero_length() -> None:
    # RFC 9110 section 15.3.6: no content in a 205; RFC 9112 section 6.3 does
    # not exempt it from framing, so the length is said: 0.
    head = app_head(
        start(205, [(b"Content-Length", b"5"), (b"X-A", b"1")]), cgi=False, head_sent=False
    )
    assert head.head.lower().count(b"content-length") == 1
    assert b"Content-Length: 0\r\n" in head.head
    assert b"X-A: 1\r\n" in head.head
    assert head.length == 0
    assert 205 in NO_BODY_STATUSES  # the adapter drops the app's body
    cgi = app_head(start(205), cgi=True, head_sent=False)
    assert cgi.head == b"Status: 205 Reset Content\r\nContent-Length: 0\r\n"


def test_every_status_up_to_599_is_accepted() -> None:
    assert app_head(start(599), cgi=False, head_sent=False).head.startswith(b"HTTP/1.1 599 ")
