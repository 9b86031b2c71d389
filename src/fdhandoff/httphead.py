"""HTTP/1.1 request heads under limits (RFC 9112), sans-IO.

The front needs the request head and nothing else: it must find where the
head ends without reading a byte past it (the body and any pipelined request
stay in the kernel for the receiver), then parse it strictly.  Parsing is done
by llhttp through ``httptools``: the fastest parser measured for Python and
the strictest (NUL/CR/DEL in values, obs-fold, bare LF, conflicting or
repeated ``Content-Length``, ``Content-Length`` together with
``Transfer-Encoding`` and invalid header-name characters are all refused).
This module adds what llhttp leaves to the server: size limits with their own
statuses, the ``Host`` rules of RFC 9112 §3.2, the request-target forms of
§3.2, the HTTP-version decision, and the few places where llhttp is more
lenient than RFC 9112 (several spaces between the request-line parts, a bare
CR or LF before the request line, whitespace after a field value, transfer
codings other than ``chunked``).

Every error is a :class:`~fdhandoff.errors.ProtocolError` whose
``status_hint`` is the answer to give (see docs/security.md):

=====  ==========================================================
400    malformed head, bad Host, bad framing headers
408    (the caller's timeout, not raised here)
414    request line longer than ``max_uri_length``
431    head larger than ``max_head_size`` or too many header lines
501    method unknown to llhttp (a valid token, but not one we implement),
       a transfer coding other than ``chunked``
505    HTTP/0.9, 2 and higher; HTTP/1.0 unless the caller accepts it
=====  ==========================================================

It also holds the two pieces every role's own responses share: the ``Date``
value and the reason phrases.

Bytes in, values out: no sockets, no asyncio.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.utils import formatdate
from enum import Enum
from http import HTTPStatus
from typing import Final, NamedTuple

import httptools

from .errors import ProtocolError

__all__ = [
    "DEFAULT_LIMITS",
    "HEAD_END",
    "HEAD_LIMIT_RANGES",
    "MAX_CHUNK_SIZE_DIGITS",
    "MAX_CONTENT_LENGTH_DIGITS",
    "MAX_HEADERS",
    "MAX_HEAD_SIZE",
    "MAX_TRAILER_SIZE",
    "MAX_URI_LENGTH",
    "ChunkedReader",
    "HeadLimits",
    "RequestHead",
    "ResponseHead",
    "check_trailer_field",
    "chunk_size",
    "empty_lines_end",
    "find_head_end",
    "http_date",
    "incomplete_head_error",
    "is_cgi_header_name",
    "is_token",
    "parse_head",
    "parse_response_head",
    "reason_phrase",
    "split_host",
]

# --- what every role's own responses carry --------------------------------------------

_date: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The current time as an IMF-fixdate (RFC 9110 §5.6.7), formatted once a second.

    RFC 9110 §6.6.1: an origin server with a clock MUST send ``Date`` in its
    2xx, 3xx and 4xx responses, and a recipient that forwards a response
    without one MUST add it: every answer the front, the receiver or an
    upgrade refusal writes itself carries this value.
    """
    global _date  # noqa: PLW0603 - a one-entry cache shared by all responses
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True).encode("ascii"))
    return _date[1]


