"""Certificates chosen by server name (``[[listen.sni]]``, RFC 6066 §3).

The choice happens in the handshake, before kernel TLS takes over, so it is
tested here with real handshakes over a socket pair on any kernel (OpenSSL
falls back to its own record layer where the kernel has no ``tls`` module);
``tests/test_front_ktls.py`` checks it end to end on kernel TLS with curl.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from fdhandoff.errors import ConfigError
from fdhandoff.front.config import build_config
from fdhandoff.front.tls import NamedCertificate, TlsFiles, server_context

ROUTE = [{"prefix": "/", "backend": "unix:/run/r.sock"}]


def make_cert(where: Path, name: str) -> tuple[str, str]:
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is needed to make a test certificate"
    cert, key = where / f"{name}.pem", where / f"{name}.key"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
        ],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return str(cert), str(key)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    where = tmp_path_factory.mktemp("sni")
    return {name: make_cert(where, name) for name in ("default", "api", "wild")}


def served_name(context: ssl.SSLContext, server_name: str | None) -> str:
    """The CN of the certificate the server presents to a client asking for ``server_name``."""
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(10)
    client_sock.settimeout(10)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with context.wrap_socket(server_sock, server_side=True) as tls:
                tls.recv(1)
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE  # the certificate is read, not verified
    try:
        with client.wrap_socket(client_sock, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            pem = ssl.DER_cert_to_PEM_cert(der)
    finally:
        thread.join(10)
    assert not errors, errors
    decoded = subprocess.run(
        ["openssl", "x509", "-noout", "-subject"],
        input=pem.encode(), capture_output=True, check=True, timeout=30,
    )  # fmt: skip
    return decoded.stdout.decode().strip().rsplit("=", 1)[-1].strip()


def test_the_certificate_follows_the_server_name(certs: dict[str, tuple[str, str]]) -> None:
    files = TlsFiles(
        *certs["default"],
        named=(
            NamedCertificate(("api.example.com", "api.example.org"), *certs["api"]),
            NamedCertificate(("*.example.net",), *certs["wild"]),
        ),
    )
    context = server_context(files)
    assert served_name(context, "api.example.com") == "api"
    assert served_name(context, "API.Example.Org") == "api"  # names are case-insensitive
    assert served_name(context, "a.example.net") == "wild"
    # A wildcard stands for exactly one label (RFC 6125 §6.4.3).
    assert served_name(context, "example.net") == "default"
    assert served_name(context, "a.b.example.net") == "default"
    # No name, or one nobody lists: the listener's own certificate.
    assert served_name(context, None) == "default"
    assert served_name(context, "other.example.com") == "default"


def test_without_named_certificates_there_is_no_choice(certs: dict[str, tuple[str, str]]) -> None:
    context = server_context(TlsFiles(*certs["default"]))
    assert context.sni_callback is None
    assert served_name(context, "api.example.com") == "default"


def test_a_named_certificate_that_cannot_be_loaded_names_its_file(
    certs: dict[str, tuple[str, str]],
) -> None:
    files = TlsFiles(
        *certs["default"], named=(NamedCertificate(("a.example",), "/nope.pem", "/k"),)
    )
    with pytest.raises(ConfigError, match=re.escape("TLS certificate /nope.pem: No such file")):
        server_context(files)


def _listen(**extra: object) -> dict[str, object]:
    return {"address": "127.0.0.1:1", "tls_certificate": "/c", "tls_key": "/k", **extra}


def _errors(listen: dict[str, object]) -> list[str]:
    try:
        build_config({"listen": [listen], "route": ROUTE})
    except ConfigError as exc:
        return str(exc).splitlines()
    return []


def test_sni_tables_are_read_with_lower_case_names() -> None:
    config = build_config(
        {
            "listen": [
                _listen(
                    sni=[
                        {"server_names": ["API.example.com."], "tls_certificate": "/a",
                         "tls_key": "/ak"},
                        {"server_names": ["*.example.net"], "tls_certificate": "/w",
                         "tls_key": "/wk"},
                    ]
                )
            ],
            "route": ROUTE,
        }
    )  # fmt: skip
    files = config.tls[0]
    assert files is not None
    assert files.named == (
        NamedCertificate(("api.example.com",), "/a", "/ak"),
        NamedCertificate(("*.example.net",), "/w", "/wk"),
    )


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        ({"server_names": []}, "sni[0].server_names = []: a non-empty list of host names"),
        ({"server_names": "a.example"}, "sni[0].server_names = 'a.example': a non-empty list"),
        ({"server_names": ["a b.example"]}, "sni[0].server_names = 'a b.example': not a host name"),
        ({"server_names": ["a.*.example"]}, "sni[0].server_names = 'a.*.example': not a host name"),
        ({"server_names": ["bücher.example"]}, "internationalized names in their xn-- form"),
        ({"server_names": ["-a.example"]}, "not a host name"),
        ({"server_names": ["a.example"], "tls_key": "/k"}, "sni[0].tls_certificate = (missing)"),
        ({"server_names": ["a.example"], "tls_certificate": "/c"}, "sni[0].tls_key = (missing)"),
        ({"server_names": ["a.example"], "tls_cert": "/c"}, "unknown key (did you mean"),
    ],
)
def test_bad_sni_tables_are_named(sni: dict[str, object], expected: str) -> None:
    full = {"tls_certificate": "/x", "tls_key": "/y", **sni}
    if "tls_key" not in sni and "tls_certificate" in sni:
        full.pop("tls_key")
    if "tls_certificate" not in sni and "tls_key" in sni:
        full.pop("tls_certificate")
    text = "\n".join(_errors(_listen(sni=[full])))
    assert f"listen[0].{expected}" in text or expected in text, text


def test_a_name_listed_twice_is_an_error() -> None:
    twice = [
        {"server_names": ["a.example"], "tls_certificate": "/1", "tls_key": "/1k"},
        {"server_names": ["A.example"], "tls_certificate": "/2", "tls_key": "/2k"},
    ]
    assert _errors(_listen(sni=twice)) == [
        "listen[0].sni[1].server_names = 'A.example': already listed in listen[0].sni[0]"
    ]


def test_sni_needs_the_listener_certificate() -> None:
    sni = [{"server_names": ["a.example"], "tls_certificate": "/1", "tls_key": "/1k"}]
    text = "\n".join(_errors({"address": "127.0.0.1:1", "sni": sni}))
    assert "listen[0].sni = " in text
    assert "needs tls_certificate and tls_key on the listener" in text
