"""The PROXY protocol parser: every version and family, whole, byte by byte and
at every split point, the invalid headers the specification says to drop, and
a property test against an independent encoder."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdhandoff.errors import ProtocolError
from fdhandoff.proxyproto import MAX_HEADER_SIZE, V2_SIGNATURE, ProxyHeader, parse

REQUEST = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def v2(
    command: int = 0x1,
    family: int = 0x11,
    addresses: bytes = b"",
    tlvs: bytes = b"",
    version: int = 2,
) -> bytes:
    block = addresses + tlvs
    return (
        V2_SIGNATURE
        + bytes([version << 4 | command, family])
        + struct.pack("!H", len(block))
        + block
    )


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.ip_address(src).packed
        + ipaddress.ip_address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def ssl_tlv(client: int, sub: bytes = b"") -> bytes:
    return tlv(0x20, bytes([client]) + b"\x00\x00\x00\x00" + sub)


_CASES: list[tuple[bytes, ProxyHeader]] = [
    (
        b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\n",
        ProxyHeader(0, ("192.0.2.10", 56324), ("198.51.100.1", 443)),
    ),
    (
        b"PROXY TCP6 2001:db8::10 2001:db8::1 1 65535\r\n",
        ProxyHeader(0, ("2001:db8::10", 1), ("2001:db8::1", 65535)),
    ),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(0)),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ProxyHeader(0)),
    (
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        ProxyHeader(0, ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
    ),
    (
        v2(addresses=inet("192.0.2.10", "198.51.100.1", 56324, 443)),
        ProxyHeader(0, ("192.0.2.10", 56324), ("198.51.100.1", 443), version=2),
    ),
    (
        v2(family=0x21, addresses=inet("2001:db8::10", "2001:db8::1", 5, 6)),
        ProxyHeader(0, ("2001:db8::10", 5), ("2001:db8::1", 6), version=2),
    ),
    # An IPv4 client of a dual-stack balancer, as the IPv4 address it is.
    (
        v2(family=0x21, addresses=inet("::ffff:192.0.2.7", "2001:db8::1", 5, 6)),
        ProxyHeader(0, ("192.0.2.7", 5), ("2001:db8::1", 6), version=2),
    ),
    # LOCAL: the balancer's health check; whatever follows is skipped.
    (v2(command=0x0, family=0x00), ProxyHeader(0, version=2)),
    (v2(command=0x0, family=0x11, addresses=b"\x01" * 12), ProxyHeader(0, version=2)),
    (v2(family=0x00, tlvs=tlv(0x04, b"x")), ProxyHeader(0, version=2)),
    (v2(family=0x31, addresses=b"/run/a".ljust(216, b"\0")), ProxyHeader(0, version=2)),
    # Extensions: SSL with the client bit, and others skipped.
    (
        v2(
            addresses=inet("192.0.2.1", "192.0.2.2", 1, 443),
            tlvs=ssl_tlv(0x01, tlv(0x21, b"TLSv1.3")),
        ),
        ProxyHeader(0, ("192.0.2.1", 1), ("192.0.2.2", 443), ssl=True, version=2),
    ),
    (
        v2(addresses=inet("192.0.2.1", "192.0.2.2", 1, 80), tlvs=tlv(0x05, b"id") + ssl_tlv(0x00)),
        ProxyHeader(0, ("192.0.2.1", 1), ("192.0.2.2", 80), version=2),
    ),
    (
        v2(addresses=inet("192.0.2.1", "192.0.2.2", 1, 80), tlvs=tlv(0xEA, b"\0" * 300)),
        ProxyHeader(0, ("192.0.2.1", 1), ("192.0.2.2", 80), version=2),
    ),
]
#: The expected lengths are the headers' own: what follows belongs to the request.
VALID = [(header, replace(expected, length=len(header))) for header, expected in _CASES]


@pytest.mark.parametrize(("header", "expected"), VALID)
def test_valid_header_whole(header: bytes, expected: ProxyHeader) -> None:
    assert parse(header) == expected
    # What follows is not the header's: its length stops before the request.
    assert parse(header + REQUEST) == expected


@pytest.mark.parametrize(("header", "expected"), VALID)
def test_valid_header_at_every_split(header: bytes, expected: ProxyHeader) -> None:
    # Byte by byte: every prefix asks for more, never errs, never decides early.
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, cut
    for extra in range(len(REQUEST) + 1):
        assert parse(header + REQUEST[:extra]) == expected


INVALID: list[tuple[bytes, str]] = [
    (REQUEST, "no PROXY protocol header"),
    (b"\x16\x03\x01\x02\x00\x01", "no PROXY protocol header"),  # a TLS ClientHello
    (b"PROXI", "no PROXY protocol header"),
    (b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "no PROXY protocol header"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bare LF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "bare LF or CR"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\nGET / HTTP/1.1\r\n", "bare LF or CR"),
    (b"PROXY " + b"A" * 120, "without CRLF in its first 107 bytes"),
    (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
    (b"PROXY \r\n", "unknown protocol"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "4 fields"),
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "4 fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "4 fields"),
    (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "invalid address"),
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "invalid address"),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "is an IPv6 address"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "is an IPv4 address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "invalid port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "invalid port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "invalid port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "invalid port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa3 2\r\n", "invalid port"),
    (b"\r\n\r\n\x00\r\nQUIX\n", "no PROXY protocol header"),
    (v2(version=1), "version 1, expected 2"),
    (v2(command=0x2), "unknown command 2"),
    (v2(family=0x41), "unknown family/transport"),
    (v2(family=0x13), "unknown family/transport"),
    (v2(family=0x12, addresses=b"\0" * 12), "datagram"),
    (v2(family=0x11, addresses=b"\0" * 11), "the addresses need 12"),
    (v2(family=0x21, addresses=b"\0" * 12), "the addresses need 36"),
    (v2(family=0x31, addresses=b"\0" * 100), "the addresses need 216"),
    (v2(addresses=b"\0" * 12, tlvs=b"\x20\x00"), "truncated extension"),
    (v2(addresses=b"\0" * 12, tlvs=b"\x20\x00\x09abc"), "runs past the header"),
    (v2(addresses=b"\0" * 12, tlvs=tlv(0x20, b"\x01\0")), "PP2_TYPE_SSL shorter"),
    (
        V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_HEADER_SIZE),
        f"more than the limit of {MAX_HEADER_SIZE}",
    ),
]


@pytest.mark.parametrize(("data", "reason"), INVALID)
def test_invalid_header_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse(data)


@pytest.mark.parametrize(("data", "reason"), INVALID)
def test_invalid_header_is_refused_as_soon_as_it_is_invalid(data: bytes, reason: str) -> None:
    """Fed byte by byte: once refused, every longer prefix is refused too, and
    no prefix is mistaken for a valid header."""
    refused_at = None
    for cut in range(1, len(data) + 1):
        try:
            result = parse(data[:cut])
        except ProtocolError:
            refused_at = refused_at or cut
            continue
        assert refused_at is None, (cut, refused_at)
        assert result is None, cut
    assert refused_at is not None


def test_the_empty_input_asks_for_more() -> None:
    assert parse(b"") is None


# --- property: an independent encoder, any addresses and ports, any split ---------------


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, tuple[str, int], tuple[str, int], bool]:
    six = draw(st.booleans())
    if six:
        address = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None)
    else:
        address = st.ip_addresses(v=4)
    src, dst = draw(address), draw(address)
    sport, dport = draw(st.integers(0, 65535)), draw(st.integers(0, 65535))
    ssl = False
    if draw(st.booleans()):
        header = b"PROXY TCP%d %s %s %d %d\r\n" % (
            6 if six else 4,
            str(src).encode(),
            str(dst).encode(),
            sport,
            dport,
        )
    else:
        ssl = draw(st.booleans())
        extra = draw(
            st.lists(
                st.tuples(st.integers(0, 255).filter(lambda k: k != 0x20), st.binary(max_size=40)),
                max_size=4,
            )
        )
        tlvs = b"".join(tlv(kind, value) for kind, value in extra)
        if ssl:
            tlvs += ssl_tlv(0x01 | draw(st.integers(0, 7)) << 1)
        header = v2(
            family=0x21 if six else 0x11,
            addresses=inet(str(src), str(dst), sport, dport),
            tlvs=tlvs,
        )
    return header, (str(src), sport), (str(dst), dport), ssl


@given(headers(), st.binary(max_size=64), st.data())
def test_any_header_parses_at_any_split(
    case: tuple[bytes, tuple[str, int], tuple[str, int], bool], rest: bytes, data: st.DataObject
) -> None:
    header, source, destination, ssl = case
    cut = data.draw(st.integers(0, len(header)))
    if cut < len(header):
        assert parse(header[:cut]) is None
    parsed = parse(header + rest)
    assert parsed is not None
    assert (parsed.length, parsed.source, parsed.destination, parsed.ssl) == (
        len(header),
        source,
        destination,
        ssl,
    )


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(data: bytes) -> None:
    try:
        result = parse(data)
    except ProtocolError:
        return
    if result is not None:
        assert 0 < result.length <= len(data)


@given(st.binary(max_size=120))
def test_arbitrary_bytes_after_the_v2_signature(tail: bytes) -> None:
    try:
        result = parse(V2_SIGNATURE + tail)
    except ProtocolError:
        return
    if result is not None:
        assert 16 <= result.length <= 16 + len(tail)