#: Reason phrases by code: HTTPStatus(code) builds an enum member per call.
_REASONS: Final = {int(status): status.phrase.encode("ascii") for status in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of ``status``, empty for a code without one
    (RFC 9112 §4: the reason-phrase is optional, its SP is not)."""
    return _REASONS.get(status, b"")


# --- limits (docs/security.md, "Front") ----------------------------------------

#: Largest request head (request line + header lines + the blank line).
#: nginx's largest is 1k + 4 x 8k (large_client_header_buffers); 32 KiB keeps
#: every request nginx fd_pass accepted acceptable here.  Over it: 431.
MAX_HEAD_SIZE: Final = 32 * 1024

#: Longest request line, its CRLF included.  nginx refuses a request line that
#: does not fit one 8k large_client_header_buffer with 414; the same limit,
#: the same answer (8190 bytes before the CRLF at most).
MAX_URI_LENGTH: Final = 8 * 1024

#: Most header lines in one head.  Apache's LimitRequestFields default; each
#: becomes one SCGI pair.  Over it: 431.
MAX_HEADERS: Final = 100

#: Hex digits allowed in a chunk size (16 = 2**64 - 1 at most); more is a
#: malformed body (400), never an integer overflow.
MAX_CHUNK_SIZE_DIGITS: Final = 16

#: Longest chunk-size line (size + extensions).  Extensions are ignored, but
#: an endless one would otherwise grow a buffer: 4 KiB (llhttp has no limit;
#: h11 caps the line similarly).
MAX_CHUNK_LINE: Final = 4096

#: Trailer section bytes accepted after the last chunk (the fields are
#: dropped): without a bound, a client could send trailer lines for as long
#: as it keeps them coming.  Over it: 431, as for a head too large.
MAX_TRAILER_SIZE: Final = 16 * 1024

#: Significant digits of a Content-Length (10**18 - 1 at most, which fits the
#: signed 64-bit off_t HTTP servers use).  llhttp takes up to 2**64 - 1;
#: the receiver's framing (and scgi's CONTENT_LENGTH) stop at 18 digits, so
#: the front stops there too, and both answer 400 to the same value.
MAX_CONTENT_LENGTH_DIGITS: Final = 18

#: The end of every head (RFC 9112 §2.1: CRLF after the last field line).
HEAD_END: Final = b"\r\n\r\n"

#: Empty lines a client may send before the request line (RFC 9112 §2.2: a
#: server SHOULD ignore at least one).  Any number is skipped, all counting
#: towards ``max_head_size``; only CRLF ones, as bare LF is refused everywhere.
_EMPTY_LINES: Final = re.compile(rb"(?:\r\n)*")

#: The HTTP/2 connection preface (RFC 9113 §3.4), answered 505.
_H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n"

#: A request line whose version is well formed, whatever its numbers
#: (RFC 9112 §2.3: HTTP-version = "HTTP/" DIGIT "." DIGIT).
_VERSIONED_LINE: Final = re.compile(rb"[^ ]+ [^ ]+ HTTP/([0-9])\.([0-9])")

#: The versions llhttp knows; any other well-formed one makes it fail.
_LLHTTP_VERSIONS: Final = frozenset(((0, 9), (1, 0), (1, 1), (2, 0)))

#: One chunk-size line without its CRLF (RFC 9112 §7.1.1):
#: ``chunk-size [ chunk-ext ]``, chunk-size = 1*HEXDIG (16 at most here),
#: chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] ),
#: names tokens, values tokens or quoted-strings (RFC 9110 §5.6.4: qdtext and
#: quoted-pair, obs-text included).  Extensions are dropped, but checked: a
#: NUL, bare CR or stray byte in one is what parsers disagree about.
_CHUNK_LINE: Final = re.compile(
    rb"([0-9A-Fa-f]{1,16})"  # MAX_CHUNK_SIZE_DIGITS
    rb"(?:[ \t]*;[ \t]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
    rb"(?:[ \t]*=[ \t]*(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
    rb'|"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"))?)*'
)

#: One trailer field line without its CRLF (RFC 9112 §7.1.2, §5): a token,
#: a colon right after it, then a value of visible characters, SP, HTAB and
#: obs-text only.  A line starting with whitespace (obs-fold) cannot match.
_TRAILER_FIELD: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*")

#: The longest run of tchar (RFC 9110 §5.6.2) at a position: a method, or its start.
_TOKEN_PREFIX: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")

#: How a TLS record of the handshake opens (RFC 8446 §5.1): ContentType 22,
#: then the major version 3 (the second byte may not have arrived yet).
_TLS_HANDSHAKE: Final = b"\x16"
_TLS_MAJOR: Final = (b"", b"\x03")

_TOKEN_CHARS: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """Size limits for one request head (defaults above)."""

    max_head_size: int = MAX_HEAD_SIZE
    max_uri_length: int = MAX_URI_LENGTH
    max_headers: int = MAX_HEADERS

    def problems(self) -> list[tuple[str, int, str]]:
        """``(field, value, what is wrong)`` for every limit outside
        :data:`HEAD_LIMIT_RANGES`, and for a URI limit above the head limit."""
        found = []
        for name, (low, high) in HEAD_LIMIT_RANGES.items():
            value = getattr(self, name)
            if not low <= value <= high:
                found.append((name, value, f"must be between {low} and {high}"))
        if self.max_uri_length > self.max_head_size:
            found.append(
                (
                    "max_uri_length",
                    self.max_uri_length,
                    f"is larger than the head size limit ({self.max_head_size})",
                )
            )
        return found


#: What each head limit may be set to, in the front's ``[limits]`` and on the
#: receiver's command line alike: below, ordinary requests would fail (a
#: browser's head is 0.5-2 KiB); above, the limit would bound nothing.
HEAD_LIMIT_RANGES: Final = {
    "max_head_size": (1024, 1 << 20),
    "max_uri_length": (64, 1 << 20),
    "max_headers": (1, 10000),
}


DEFAULT_LIMITS: Final = HeadLimits()

HeaderPairs = tuple[tuple[bytes, bytes], ...]


class RequestHead(NamedTuple):
    """One parsed request head.

    ``target`` is the request-target as sent (SCGI ``REQUEST_URI``), in
    origin-form: an absolute-form target is reduced to its path and query, and
    its authority replaces the ``Host`` value in ``headers`` (RFC 9112
    §3.2.2).  ``path`` and ``query`` are its parts, still percent-encoded.
    ``host`` is the lower-cased host without port or trailing dot; ``port`` is
    the port given, or ``b""``.  ``headers`` are in arrival order, names as
    sent.

    An immutable named tuple rather than a frozen dataclass: one is built per
    request on the front's hot path, and a frozen dataclass with twelve
    fields costs 2.5 µs to build against 0.3 µs for the tuple.
    """

    method: bytes
    target: bytes
    path: bytes
    query: bytes
    version: bytes
    headers: HeaderPairs
    host: bytes
    port: bytes
    content_length: int | None
    chunked: bool
    upgrade: bool
    size: int

    def values(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (lower case), in arrival order."""
        return [value for key, value in self.headers if key.lower() == name]

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A parsed response head (from an upstream application)."""

    status: int
    reason: bytes
    version: bytes
    headers: HeaderPairs
    content_length: int | None
    chunked: bool
    size: int

    def values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name]


def is_token(value: bytes) -> bool:
    """True if ``value`` is an RFC 9110 §5.6.2 token."""
    return bool(value) and all(byte in _TOKEN_CHARS for byte in value)


#: What a header name may be made of to be passed on: letters, digits, "-".
_CGI_NAME_CHARS: Final = frozenset(
    b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


def is_cgi_header_name(name: bytes) -> bool:
    """Whether a request header named ``name`` is passed on to applications.

    The one rule for every request, whichever role read it: the front for
    the first request of a connection (to a receiver, or to the application
    of an auth route), the receiver for the next ones.  RFC
    9110 §5.1 allows any token, but a CGI name (``HTTP_X_A``, RFC 3875
    §4.1.18) turns "-" into "_", so ``X_A`` and ``X-A`` would meet under one
    name and a client could slip one past a check on the other; ``X.A`` has
    no CGI spelling at all.  Names with anything but letters, digits and "-"
    are dropped, as nginx does by default (``underscores_in_headers off``,
    ``ignore_invalid_headers on``).
    """
    return _CGI_NAME_CHARS.issuperset(name)


# --- finding the end ----------------------------------------------------------------


def find_head_end(buf: bytes | bytearray, start: int = 0, end: int | None = None) -> int:
    """Index just past the blank line that ends the head, or -1.

    ``start`` lets a caller resume a search: pass the length already searched
    minus 3, so a terminator split across reads is found.  Only CRLF line
    ends count: a bare-LF head never ends and is refused by
    :func:`incomplete_head_error` (RFC 9112 §2.2 lets a recipient accept bare
    LF, but a lenient front and a strict receiver would disagree on where the
    head ends, which is how request smuggling starts).
    """
    if end is None:
        end = len(buf)
    found = buf.find(HEAD_END, start, end)
    return -1 if found < 0 else found + 4


def empty_lines_end(buf: bytes | bytearray) -> int:
    """Index just past the CRLF empty lines that precede the request line (RFC 9112 §2.2).

    0 for a buffer that starts with anything else.  A caller looking for the
    end of the head searches from there, so ``CRLF CRLF`` sent before the
    request line is not taken for the end of an empty head.
    """
    match = _EMPTY_LINES.match(buf)
    assert match is not None  # (?:...)* matches the empty string
    return match.end()


def incomplete_head_error(
    buf: bytes | bytearray, limits: HeadLimits = DEFAULT_LIMITS
) -> ProtocolError | None:
    """The error for a head that has not ended yet, or None if it may still end well.

    Catches early what can already be judged: a method that is not a token
    (400 at the first wrong byte: a TLS ClientHello on a plain port, binary
    noise), a bare LF or a bare CR (400), a request line already longer than
    the URI limit (414), a request line that has ended without the form of
    one (400: ``GET /`` of HTTP/0.9 waits for nothing more), and a head that
    has reached the size limit without ending (414 if its request line did
    not end either, else 431).  Empty lines before the request line are not
    the request line.  Waiting on any of these would only turn a 400 the
    bytes already prove into a 408 at the head timeout.
    """
    start = empty_lines_end(buf) if buf[:1] == b"\r" else 0
    line_end = buf.find(b"\r\n", start)
    if buf[start : start + 1] == _TLS_HANDSHAKE and buf[start + 1 : start + 2] in _TLS_MAJOR:
        # RFC 8446 §5.1: a TLS connection opens with a handshake record
        # (content type 22, then version 3.x), never with a method's letters.
        return ProtocolError("TLS sent to a plain HTTP port: use http://")
    crlfs = buf.count(b"\r\n")
    if buf.count(b"\n") != crlfs:
        return ProtocolError("line ends with a bare LF, not CRLF (RFC 9112 §2.2)")
    # A CR is only ever the first half of a CRLF (RFC 9112 §2.2: a bare CR is
    # invalid); the last byte may be a CR whose LF is still on its way.
    if buf.count(b"\r") != crlfs + (buf[-1:] == b"\r"):
        return ProtocolError("CR not followed by LF (RFC 9112 §2.2)")
    if not _method_may_follow(buf, start):
        return ProtocolError("malformed request line: the method is not a token (RFC 9112 §3)")
    if _line_too_long(start, line_end, len(buf), limits):
        return ProtocolError(
            f"request line longer than {limits.max_uri_length} bytes", status_hint=414
        )
    if line_end >= 0 and not _VERSIONED_LINE.fullmatch(buf, start, line_end):
        # Every line parse_head accepts has this form (single spaces, a
        # version): one that does not will not become a request by waiting.
        return ProtocolError(
            "malformed request line: not METHOD SP target SP HTTP/x.y (RFC 9112 §3)"
        )
    if len(buf) >= limits.max_head_size:
        return ProtocolError(
            f"request head larger than {limits.max_head_size} bytes", status_hint=431
        )
    return None


def _method_may_follow(buf: bytes | bytearray, start: int) -> bool:
    """Whether the bytes from ``start`` may still begin ``method SP``.

    RFC 9112 §3: the request line starts with the method, a token (RFC 9110
    §5.6.2, tchar), then a single SP.  A lone CR at the very end may still be
    the first half of an empty line (RFC 9112 §2.2); the caller has refused
    every other bare CR already.
    """
    match = _TOKEN_PREFIX.match(buf, start)
    assert match is not None  # [...]* matches the empty string
    end = match.end()
    if end == len(buf):
        return True
    if end > start:
        return buf[end] == 0x20
    return end == len(buf) - 1 and buf[end] == 0x0D


def _line_too_long(start: int, line_end: int, size: int, limits: HeadLimits) -> bool:
    """Whether the request line and its CRLF exceed ``max_uri_length`` (nginx's
    buffer holds both); ``line_end`` < 0 while the line has not ended in
    ``size`` bytes, which is already too long at ``max_uri_length`` bytes
    (even a final CR leaves the CRLF a byte over)."""
    if line_end < 0:
        return size - start >= limits.max_uri_length
    return line_end - start + 2 > limits.max_uri_length


# --- parsing --------------------------------------------------------------------------


#: A value's last byte when it ends in whitespace (the empty value ends in nothing).
_OWS: Final = frozenset((b" ", b"\t"))


class _Collector:
    """httptools callbacks: the URL, the header pairs, and the few headers the
    front itself acts on (noted as they pass, so nothing scans the list again).
    """

    __slots__ = ("complete", "content_length", "headers", "hosts", "te", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.hosts: list[bytes] = []
        self.content_length: bytes | None = None
        self.te = False
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # Trailing OWS is not part of a field value (RFC 9112 §5.1); llhttp
        # drops it before a value, not after, so "Host: a " is host "a" and
        # an application sees "v" for "X-A: v  ", as behind any other server.
        if value[-1:] in _OWS:
            value = value.rstrip(b" \t")
        size = len(name)
        # Only 4 (Host), 14 (Content-Length) and 17 (Transfer-Encoding) bytes
        # long names can matter: compare those, lower-cased, and no others.
        if size == 4:
            if name.lower() == b"host":
                self.hosts.append(value)
        elif size == 14:
            if name.lower() == b"content-length":
                self.content_length = value  # llhttp checked: digits, one value
        elif size == 17 and name.lower() == b"transfer-encoding":
            # llhttp refused every request whose final coding is not chunked.
            self.te = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_head(
    head: bytes, limits: HeadLimits = DEFAULT_LIMITS, *, http10: bool = False
) -> RequestHead:
    """Parse one complete request head (ending with CRLF CRLF).

    CRLF empty lines before the request line are skipped (RFC 9112 §2.2).
    ``http10``: accept HTTP/1.0 requests (``version`` ``b"1.0"``, ``Host``
    optional); a caller that would answer them in HTTP/1.1 leaves it off and
    they are 505.  HTTP/1.2 to 1.9 are read as 1.1 (RFC 9110 §6.2).

    Raises :class:`ProtocolError` with the status to answer (module docstring).
    """
    size = len(head)
    start = 0
    if head[:1] <= b"\r":  # one comparison on the hot path; CR, LF (or b"") only matter
        start = empty_lines_end(head)
        if head[start : start + 1] in {b"\r", b"\n"}:
            # llhttp skips a bare CR or LF here too; we refuse bare line ends
            # everywhere (find_head_end), so a head is judged the same
            # whether it arrived whole or in pieces.
            raise ProtocolError("bare CR or LF before the request line (RFC 9112 §2.2)")
    line_end = head.find(b"\r\n", start)
    # The request line before the head's size, as incomplete_head_error
    # judges a head still arriving: 414 for an overlong line either way.
    if _line_too_long(start, line_end, size, limits):
        raise ProtocolError(
            f"request line longer than {limits.max_uri_length} bytes", status_hint=414
        )
    if size > limits.max_head_size:
        raise ProtocolError(
            f"request head larger than {limits.max_head_size} bytes", status_hint=431
        )
    if head.startswith(_H2_PREFACE, start):
        raise ProtocolError("HTTP/2 is not supported, only HTTP/1.1", status_hint=505)
    collector = _Collector()
    parser = httptools.HttpRequestParser(collector)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # Upgrade or CONNECT: llhttp stops after the head, which is all we feed
    except httptools.HttpParserInvalidMethodError:
        space = head.find(b" ", start, line_end)
        method = head[start:space] if space >= 0 else b""
        if head[start : start + 1] == _TLS_HANDSHAKE:
            raise ProtocolError("TLS sent to a plain HTTP port: use http://") from None
        if is_token(method):
            # RFC 9110 §9.1: an unrecognised method is answered with 501.
            raise ProtocolError(
                f"method {method[:32]!r} is not implemented", status_hint=501
            ) from None
        raise ProtocolError("malformed request line: the method is not a token") from None
    except httptools.HttpParserError as exc:
        patched = _other_version(head, start, line_end)
        if patched is not None:
            return parse_head(patched, limits, http10=http10)
        raise _parser_error(exc) from None
    if not collector.complete:
        raise ProtocolError("request head is empty or incomplete")
    if len(collector.headers) > limits.max_headers:
        raise ProtocolError(f"more than {limits.max_headers} header lines", status_hint=431)
    version = parser.get_http_version()
    if version != "1.1" and (version != "1.0" or not http10):
        if not _VERSIONED_LINE.fullmatch(head, start, line_end):
            # llhttp reads a line without a version ("GET /", HTTP/0.9's
            # simple request) as version 0.9.  It is no request line of RFC
            # 9112 §3 (400), and incomplete_head_error says so as soon as
            # the line ends: the same bytes must get the same answer whether
            # the blank line came with them or after them.
            raise ProtocolError(
                "malformed request line: not METHOD SP target SP HTTP/x.y (RFC 9112 §3)"
            )
        # HTTP/0.9 has no head to hand off and HTTP/2 is another protocol
        # (RFC 9110 §15.6.6: 505 for a major version we do not support).
        # HTTP/1.0 is refused only for callers that cannot answer it.
        raise ProtocolError(f"HTTP/{version} is not supported, only HTTP/1.1", status_hint=505)
    method = parser.get_method()
    # RFC 9112 §3: method SP request-target SP HTTP-version, single spaces.
    # llhttp takes runs of spaces; recipients MAY, but a strict front and a
    # lenient one behind it would disagree on what the target was.  Lengths
    # say it without another scan ("HTTP/1.1" and the two spaces are 10).
    if line_end - start != len(method) + len(collector.url) + 10:
        raise ProtocolError(
            "malformed request line: parts not separated by single spaces (RFC 9112 §3)"
        )
    if version == "1.1":
        return _build(collector, method, b"1.1", parser.should_upgrade(), size)
    # RFC 9110 §7.8: a server MUST ignore Upgrade in an HTTP/1.0 request.
    return _build(collector, method, b"1.0", False, size)


def _other_version(head: bytes, start: int, line_end: int) -> bytes | None:
    """``head`` read as HTTP/1.1 if it is HTTP/1.2 to 1.9, else None; 505 for 2 and above.

    Called once llhttp failed, which it does on every version it does not
    know.  RFC 9110 §6.2: a higher minor version of a major version we
    implement SHOULD be processed as the highest minor we implement; RFC 9110
    §15.6.6: 505 for a major version we do not support.  Anything else
    (``HTTP/11``, ``FOO/1.1``) is a malformed request line: None, and 400.
    """
    match = _VERSIONED_LINE.fullmatch(head, start, line_end)
    if match is None:
        return None
    major, minor = int(match[1]), int(match[2])
    if (major, minor) in _LLHTTP_VERSIONS:
        return None  # llhttp knew the version: the error is elsewhere
    if major != 1:
        raise ProtocolError(
            f"HTTP/{major}.{minor} is not supported, only HTTP/1.1", status_hint=505
        )
    # Same length: the minor digit is the request line's last byte.
    return head[: line_end - 1] + b"1" + head[line_end:]


def _parser_error(exc: Exception) -> ProtocolError:
    reason = str(exc) or type(exc).__name__
    return ProtocolError(f"malformed request head: {reason}")


def _build(
    collector: _Collector, method: bytes, version: bytes, upgrade: bool, size: int
) -> RequestHead:
    if method == b"CONNECT":
        # authority-form (RFC 9112 §3.2.3) is for proxies; this is not one.
        raise ProtocolError("CONNECT is not implemented (not a proxy)", status_hint=501)
    target = collector.url
    if b"#" in target:
        raise ProtocolError("request-target contains a fragment ('#'), RFC 9112 §3.2")
    hosts = collector.hosts
    if len(hosts) != 1 and (hosts or version == b"1.1"):
        # RFC 9112 §3.2: exactly one Host in HTTP/1.1, or 400; at most one in
        # HTTP/1.0, which did not require it.
        raise ProtocolError("missing Host header" if not hosts else "more than one Host header")
    if collector.te:
        _check_transfer_coding(collector.headers, version)
    if target[:1] == b"/":
        path, _, query = target.partition(b"?")
        host, port = split_host(hosts[0]) if hosts else (b"", b"")
    elif target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
        path, query, host, port = _absolute_form(target)
        # RFC 9112 §3.2.2: the target's authority replaces Host, so nothing
        # downstream sees a Host that contradicts where the request was routed;
        # the target becomes origin-form, as nginx's $request_uri is.
        target = path + b"?" + query if query else path
        authority = host + b":" + port if port else host
        if hosts:
            # RFC 9112 §3.2: a Host that is not a valid field value is 400,
            # whatever the target says; then the target's authority wins.
            split_host(hosts[0])
            collector.headers = [
                (name, authority if name.lower() == b"host" else value)
                for name, value in collector.headers
            ]
        else:  # HTTP/1.0 without Host: the receiver still learns the host
            collector.headers.append((b"Host", authority))
    elif target == b"*" and method == b"OPTIONS":
        path, query = b"*", b""
        host, port = split_host(hosts[0]) if hosts else (b"", b"")
    else:
        raise ProtocolError(f"request-target {target[:64]!r} is not origin- or absolute-form")
    length = collector.content_length
    # RFC 9110 §8.6: a recipient must anticipate large numerals; llhttp stops
    # at 2**64 - 1, the receiver at 18 significant digits.  The same bound
    # here, so the front does not hand off what the receiver then refuses
    # (leading zeros do not count; the length test first keeps it cheap).
    if (
        length is not None
        and len(length) > MAX_CONTENT_LENGTH_DIGITS
        and len(length.lstrip(b"0")) > MAX_CONTENT_LENGTH_DIGITS
    ):
        raise ProtocolError(
            f"Content-Length {length[:32]!r} has more than {MAX_CONTENT_LENGTH_DIGITS} digits"
        )
    return RequestHead(
        method,
        target,
        path,
        query,
        version,
        tuple(collector.headers),
        host,
        port,
        None if length is None else int(length),
        collector.te,
        upgrade,
        size,
    )


def _check_transfer_coding(headers: list[tuple[bytes, bytes]], version: bytes) -> None:
    """Refuse what llhttp lets through in ``Transfer-Encoding`` (rare: not on the hot path).

    llhttp has already refused a final coding other than ``chunked``,
    ``chunked`` twice and ``Transfer-Encoding`` with ``Content-Length``.
    """
    if version != b"1.1":
        # RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty
        # framing; the connection must close after it, which a handoff cannot
        # promise, so the request is refused instead.
        raise ProtocolError("Transfer-Encoding in an HTTP/1.0 request (RFC 9112 §6.1)")
    codings = [
        coding.strip(b" \t").lower()
        for name, value in headers
        if len(name) == 17 and name.lower() == b"transfer-encoding"
        for coding in value.split(b",")
    ]
    # RFC 9110 §5.6.1: empty list elements are ignored.
    for coding in codings:
        if coding and coding != b"chunked":
            # RFC 9112 §6.1: a transfer coding the server does not understand
            # SHOULD be 501.  Receivers only remove chunked: a gzip coding
            # would reach the application as its body.
            raise ProtocolError(
                f"transfer coding {coding[:32]!r} is not implemented, only chunked",
                status_hint=501,
            )


def _absolute_form(target: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    # RFC 9112 §3.2.2: a server MUST accept absolute-form; its authority
    # replaces the Host header.
    start = target.index(b"//") + 2
    stops = [i for i in (target.find(b"/", start), target.find(b"?", start)) if i >= 0]
    end = min(stops, default=len(target))
    url_text = target
    if target[end - 1 : end] == b":" and end > start:
        # RFC 3986 §3.2.3: the port may be empty, and "http://h:/" is
        # "http://h/" (§6.2.3), as it is for "Host: h:" and for nginx;
        # llhttp refuses the empty port.
        url_text = target[: end - 1] + target[end:]
    try:
        url = httptools.parse_url(url_text)
    except httptools.HttpParserInvalidURLError:
        raise ProtocolError(f"malformed absolute-form request-target {target[:64]!r}") from None
    if not url.host or url.userinfo:
        raise ProtocolError("absolute-form request-target without a host or with userinfo")
    # llhttp returns an IP literal without its brackets; put them back so the
    # authority is spelled as in a Host header (RFC 3986 §3.2.2), and check
    # it with the same rules as Host.
    host = b"[" + url.host + b"]" if b":" in url.host else url.host
    authority = host + b":%d" % url.port if url.port is not None else host
    host, port = split_host(authority)
    return url.path or b"/", url.query or b"", host, port


#: Host = uri-host [ ":" port ] (RFC 9110 §7.2): reg-name / IPv4 or an IP
#: literal; a "%" only as a percent-encoding (RFC 3986 §3.2.2).
_HOST: Final = re.compile(
    rb"(\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::([0-9]{0,5}))?"
)


def split_host(value: bytes) -> tuple[bytes, bytes]:
    """``Host`` header → (lower-cased host, port or ``b""``); 400 if malformed.

    Accepts ``name``, ``name:port``, ``[v6]`` and ``[v6]:port`` (RFC 9110 §7.2,
    RFC 3986 §3.2.2).  An empty host is refused: RFC 9110 §7.2 allows it only
    for a target URI without authority, and every ``http`` URI has one.  A
    trailing dot is dropped (``example.com.`` is ``example.com``, as nginx
    does), so host routes match either spelling; an empty label elsewhere
    (``..``, ``a..b``, ``.a``) is refused.
    """
    match = _HOST.fullmatch(value)
    if match is None:
        raise ProtocolError(f"malformed Host header {value[:64]!r}")
    host = match[1].lower()
    if not host.startswith(b"["):
        if host.endswith(b"."):
            host = host[:-1]
        if host[:1] == b"." or host[-1:] == b"." or b".." in host:
            # An empty label names nothing in DNS; nginx refuses it as well,
            # and ".." in a host that ends up in a path or a cache key is a
            # hazard downstream.
            raise ProtocolError(f"Host {value[:64]!r} has an empty label")
    if not host:
        raise ProtocolError(f"Host header {value[:64]!r} names no host")
    return host, match[2] or b""


# --- response heads (auth mode upstreams) ------------------------------------------------


class _ResponseCollector:
    __slots__ = ("complete", "headers", "reason")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.complete = False

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_response_head(head: bytes, *, max_headers: int = MAX_HEADERS) -> ResponseHead:
    """Parse one complete response head from an upstream application.

    Raises :class:`ProtocolError` (the front answers the client 502).
    """
    collector = _ResponseCollector()
    parser = httptools.HttpResponseParser(collector)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        raise ProtocolError(f"malformed response head: {exc}", status_hint=502) from None
    if not collector.complete:
        raise ProtocolError("response head is incomplete", status_hint=502)
    if len(collector.headers) > max_headers:
        raise ProtocolError(f"more than {max_headers} response header lines", status_hint=502)
    content_length: int | None = None
    codings: list[bytes] = []
    for name, value in collector.headers:
        lower = name.lower()
        if lower == b"content-length":
            content_length = int(value)
        elif lower == b"transfer-encoding":
            codings += value.split(b",")
    # RFC 9112 §6.3: a response body is chunked only when chunked is the
    # final coding of the whole list, every Transfer-Encoding line taken
    # together (RFC 9110 §5.3), and compared as a token, not a suffix
    # ("xchunked" is another coding); otherwise it ends at the close.  The
    # front must cut the body where the client will, which reads the same list.
    final = [coding.strip(b" \t") for coding in codings if coding.strip(b" \t")]
    chunked = bool(final) and final[-1].lower() == b"chunked"
    status = parser.get_status_code()
    # RFC 9112 section 4: three digits; RFC 9110 section 15: 100-599.  The
    # parser reads "099" as 99 and takes 600 or 999 as they are.
    if not 100 <= status <= 599 or head[9:12] != b"%d" % status:
        raise ProtocolError(
            f"malformed response head: status {head[9:12]!r} is not in 100-599", status_hint=502
        )
    return ResponseHead(
        status,
        collector.reason,
        parser.get_http_version().encode("ascii"),
        tuple(collector.headers),
        content_length,
        chunked,
        len(head),
    )


# --- chunked bodies ----------------------------------------------------------------------


def chunk_size(line: bytes) -> int:
    """The size of a chunk-size line (CRLF removed); 400 unless it is RFC 9112 §7.1.1's grammar.

    Shared by the front (auth mode) and the receiver, so both cut a chunked
    body at the same place: no leading whitespace, no sign, ``0x`` or ``_``,
    at most :data:`MAX_CHUNK_SIZE_DIGITS` hex digits, and extensions that are
    well-formed ``;name[=value]`` pairs (BWS allowed around ``;`` and ``=``).
    """
    match = _CHUNK_LINE.fullmatch(line)
    if match is None:
        raise ProtocolError(f"malformed chunk-size line {line[:32]!r} (RFC 9112 §7.1.1)")
    return int(match[1], 16)


def check_trailer_field(line: bytes) -> None:
    """400 unless ``line`` (CRLF removed) is a well-formed field line (RFC 9112 §7.1.2).

    Trailer fields are dropped, but judged like header fields: a name that is
    not a token, whitespace before the colon, obs-fold, or a control byte in
    the value makes the body malformed.
    """
    if _TRAILER_FIELD.fullmatch(line) is None:
        raise ProtocolError(f"malformed trailer field {line[:32]!r} (RFC 9112 §7.1.2)")


class _ChunkState(Enum):
    SIZE = 1
    DATA = 2
    DATA_CRLF = 3
    TRAILER = 4
    DONE = 5
    FAILED = 6


class ChunkedReader:
    """Finds the end of a chunked body (RFC 9112 §7.1) without over-reading, sans-IO.

    :meth:`feed` takes bytes the caller has *peeked* and returns how many of
    them belong to the body and the decoded data found in them; the caller
    then consumes exactly that many bytes, so a pipelined request after the
    body stays unread.  Chunk extensions and trailer fields are validated for
    length and dropped.  After a :class:`ProtocolError` (400) the reader stays
    failed.
    """

    __slots__ = ("_fed", "_line", "_remaining", "_state", "_trailer_size", "trailer_start")

    def __init__(self) -> None:
        self._state = _ChunkState.SIZE
        self._remaining = 0
        self._line = bytearray()
        self._trailer_size = 0
        self._fed = 0
        #: Offset, counted from the body's first byte, where the trailer
        #: section begins (past the last chunk's size line); None before.
        self.trailer_start: int | None = None

    @property
    def done(self) -> bool:
        return self._state is _ChunkState.DONE

    def feed(self, data: bytes) -> tuple[int, list[bytes]]:
        """Return ``(consumed, decoded_pieces)`` for a prefix of ``data``."""
        if self._state is _ChunkState.FAILED:
            raise ProtocolError("chunked body already failed")
        try:
            return self._feed(data)
        except ProtocolError:
            self._state = _ChunkState.FAILED
            raise

    def _feed(self, data: bytes) -> tuple[int, list[bytes]]:
        pos, pieces, size = 0, [], len(data)
        while pos < size and self._state is not _ChunkState.DONE:
            state = self._state
            if state is _ChunkState.DATA:
                take = min(self._remaining, size - pos)
                pieces.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _ChunkState.DATA_CRLF
                continue
            # SIZE, DATA_CRLF and TRAILER are line-based.
            newline = data.find(b"\n", pos)
            stop = size if newline < 0 else newline + 1
            self._line += data[pos:stop]
            pos = stop
            if len(self._line) > MAX_CHUNK_LINE:
                raise ProtocolError(f"chunk line longer than {MAX_CHUNK_LINE} bytes")
            if newline < 0:
                break
            line, self._line = bytes(self._line), bytearray()
            if not line.endswith(b"\r\n"):
                raise ProtocolError("chunked body line ends with a bare LF")
            self._line_done(line[:-2])
            if state is _ChunkState.SIZE and self._state is _ChunkState.TRAILER:
                self.trailer_start = self._fed + pos
        self._fed += pos
        return pos, pieces

    def _line_done(self, line: bytes) -> None:
        if self._state is _ChunkState.DATA_CRLF:
            if line:
                raise ProtocolError("chunk data is not followed by CRLF")
            self._state = _ChunkState.SIZE
        elif self._state is _ChunkState.SIZE:
            self._remaining = chunk_size(line)
            self._state = _ChunkState.DATA if self._remaining else _ChunkState.TRAILER
        else:  # TRAILER: field lines up to the blank line that ends the body
            self._trailer_size += len(line) + 2
            if self._trailer_size > MAX_TRAILER_SIZE:
                raise ProtocolError(
                    f"trailer section larger than {MAX_TRAILER_SIZE} bytes", status_hint=431
                )
            if not line:
                self._state = _ChunkState.DONE
            else:
                check_trailer_field(line)
