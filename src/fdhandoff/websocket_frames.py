"""WebSocket frame layout (RFC 6455 §5.2): opcodes, close codes, masking, encoding.

The stateless half of the codec; :mod:`fdhandoff.websocket` holds the
connection state machine that parses frames and uses these helpers.

Frame layout::

     0                   1                   2                   3
    +-+-+-+-+-------+-+-------------+-------------------------------+
    |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
    |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
    |N|V|V|V|       |S|             |   (if payload len==126/127)   |
    +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
    |  Extended payload length continued, if payload len == 127     |
    + - - - - - - - - - - - - - - - +-------------------------------+
    |                               | Masking-key, if MASK set      |
    +-------------------------------+-------------------------------+
    | Masking-key (continued)       |          Payload Data         |
    +-------------------------------+ - - - - - - - - - - - - - - - +
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

__all__ = [
    "MAX_CONTROL_PAYLOAD",
    "MAX_REASON_BYTES",
    "CloseCode",
    "Opcode",
    "apply_mask",
    "encode_close_payload",
    "encode_frame",
    "is_valid_close_code",
]


class Opcode(IntEnum):
    """Frame opcodes (RFC 6455 §5.2, §11.8); 3-7 and 11-15 are reserved."""

    CONTINUATION = 0
    TEXT = 1
    BINARY = 2
    CLOSE = 8
    PING = 9
    PONG = 10


class CloseCode(IntEnum):
    """Close status codes (RFC 6455 §7.4.1 and the IANA registry, §11.7)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # never sent: "the close frame had no status code"
    ABNORMAL = 1006  # never sent: "the connection closed without a close frame"
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015  # never sent


#: Control frames carry at most 125 payload bytes (§5.5), so the 7-bit length suffices.
MAX_CONTROL_PAYLOAD: Final = 125

#: A close payload is a 2-byte code plus the reason, within the control limit.
MAX_REASON_BYTES: Final = MAX_CONTROL_PAYLOAD - 2

# Codes that may appear in a close frame (§7.4.1, §7.4.2): 1000-1003 and
# 1007-1014 are defined or registered with IANA; 1004 is reserved; 1005, 1006
# and 1015 must never be put on the wire; 1016-2999 are reserved for future
# RFCs; 3000-3999 are for IANA-registered libraries and 4000-4999 private use.
_SENDABLE_DEFINED: Final = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})


def is_valid_close_code(code: int) -> bool:
    """True if ``code`` may be carried by a close frame."""
    return code in _SENDABLE_DEFINED or 3000 <= code <= 4999


# Masking (§5.3).  Python-level byte loops run at ~10 MB/s; XOR of two big
# integers runs in C.  Converting a whole 1 MiB payload at once is slower
# (~260 MB/s) than going through it in 4 KiB pieces (~750 MB/s; figures in
# docs/websocket.md), because the repeated mask integer is then built once per
# call and each piece stays in cache.
_MASK_CHUNK: Final = 4096


def _xor(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    n = len(data)
    repeated = (mask * ((n >> 2) + 1))[:n]
    value = int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")
    return value.to_bytes(n, "little")


def apply_mask(data: bytes | bytearray | memoryview, mask: bytes, offset: int = 0) -> bytes:
    """XOR ``data`` with the 4-byte ``mask``; ``offset`` is the position of
    ``data[0]`` in the payload (for payloads processed piece by piece).

    Masking is its own inverse: the same call masks and unmasks.
    """
    if offset & 3:
        offset &= 3
        mask = mask[offset:] + mask[:offset]
    n = len(data)
    if n <= _MASK_CHUNK:
        return _xor(data, mask) if n else b""
    view = memoryview(data)
    chunk_mask = int.from_bytes(mask * (_MASK_CHUNK // 4), "little")
    from_bytes = int.from_bytes
    parts = [
        (from_bytes(view[start : start + _MASK_CHUNK], "little") ^ chunk_mask).to_bytes(
            _MASK_CHUNK, "little"
        )
        for start in range(0, n - _MASK_CHUNK + 1, _MASK_CHUNK)
    ]
    tail = n % _MASK_CHUNK  # _MASK_CHUNK is a multiple of 4: the tail starts at mask[0]
    if tail:
        parts.append(_xor(view[n - tail :], mask))
    return b"".join(parts)


def encode_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    mask: bytes | None = None,
    rsv: int = 0,
) -> bytes:
    """One frame, with the shortest length encoding (§5.2 requires it).

    ``mask`` is the 4-byte masking key (clients must mask, servers must not);
    ``rsv`` the three RSV bits as an integer 0-7 (only for tests: nothing here
    negotiates an extension).
    """
    if not 0 <= opcode <= 0xF or not 0 <= rsv <= 7:
        raise ValueError(f"opcode {opcode} or rsv {rsv} out of range")
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        header = bytes((first, mask_bit | n))
    elif n <= 0xFFFF:
        header = bytes((first, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((first, mask_bit | 127)) + n.to_bytes(8, "big")
    if mask is None:
        return header + payload
    if len(mask) != 4:
        raise ValueError("a masking key is 4 bytes")
    return header + mask + apply_mask(payload, mask)


def encode_close_payload(code: int, reason: str = "") -> bytes:
    """The payload of a close frame; raises ``ValueError`` for a code that
    must not be sent or a reason over 123 UTF-8 bytes.  ``NO_STATUS`` (1005)
    gives an empty payload (a close frame without a code, §5.5.1)."""
    if code == CloseCode.NO_STATUS:
        if reason:
            raise ValueError("a close frame without a status code cannot carry a reason")
        return b""
    if not is_valid_close_code(code):
        raise ValueError(f"close code {code} must not be sent (RFC 6455 §7.4)")
    encoded = reason.encode("utf-8")
    if len(encoded) > MAX_REASON_BYTES:
        raise ValueError(f"close reason is {len(encoded)} bytes; the limit is {MAX_REASON_BYTES}")
    return code.to_bytes(2, "big") + encoded
