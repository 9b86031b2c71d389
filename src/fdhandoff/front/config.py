"""The front's configuration: TOML (or command-line flags) → small frozen dataclasses.

Every key, its default and its meaning is listed in docs/front.md.  Loading
collects *every* problem before failing, each one naming the key path, the
value and why (``route[1].mode = 'websockets': not one of auth, pass,
websocket (did you mean 'websocket'?)``), and raises one
:class:`~fdhandoff.errors.ConfigError` holding them all.  Unknown keys are
errors: a misspelt limit must never silently fall back to its default.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Final, TypeVar

from ..errors import ConfigError
from ..httphead import (
    HEAD_LIMIT_RANGES,
    MAX_HEAD_SIZE,
    MAX_HEADERS,
    MAX_URI_LENGTH,
    HeadLimits,
    is_token,
)
from ..metrics import parse_address as parse_metrics_address
from .tls import NamedCertificate, TlsFiles

__all__ = [
    "Address",
    "FrontConfig",
    "HandoffFormat",
    "Limits",
    "LogConfig",
    "Mode",
    "RouteConfig",
    "Timeouts",
    "build_config",
    "load_config",
    "parse_address",
]

# --- defaults (docs/front.md and docs/security.md give the reasons) -------------------

#: listen(2) backlog.  somaxconn is 4096 on current kernels; 1024 absorbs a
#: burst of new connections while the loop is busy, as nginx's 511 does.
DEFAULT_BACKLOG: Final = 1024
#: Auth mode: largest request body forwarded to the application (413 above).
MAX_BODY_SIZE: Final = 10 * 1024 * 1024
#: Auth mode: largest response head accepted from the application (502 above).
#: 256 KiB: an ``X-Handoff-Data`` of Apache's largest payload
#: (message.MAX_PAYLOAD_SIZE, 212960 bytes) plus a head as large as a request
#: head may be (32 KiB), so a payload is judged by Apache's limit (500 above
#: it) and not cut short by this one.  The buffer grows only as the head
#: arrives: an application sending small heads costs no more than before.
MAX_RESPONSE_HEAD_SIZE: Final = 256 * 1024
#: Auth mode: at most this much of a dropped application response body is read
#: and discarded before the upstream connection is closed.
MAX_DISCARD_SIZE: Final = 1024 * 1024
#: Longest UNIX socket path: sun_path holds 108 bytes with the final NUL (unix(7)).
MAX_UNIX_PATH: Final = 107


class Mode(Enum):
    """What a route does with a request."""

    PASS = "pass"  # noqa: S105  (hand off the connection right after the head)
    WEBSOCKET = "websocket"  #: answer the upgrade (101), then hand off
    AUTH = "auth"  #: ask an HTTP application; it may name a daemon to hand off to


class HandoffFormat(Enum):
    """Wire format of an auth-mode handoff."""

    APACHE = "apache"  #: mod_socket_handoff: SOCK_SEQPACKET, payload verbatim
    SCGI = "scgi"  #: SOCK_STREAM, the SCGI description with HANDOFF_DATA


@dataclass(frozen=True, slots=True)
class Address:
    """A listen address or an upstream: TCP (``host``, ``port``) or UNIX (``path``)."""

    text: str
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    prefix: str
    mode: Mode = Mode.PASS
    host: str | None = None
    #: pass / websocket: the receiver's UNIX socket path.
    backend: str = ""
    #: auth: the application.
    upstream: Address | None = None
    #: auth: X-Socket-Handoff paths must resolve (symlinks included) inside it.
    allowed_prefix: str = ""
    handoff_format: HandoffFormat = HandoffFormat.APACHE
    #: websocket: the subprotocols the backend speaks (RFC 6455 §1.9); the
    #: front answers the client's first offer among them in its ``101``.
    subprotocols: tuple[bytes, ...] = ()
    #: websocket: the page origins allowed to connect (lower case); empty: any.
    allowed_origins: tuple[bytes, ...] = ()


#: Channels (persistent UNIX connections, docs/protocol.md) kept open to each
#: backend whose receiver accepts them.  One suffices for a busy single
#: receiver; more spread handoffs over ``--workers`` processes (each channel
#: belongs to the worker that accepted it) and keep one slow worker from
#: delaying the rest.  0: a new connection per handoff, nothing offered.
CHANNELS_PER_BACKEND: Final = 4


@dataclass(frozen=True, slots=True)
class Limits:
    max_head_size: int = MAX_HEAD_SIZE
    max_uri_length: int = MAX_URI_LENGTH
    max_headers: int = MAX_HEADERS
    max_body_size: int = MAX_BODY_SIZE
    max_response_head_size: int = MAX_RESPONSE_HEAD_SIZE
    max_discard_size: int = MAX_DISCARD_SIZE
    channels: int = CHANNELS_PER_BACKEND

    @property
    def head(self) -> HeadLimits:
        return HeadLimits(self.max_head_size, self.max_uri_length, self.max_headers)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds.  Reasons and statuses: docs/security.md."""

    head: float = 10.0
    handoff: float = 1.0
    upstream_connect: float = 5.0
    upstream: float = 60.0
    body: float = 30.0
    linger: float = 2.0
    shutdown: float = 10.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    #: "stderr", "off", or a file path (appended to).
    access: str = "stderr"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class FrontConfig:
    listen: tuple[Address, ...]
    routes: tuple[RouteConfig, ...]
    backlog: tuple[int, ...] = ()
    #: Per listener (same order as ``listen``): its certificate and key, or None.
    tls: tuple[TlsFiles | None, ...] = ()
    #: Per listener: every connection starts with a PROXY protocol header.
    proxy_protocol: tuple[bool, ...] = ()
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    log: LogConfig = field(default_factory=LogConfig)
    #: ``HOST:PORT`` serving ``GET /metrics`` (Prometheus text), or None.
    metrics: str | None = None
    #: Processes accepting on the listeners (``workers``); 1: no supervisor.
    workers: int = 1


# --- validation helpers ---------------------------------------------------------------

_T = TypeVar("_T")


class _Errors:
    """Collects problems as ``key path = value: why`` lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: str, value: object, why: str) -> None:
        if value is _MISSING:
            shown = "(missing)"
        elif isinstance(value, bool):
            shown = "true" if value else "false"  # as written in TOML
        else:
            shown = repr(value)
        self.lines.append(f"{path} = {shown}: {why}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError("\n".join(self.lines))


_MISSING: Final = object()


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(table: Mapping[str, Any], allowed: list[str], path: str, errors: _Errors) -> None:
    for key in table:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            hint = _did_you_mean(key, allowed)
            errors.add(where, table[key], f"unknown key{hint}; known: {', '.join(allowed)}")


def _number(
    table: Mapping[str, Any],
    key: str,
    path: str,
    errors: _Errors,
    *,
    default: _T,
    kind: type,
    low: float,
    high: float,
) -> _T:
    value = table.get(key, _MISSING)
    if value is _MISSING:
        return default
    ok_type = isinstance(value, int | float) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok_type:
        expected = "a number" if kind is float else "an integer"
        errors.add(f"{path}.{key}", value, f"must be {expected}")
        return default
    if not low <= value <= high:
        errors.add(f"{path}.{key}", value, f"must be between {low:g} and {high:g}")
        return default
    return kind(value)  # type: ignore[no-any-return]


def _string(table: Mapping[str, Any], key: str, path: str, errors: _Errors) -> str | None:
    value = table.get(key, _MISSING)
    if value is _MISSING:
        return None
    if not isinstance(value, str) or not value:
        errors.add(f"{path}.{key}", value, "must be a non-empty string")
        return None
    return value


def _enum(
    table: Mapping[str, Any],
    key: str,
    path: str,
    errors: _Errors,
    *,
    enum: type[Enum],
    default: Any,
) -> Any:
    value = table.get(key, _MISSING)
    if value is _MISSING:
        return default
    names = sorted(member.value for member in enum)
    if not isinstance(value, str) or value not in names:
        hint = _did_you_mean(value, names) if isinstance(value, str) else ""
        errors.add(f"{path}.{key}", value, f"not one of {', '.join(names)}{hint}")
        return default
    return enum(value)


def parse_address(text: str, *, what: str = "address") -> Address:
    """``host:port`` (IPv4), ``[v6]:port`` or ``unix:/absolute/path``; ValueError if not."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError(f"the {what} path after 'unix:' must be absolute")
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            raise ValueError(f"UNIX socket paths are limited to {MAX_UNIX_PATH} bytes (unix(7))")
        return Address(text, path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT, [IPV6]:PORT or unix:/PATH")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        family = 6
    else:
        family = 4
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (IPv6 goes in brackets)") from None
    if ip.version != family:
        raise ValueError("IPv6 addresses must be written in brackets: [::1]:8080")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number from 0 to 65535")
    return Address(text, host=str(ip), port=int(port_text))


def _upstream(text: str) -> Address:
    if text.startswith("unix:"):
        return parse_address(text, what="upstream")
    if not text.startswith("http://"):
        raise ValueError("expected http://HOST:PORT or unix:/PATH (https is not supported)")
    authority = text[7:]
    if "/" in authority.rstrip("/") or "?" in authority or "@" in authority:
        raise ValueError("the upstream is an origin only: http://HOST[:PORT], no path")
    authority = authority.rstrip("/")
    if authority.startswith("["):
        close = authority.find("]")
        host, rest = authority[1:close], authority[close + 1 :]
    else:
        host, _, port_part = authority.partition(":")
        rest = ":" + port_part if port_part else ""
    port_text = rest[1:] if rest.startswith(":") else "80"
    if not host or (rest and not rest.startswith(":")):
        raise ValueError("expected http://HOST[:PORT]")
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number from 1 to 65535")
    return Address(text, host=host, port=int(port_text))


def _backend_path(text: str) -> str:
    if not text.startswith("unix:"):
        raise ValueError("a backend is a UNIX socket: unix:/PATH")
    address = parse_address(text, what="backend")
    if not address.is_unix:
        raise ValueError("a backend is a UNIX socket: unix:/PATH")
    return address.path


# --- sections ----------------------------------------------------------------------------

_TOP_KEYS: Final = ["limits", "listen", "log", "metrics", "route", "timeouts", "workers"]

#: Most worker processes a front may run (``workers``).
MAX_WORKERS: Final = 256


def usable_cpus() -> int:
    """CPUs this process may run on (``workers = "auto"``): its affinity mask,
    which ``CPUAffinity=`` or ``taskset`` narrows, not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - Linux has it
        return os.cpu_count() or 1


def _workers(raw: Mapping[str, Any], override: int | None, errors: _Errors) -> int:
    where = "workers" if override is None else "--workers"
    value = raw.get("workers", 1) if override is None else override
    if value == "auto":
        return min(usable_cpus(), MAX_WORKERS)
    if isinstance(value, bool) or not isinstance(value, int):
        errors.add(where, value, 'must be an integer or "auto"')
        return 1
    if not 1 <= value <= MAX_WORKERS:
        errors.add(where, value, f"must be between 1 and {MAX_WORKERS}")
        return 1
    return value


_LISTEN_KEYS: Final = [
    "address",
    "backlog",
    "proxy_protocol",
    "sni",
    "tls_certificate",
    "tls_key",
]
_SNI_KEYS: Final = ["server_names", "tls_certificate", "tls_key"]
#: A host name as a client sends it in SNI (RFC 6066 §3: the A-label form,
#: no trailing dot), or a wildcard for its first label (RFC 6125 §6.4.3).
_SERVER_NAME: Final = re.compile(
    r"(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)
_ROUTE_KEYS: Final = [
    "allowed_origins",
    "allowed_prefix",
    "backend",
    "handoff_format",
    "host",
    "mode",
    "prefix",
    "subprotocols",
    "upstream",
]
_LOG_LEVELS: Final = ["debug", "info", "warning", "error"]


def _table(raw: Mapping[str, Any], key: str, errors: _Errors) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        errors.add(key, value, "must be a table ([" + key + "])")
        return {}
    return value


def _tables(raw: Mapping[str, Any], key: str, errors: _Errors) -> list[Mapping[str, Any]]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        errors.add(key, value, f"must be an array of tables ([[{key}]])")
        return []
    return value


def _proxy_protocol(table: Mapping[str, Any], path: str, errors: _Errors) -> bool:
    value = table.get("proxy_protocol", False)
    if not isinstance(value, bool):
        errors.add(f"{path}.proxy_protocol", value, "must be true or false")
        return False
    return value


def _listen(
    table: Mapping[str, Any], path: str, errors: _Errors
) -> tuple[Address | None, int, TlsFiles | None]:
    _check_keys(table, _LISTEN_KEYS, path, errors)
    backlog = _number(
        table, "backlog", path, errors, default=DEFAULT_BACKLOG, kind=int, low=1, high=65535
    )
    tls = _tls_files(table, path, errors)
    text = _string(table, "address", path, errors)
    if text is None:
        if "address" not in table:
            errors.add(f"{path}.address", _MISSING, "every [[listen]] needs an address")
        return None, backlog, tls
    try:
        address = parse_address(text)
    except ValueError as exc:
        where = path if path.startswith("--") else f"{path}.address"
        errors.add(where, text, str(exc))
        return None, backlog, tls
    if tls is not None and address.is_unix:
        errors.add(f"{path}.tls_certificate", tls.certificate, "TLS needs a TCP address")
    return address, backlog, tls


def _tls_files(table: Mapping[str, Any], path: str, errors: _Errors) -> TlsFiles | None:
    """Both ``tls_certificate`` and ``tls_key``, or neither (plain HTTP)."""
    certificate = _string(table, "tls_certificate", path, errors)
    key = _string(table, "tls_key", path, errors)
    for name, value, other in (
        ("tls_certificate", certificate, "tls_key"),
        ("tls_key", key, "tls_certificate"),
    ):
        if value is not None and other not in table:
            errors.add(f"{path}.{other}", _MISSING, f"{name} needs {other} too")
    named = _named_certificates(table, path, errors)
    if certificate is None or key is None:
        if "sni" in table and "tls_certificate" not in table:
            errors.add(
                f"{path}.sni",
                table["sni"],
                "needs tls_certificate and tls_key on the listener: the certificate for "
                "clients that name no listed host",
            )
        return None
    return TlsFiles(certificate, key, named)


def _named_certificates(
    table: Mapping[str, Any], path: str, errors: _Errors
) -> tuple[NamedCertificate, ...]:
    """``[[listen.sni]]``: certificates chosen by the server name a client sends."""
    raw = table.get("sni", [])
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        errors.add(f"{path}.sni", raw, "must be an array of tables ([[listen.sni]])")
        return ()
    seen: dict[str, str] = {}
    named: list[NamedCertificate] = []
    for index, item in enumerate(raw):
        where = f"{path}.sni[{index}]"
        _check_keys(item, _SNI_KEYS, where, errors)
        names: list[str] = []
        listed = item.get("server_names", _MISSING)
        if (
            not isinstance(listed, list)
            or not listed
            or not all(isinstance(n, str) for n in listed)
        ):
            errors.add(
                f"{where}.server_names",
                listed,
                'a non-empty list of host names, e.g. ["a.example"]',
            )
        else:
            for name in listed:
                lowered = name.lower().removesuffix(".")
                if not _SERVER_NAME.fullmatch(lowered) or len(lowered) > 253:
                    errors.add(
                        f"{where}.server_names",
                        name,
                        "not a host name (internationalized names in their xn-- form; a "
                        "wildcard is '*.' before a name)",
                    )
                elif lowered in seen:
                    errors.add(f"{where}.server_names", name, f"already listed in {seen[lowered]}")
                else:
                    seen[lowered] = where
                    names.append(lowered)
        certificate = _string(item, "tls_certificate", where, errors)
        key = _string(item, "tls_key", where, errors)
        for name_key in ("tls_certificate", "tls_key"):
            if name_key not in item:
                errors.add(f"{where}.{name_key}", _MISSING, "every [[listen.sni]] needs one")
        if names and certificate is not None and key is not None:
            named.append(NamedCertificate(tuple(names), certificate, key))
    return tuple(named)


def _route(table: Mapping[str, Any], path: str, errors: _Errors) -> RouteConfig | None:
    _check_keys(table, _ROUTE_KEYS, path, errors)
    before = len(errors.lines)
    prefix = _string(table, "prefix", path, errors)
    if prefix is None and "prefix" not in table:
        errors.add(f"{path}.prefix", _MISSING, "every [[route]] needs a prefix")
    elif prefix is not None and not prefix.startswith("/"):
        errors.add(f"{path}.prefix", prefix, "must start with '/'")
    host = _string(table, "host", path, errors)
    if host is not None and (not host.isascii() or ":" in host or "/" in host or " " in host):
        errors.add(f"{path}.host", host, "a host name without port (ASCII, IDNA-encoded)")
    mode: Mode = _enum(table, "mode", path, errors, enum=Mode, default=Mode.PASS)
    fmt: HandoffFormat = _enum(
        table, "handoff_format", path, errors, enum=HandoffFormat, default=HandoffFormat.APACHE
    )
    backend = _string(table, "backend", path, errors) or ""
    upstream_text = _string(table, "upstream", path, errors)
    allowed = _string(table, "allowed_prefix", path, errors) or ""
    subprotocols = _subprotocols(table, path, errors)
    origins = _origins(table, path, errors)
    for key in ("subprotocols", "allowed_origins"):
        if key in table and mode is not Mode.WEBSOCKET:
            errors.add(
                f"{path}.{key}", table[key], f"only used in websocket mode, not {mode.value}"
            )
    upstream: Address | None = None
    if mode is Mode.AUTH:
        for key in ("backend",):
            if key in table:
                errors.add(f"{path}.{key}", table[key], "not used in auth mode (the app names it)")
        if upstream_text is None:
            if "upstream" not in table:
                errors.add(f"{path}.upstream", _MISSING, "auth mode needs the application")
        else:
            try:
                upstream = _upstream(upstream_text)
            except ValueError as exc:
                errors.add(f"{path}.upstream", upstream_text, str(exc))
        if not allowed:
            if "allowed_prefix" not in table:
                errors.add(f"{path}.allowed_prefix", _MISSING, "auth mode needs a directory")
        elif not allowed.startswith("/"):
            errors.add(f"{path}.allowed_prefix", allowed, "must be an absolute directory")
    else:
        for key in ("upstream", "allowed_prefix", "handoff_format"):
            if key in table:
                errors.add(f"{path}.{key}", table[key], f"only used in auth mode, not {mode.value}")
        if not backend:
            if "backend" not in table:
                errors.add(f"{path}.backend", _MISSING, f"{mode.value} mode needs a backend")
        else:
            try:
                backend = _backend_path(backend)
            except ValueError as exc:
                errors.add(f"{path}.backend", backend, str(exc))
    if len(errors.lines) > before or prefix is None:
        return None
    return RouteConfig(prefix, mode, host, backend, upstream, allowed, fmt, subprotocols, origins)


#: scheme "://" host [":" port] (RFC 6454 §6.2), lower-cased; the host a
#: bracketed IPv6 literal or a name (browsers keep "_" in names).
_ORIGIN: Final = re.compile(
    r"([a-z][a-z0-9+.\-]*)://(\[[0-9a-f:.]+\]|[a-z0-9._~\-]+)(?::([0-9]+))?"
)
_DEFAULT_PORTS: Final = {"http": "80", "https": "443"}


def _origin(text: str) -> str:
    """``text`` as a browser serializes that origin (RFC 6454 §6.2), or ValueError.

    Browsers send the default port as nothing and IP addresses in one
    spelling; a value written otherwise could never match, so it is either
    brought to that form (default port, IPv6) or refused, naming the form.
    """
    if text == "null":
        return text
    if not text.isascii():
        raise ValueError("a host name outside ASCII is written in its IDNA form (xn--...)")
    match = _ORIGIN.fullmatch(text.lower())
    if match is None:
        raise ValueError("an origin is scheme://host[:port], without path or trailing slash")
    scheme, host, port = match.groups()
    if host.startswith("["):
        try:
            host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            raise ValueError(f"{host} is not an IPv6 address") from None
    elif host.replace(".", "").isdigit() or host.startswith("0x"):
        try:
            canonical = str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"{host} is not an IPv4 address in dotted decimal") from None
        if canonical != host:
            raise ValueError(f"browsers write this address {canonical}")
    if port is not None:
        if port != str(int(port)) or not 0 < int(port) < 65536:
            raise ValueError(f"port {port} is not a number from 1 to 65535 without leading zeros")
        if _DEFAULT_PORTS.get(scheme) == port:
            port = None  # browsers leave the default port out
    return f"{scheme}://{host}" + (f":{port}" if port else "")


def _strings(
    table: Mapping[str, Any], key: str, where: str, errors: _Errors, example: str
) -> list[str]:
    """``table[key]`` as a list of strings (empty if absent, or after an error)."""
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        errors.add(where, value, f"must be a list of strings, e.g. {example}")
        return []
    return value


def _origins(table: Mapping[str, Any], path: str, errors: _Errors) -> tuple[bytes, ...]:
    """``allowed_origins``: origins in the form browsers send them (see :func:`_origin`)."""
    where = f"{path}.allowed_origins"
    value = _strings(table, "allowed_origins", where, errors, '["https://example.com"]')
    origins: list[bytes] = []
    for item in value:
        try:
            origins.append(_origin(item).encode("ascii"))
        except ValueError as exc:
            errors.add(where, item, str(exc))
    return tuple(origins)


def _subprotocols(table: Mapping[str, Any], path: str, errors: _Errors) -> tuple[bytes, ...]:
    """``subprotocols``: distinct tokens (RFC 6455 §4.1: the values a client offers)."""
    where = f"{path}.subprotocols"
    value = _strings(table, "subprotocols", where, errors, '["graphql-transport-ws"]')
    bad = [item for item in value if not (item.isascii() and is_token(item.encode("ascii")))]
    for item in bad:
        errors.add(where, item, "a subprotocol is a token (RFC 6455 §4.1): no spaces or separators")
    if bad:
        return ()
    if len(set(value)) != len(value):
        errors.add(where, value, "lists a subprotocol twice")
        return ()
    return tuple(item.encode("ascii") for item in value)


def _limits(table: Mapping[str, Any], errors: _Errors) -> Limits:
    _check_keys(table, list(Limits.__dataclass_fields__), "limits", errors)
    d = Limits()
    head = {
        name: _number(
            table, name, "limits", errors, default=getattr(d, name), kind=int, low=low, high=high
        )
        for name, (low, high) in HEAD_LIMIT_RANGES.items()
    }
    limits = Limits(
        **head,
        max_body_size=_number(
            table,
            "max_body_size",
            "limits",
            errors,
            default=d.max_body_size,
            kind=int,
            low=0,
            high=1 << 40,
        ),
        max_response_head_size=_number(
            table,
            "max_response_head_size",
            "limits",
            errors,
            default=d.max_response_head_size,
            kind=int,
            low=1024,
            high=1 << 20,
        ),
        max_discard_size=_number(
            table,
            "max_discard_size",
            "limits",
            errors,
            default=d.max_discard_size,
            kind=int,
            low=0,
            high=1 << 30,
        ),
        channels=_number(
            table, "channels", "limits", errors, default=d.channels, kind=int, low=0, high=64
        ),
    )
    for name, value, problem in limits.head.problems():  # out of range: reported above
        errors.add(f"limits.{name}", value, problem)
    return limits


def _timeouts(table: Mapping[str, Any], errors: _Errors) -> Timeouts:
    names = list(Timeouts.__dataclass_fields__)
    _check_keys(table, names, "timeouts", errors)
    d = Timeouts()
    values = {
        name: _number(
            table,
            name,
            "timeouts",
            errors,
            default=getattr(d, name),
            kind=float,
            low=0.001,
            high=86400.0,
        )
        for name in names
    }
    return Timeouts(**values)


def _log(table: Mapping[str, Any], errors: _Errors) -> LogConfig:
    _check_keys(table, ["access", "level"], "log", errors)
    access = _string(table, "access", "log", errors) or "stderr"
    level = table.get("level", "info")
    if level not in _LOG_LEVELS:
        hint = _did_you_mean(level, _LOG_LEVELS) if isinstance(level, str) else ""
        errors.add("log.level", level, f"not one of {', '.join(_LOG_LEVELS)}{hint}")
        level = "info"
    if access not in ("stderr", "off") and not access.startswith("/"):
        errors.add("log.access", access, "'stderr', 'off' or an absolute file path")
    return LogConfig(access, level)


def _metrics(table: Mapping[str, Any], errors: _Errors) -> str | None:
    _check_keys(table, ["address"], "metrics", errors)
    address = _string(table, "address", "metrics", errors)
    if address is None:
        return None
    try:
        parse_metrics_address(address)
    except ValueError as exc:
        errors.add("metrics.address", address, str(exc))
        return None
    return address


def build_config(
    raw: Mapping[str, Any],
    *,
    listen: list[str] | None = None,
    routes: list[str] | None = None,
    workers: int | None = None,
) -> FrontConfig:
    """Validate a parsed TOML document plus the command-line quick flags.

    ``listen`` (``--listen``) replaces the file's listeners when given;
    ``routes`` (``--route PREFIX=unix:PATH``, pass mode) are added to its
    routes; ``workers`` (``--workers``) replaces the file's ``workers``.
    """
    errors = _Errors()
    _check_keys(raw, _TOP_KEYS, "", errors)
    addresses: list[Address] = []
    backlogs: list[int] = []
    tls: list[TlsFiles | None] = []
    proxied: list[bool] = []
    listen_tables = (
        [{"address": text} for text in listen] if listen else _tables(raw, "listen", errors)
    )
    for index, table in enumerate(listen_tables):
        label = "--listen" if listen else f"listen[{index}]"
        address, backlog, files = _listen(table, label, errors)
        proxy = _proxy_protocol(table, label, errors)
        if address is not None:
            addresses.append(address)
            backlogs.append(backlog)
            tls.append(files)
            proxied.append(proxy)
    route_configs: list[RouteConfig] = []
    route_tables = [(f"route[{i}]", t) for i, t in enumerate(_tables(raw, "route", errors))]
    for text in routes or []:
        prefix, sep, backend = text.partition("=")
        if not sep:
            errors.add(f"--route {text!r}", text, "expected PREFIX=unix:PATH")
            continue
        route_tables.append((f"--route {text!r}", {"prefix": prefix, "backend": backend}))
    seen: dict[tuple[str, str | None], str] = {}
    for label, table in route_tables:
        route = _route(table, label, errors)
        if route is None:
            continue
        key = (route.prefix, route.host.lower() if route.host else None)
        if key in seen:
            errors.add(f"{label}.prefix", route.prefix, f"same prefix and host as {seen[key]}")
            continue
        seen[key] = label
        route_configs.append(route)
    if not addresses and not errors.lines:
        errors.add("listen", [], "nothing to listen on: add a [[listen]] table or --listen")
    if not route_configs and not errors.lines:
        errors.add("route", [], "no routes: add a [[route]] table or --route")
    seen_listen: set[str] = set()
    for address in addresses:
        if address.text in seen_listen and not address.text.endswith(":0"):
            errors.add("listen", address.text, "listed twice")
        seen_listen.add(address.text)
    config = FrontConfig(
        tuple(addresses),
        tuple(route_configs),
        tuple(backlogs),
        tuple(tls),
        tuple(proxied),
        _limits(_table(raw, "limits", errors), errors),
        _timeouts(_table(raw, "timeouts", errors), errors),
        _log(_table(raw, "log", errors), errors),
        _metrics(_table(raw, "metrics", errors), errors),
        _workers(raw, workers, errors),
    )
    errors.raise_if_any()
    return config


def load_config(
    path: str | os.PathLike[str] | None,
    *,
    listen: list[str] | None = None,
    routes: list[str] | None = None,
    workers: int | None = None,
) -> FrontConfig:
    """Read and validate a TOML file (optional when flags give listen and routes)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with Path(path).open("rb") as handle:
                raw = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:  # TOML is UTF-8 (a stray Latin-1 byte)
            raise ConfigError(f"{path}: not valid TOML: not UTF-8 at byte {exc.start}") from None
    return build_config(raw, listen=listen, routes=routes, workers=workers)


def warnings(config: FrontConfig) -> list[str]:
    """Things that are valid but probably wrong right now (``fdhandoff check``)."""
    found: list[str] = []
    for route in config.routes:
        if route.backend and not os.path.exists(route.backend):
            found.append(
                f"route {route.prefix!r}: backend {route.backend} does not exist yet "
                f"(requests answer 503 until it does)"
            )
        if route.allowed_prefix and not os.path.isdir(route.allowed_prefix):
            found.append(
                f"route {route.prefix!r}: allowed_prefix {route.allowed_prefix} "
                "is not an existing directory"
            )
        if b"null" in route.allowed_origins:
            found.append(
                f"route {route.prefix!r}: allowed_origins lists null, the origin of every "
                "sandboxed frame and file: page, whatever site it comes from"
            )
    return found
