"""Front configuration: TOML → frozen dataclasses, and ``fdhandoff check``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fdhandoff.errors import ConfigError
from fdhandoff.front.config import (
    HandoffFormat,
    Limits,
    Mode,
    Timeouts,
    build_config,
    load_config,
)

EXAMPLE = """
[[listen]]
address = "127.0.0.1:8080"
[[listen]]
address = "[::1]:8080"
[[listen]]
address = "unix:/run/front.sock"

[[route]]
prefix = "/events"
host = "example.com"
backend = "unix:/run/stream.sock"

[[route]]
prefix = "/ws"
mode = "websocket"
backend = "unix:/run/ws.sock"

[[route]]
prefix = "/app"
mode = "auth"
upstream = "http://127.0.0.1:9000"
allowed_prefix = "/run/"

[[route]]
prefix = "/app2"
mode = "auth"
upstream = "unix:/run/app.sock"
allowed_prefix = "/run/daemons"
handoff_format = "scgi"

[limits]
max_head_size = 16384

[timeouts]
handoff = 0.5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "front.toml"
    path.write_text(text)
    return path


def test_full_example(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, EXAMPLE))
    assert [a.text for a in config.listen] == [
        "127.0.0.1:8080",
        "[::1]:8080",
        "unix:/run/front.sock",
    ]
    assert config.listen[1].host == "::1" and config.listen[1].port == 8080
    assert config.listen[2].path == "/run/front.sock"
    events, ws, app, app2 = config.routes
    assert events.mode is Mode.PASS and events.host == "example.com"
    assert events.backend == "/run/stream.sock"
    assert ws.mode is Mode.WEBSOCKET
    assert app.mode is Mode.AUTH and app.upstream is not None
    assert (app.upstream.host, app.upstream.port) == ("127.0.0.1", 9000)
    assert app.handoff_format is HandoffFormat.APACHE
    assert app2.upstream is not None and app2.upstream.path == "/run/app.sock"
    assert app2.handoff_format is HandoffFormat.SCGI
    assert config.limits == Limits(max_head_size=16384)
    assert config.timeouts == Timeouts(handoff=0.5)


def test_defaults_are_documented_values() -> None:
    limits, timeouts = Limits(), Timeouts()
    assert (limits.max_head_size, limits.max_uri_length, limits.max_headers) == (32768, 8192, 100)
    assert timeouts.handoff == 1.0 and timeouts.head == 10.0


def errors_of(raw: dict[str, object], **flags: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_config(raw, **flags)  # type: ignore[arg-type]
    return str(info.value).splitlines()


def test_every_problem_is_reported_with_key_path_value_and_why() -> None:
    lines = errors_of(
        {
            "listen": [{"adress": "127.0.0.1:1"}, {"address": "localhost:80"}],
            "route": [
                {"prefix": "events", "mode": "websockets", "backend": "/run/x"},
                {"prefix": "/app", "mode": "auth", "upstream": "https://x"},
            ],
            "limits": {"max_head_sise": 3, "max_headers": True},
            "timeouts": {"handoff": -1},
            "log": {"level": "verbose"},
            "routes": [],
        }
    )
    text = "\n".join(lines)
    assert "listen[0].adress = '127.0.0.1:1': unknown key (did you mean 'address'?)" in text
    assert "listen[0].address = (missing)" in text
    assert "listen[1].address = 'localhost:80': 'localhost' is not an IP address" in text
    assert "route[0].prefix = 'events': must start with '/'" in text
    assert "route[0].mode = 'websockets': not one of auth, pass, websocket" in text
    assert "(did you mean 'websocket'?)" in text
    assert "route[0].backend = '/run/x': a backend is a UNIX socket" in text
    assert "route[1].upstream = 'https://x'" in text
    assert "route[1].allowed_prefix = (missing)" in text
    assert "limits.max_head_sise = 3: unknown key (did you mean 'max_head_size'?)" in text
    assert "limits.max_headers = true: must be an integer" in text
    assert "timeouts.handoff = -1: must be between" in text
    assert "log.level = 'verbose'" in text
    assert "routes = []: unknown key (did you mean 'route'?)" in text


def test_websocket_subprotocols() -> None:
    route = {"prefix": "/ws", "mode": "websocket", "backend": "unix:/x"}
    listen = [{"address": "127.0.0.1:0"}]
    config = build_config(
        {
            "listen": listen,
            "route": [{**route, "subprotocols": ["graphql-transport-ws", "v12.stomp"]}],
        }
    )
    assert config.routes[0].subprotocols == (b"graphql-transport-ws", b"v12.stomp")
    assert build_config({"listen": listen, "route": [route]}).routes[0].subprotocols == ()
    text = "\n".join(
        errors_of(
            {
                "listen": listen,
                "route": [
                    {**route, "subprotocols": "chat"},
                    {**route, "subprotocols": ["chat", "a b", "c;d"]},
                    {**route, "subprotocols": ["chat", "chat"]},
                    {**route, "subprotocols": ["", "x"]},
                    {"prefix": "/p", "backend": "unix:/x", "subprotocols": ["chat"]},
                ],
            }
        )
    )
    assert "route[0].subprotocols = 'chat': must be a list of strings" in text
    assert "route[1].subprotocols = 'a b': a subprotocol is a token (RFC 6455 §4.1)" in text
    assert "route[1].subprotocols = 'c;d': a subprotocol is a token" in text
    assert "route[2].subprotocols = ['chat', 'chat']: lists a subprotocol twice" in text
    assert "route[3].subprotocols = '': a subprotocol is a token" in text
    assert "route[4].subprotocols = ['chat']: only used in websocket mode, not pass" in text


def test_websocket_allowed_origins() -> None:
    route = {"prefix": "/ws", "mode": "websocket", "backend": "unix:/x"}
    listen = [{"address": "127.0.0.1:0"}]
    # Written as browsers send them (RFC 6454 §6.2): lower case, no default
    # port, IPv6 in its short form; otherwise they could never match.
    origins = [
        "https://App.Example.com",
        "https://a.example:443",
        "http://a_b.example:8080",
        "http://[0:0::1]:8080",
        "http://127.0.0.1:8080",
        "capacitor://localhost",
        "null",
    ]
    config = build_config({"listen": listen, "route": [{**route, "allowed_origins": origins}]})
    assert config.routes[0].allowed_origins == (
        b"https://app.example.com",
        b"https://a.example",
        b"http://a_b.example:8080",
        b"http://[::1]:8080",
        b"http://127.0.0.1:8080",
        b"capacitor://localhost",
        b"null",
    )
    text = "\n".join(
        errors_of(
            {
                "listen": listen,
                "route": [
                    {**route, "allowed_origins": "https://a"},
                    {**route, "allowed_origins": ["https://a/path", "example.com", "http://a:"]},
                    {**route, "allowed_origins": ["http://a:08080", "http://a:99999"]},
                    {**route, "allowed_origins": ["http://0x7f.1", "http://[::12345]"]},
                    {**route, "allowed_origins": ["https://bücher.example"]},
                    {"prefix": "/p", "backend": "unix:/x", "allowed_origins": ["https://a"]},
                ],
            }
        )
    )
    assert "route[0].allowed_origins = 'https://a': must be a list of strings" in text
    for bad in ("https://a/path", "example.com", "http://a:"):  # every bad one is named
        assert f"route[1].allowed_origins = {bad!r}: an origin is scheme://host[:port]" in text
    assert "'http://a:08080': port 08080 is not a number from 1 to 65535" in text
    assert "'http://a:99999': port 99999 is not a number" in text
    assert "'http://0x7f.1': 0x7f.1 is not an IPv4 address in dotted decimal" in text
    assert "'http://[::12345]': [::12345] is not an IPv6 address" in text
    assert "'https://bücher.example': a host name outside ASCII is written in its IDNA form" in text
    assert "route[5].allowed_origins = ['https://a']: only used in websocket mode, not pass" in text


def test_mode_specific_keys() -> None:
    text = "\n".join(
        errors_of(
            {
                "listen": [{"address": "127.0.0.1:0"}],
                "route": [
                    {"prefix": "/a", "backend": "unix:/x", "upstream": "http://h:1"},
                    {
                        "prefix": "/b",
                        "mode": "auth",
                        "backend": "unix:/x",
                        "upstream": "http://h",
                        "allowed_prefix": "run",
                    },
                ],
            }
        )
    )
    assert "route[0].upstream = 'http://h:1': only used in auth mode, not pass" in text
    assert "route[1].backend = 'unix:/x': not used in auth mode" in text
    assert "route[1].allowed_prefix = 'run': must be an absolute directory" in text


def test_duplicates_and_empty() -> None:
    text = "\n".join(
        errors_of(
            {
                "listen": [{"address": "127.0.0.1:80"}, {"address": "127.0.0.1:80"}],
                "route": [{"prefix": "/a", "backend": "unix:/x"}],
            },
            routes=["/a=unix:/y"],
        )
    )
    assert "same prefix and host as route[0]" in text
    assert "listen = '127.0.0.1:80': listed twice" in text
    assert errors_of({}) == [
        "listen = []: nothing to listen on: add a [[listen]] table or --listen"
    ]


def test_flags_replace_listen_and_add_routes() -> None:
    config = build_config(
        {
            "listen": [{"address": "127.0.0.1:80"}],
            "route": [{"prefix": "/a", "backend": "unix:/x"}],
        },
        listen=["[::1]:0"],
        routes=["/b=unix:/y"],
    )
    assert [a.text for a in config.listen] == ["[::1]:0"]
    assert [(r.prefix, r.backend) for r in config.routes] == [("/a", "/x"), ("/b", "/y")]
    text = "\n".join(errors_of({}, listen=["127.0.0.1:0"], routes=["/nobackend"]))
    assert "--route '/nobackend'" in text


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "expected HOST:PORT"),
        ("::1:80", "--listen = '::1:80': IPv6 addresses must be written in brackets"),
        ("localhost:80", "is not an IP address"),
        ("127.0.0.1:70000", "port"),
        ("unix:relative", "absolute"),
        ("unix:/" + "x" * 200, "107 bytes"),
    ],
)
def test_bad_addresses(address: str, why: str) -> None:
    text = "\n".join(errors_of({}, listen=[address], routes=["/=unix:/x"]))
    assert why in text


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[[listen]\n"))


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fdhandoff", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_command(tmp_path: Path) -> None:
    good = run_check("--config", str(write(tmp_path, EXAMPLE)))
    assert good.returncode == 0, good.stderr
    assert "ok: 3 listener(s)" in good.stdout
    assert "/ws -> websocket /run/ws.sock" in good.stdout
    assert "allowed_origins" not in good.stderr
    opaque = EXAMPLE.replace('mode = "websocket"', 'mode = "websocket"\nallowed_origins = ["null"]')
    warned = run_check("--config", str(write(tmp_path, opaque)))
    assert warned.returncode == 0
    assert "warning: route '/ws': allowed_origins lists null" in warned.stderr
    bad = run_check("--config", str(write(tmp_path, EXAMPLE.replace('"websocket"', '"ws"'))))
    assert bad.returncode == 2
    assert "route[1].mode = 'ws': not one of auth, pass, websocket" in bad.stderr
    missing = run_check()
    assert missing.returncode == 2
    assert "give --config" in missing.stderr


def test_channels_limit() -> None:
    """limits.channels: 4 by default, 0 (off) to 64, anything else named."""
    assert Limits().channels == 4
    base: dict[str, object] = {
        "listen": [{"address": "127.0.0.1:1"}],
        "route": [{"prefix": "/", "backend": "unix:/run/r.sock"}],
    }
    assert build_config({**base, "limits": {"channels": 0}}).limits.channels == 0
    assert build_config({**base, "limits": {"channels": 64}}).limits.channels == 64
    for bad in (-1, 65, 1.5):
        text = "\n".join(errors_of({**base, "limits": {"channels": bad}}))
        assert f"limits.channels = {bad}" in text


def test_proxy_protocol_per_listener(tmp_path: Path) -> None:
    """listen[].proxy_protocol: false by default, a boolean, kept per listener."""
    base: dict[str, object] = {
        "listen": [
            {"address": "127.0.0.1:1", "proxy_protocol": True},
            {"address": "127.0.0.1:2"},
        ],
        "route": [{"prefix": "/", "backend": "unix:/run/r.sock"}],
    }
    assert build_config(base).proxy_protocol == (True, False)
    for bad in ("yes", 1, "true"):
        listen = [{"address": "127.0.0.1:1", "proxy_protocol": bad}]
        text = "\n".join(errors_of({**base, "listen": listen}))
        assert f"listen[0].proxy_protocol = {bad!r}: must be true or false" in text
    config = (
        '[[listen]]\naddress = "127.0.0.1:0"\nproxy_protocol = true\n'
        '[[route]]\nprefix = "/"\nbackend = "unix:/run/r.sock"\n'
    )
    good = run_check("--config", str(write(tmp_path, config)))
    assert "ok: 1 listener(s) (127.0.0.1:0 (PROXY protocol)), 1 route(s)" in good.stdout


# --- TLS listeners (end to end on kernel TLS: test_front_ktls.py) -----------------------------


def make_cert(where: Path, name: str) -> tuple[Path, Path]:
    cert, key = where / f"{name}.pem", where / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=t",
        ],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def tls_config(cert: object, key: object) -> str:
    return (
        f'[[listen]]\naddress = "127.0.0.1:0"\ntls_certificate = "{cert}"\ntls_key = "{key}"\n'
        '[[route]]\nprefix = "/"\nbackend = "unix:/run/r.sock"\n'
    )


def test_tls_keys_come_in_pairs_on_tcp_listeners() -> None:
    route = [{"prefix": "/", "backend": "unix:/run/r.sock"}]
    only_cert = errors_of({"listen": [{"address": "127.0.0.1:1", "tls_certificate": "/c"}],
                           "route": route})  # fmt: skip
    assert only_cert == ["listen[0].tls_key = (missing): tls_certificate needs tls_key too"]
    only_key = errors_of({"listen": [{"address": "127.0.0.1:1", "tls_key": "/k"}], "route": route})
    assert only_key == ["listen[0].tls_certificate = (missing): tls_key needs tls_certificate too"]
    unix = errors_of(
        {"listen": [{"address": "unix:/run/f.sock", "tls_certificate": "/c", "tls_key": "/k"}],
         "route": route}
    )  # fmt: skip
    assert unix == ["listen[0].tls_certificate = '/c': TLS needs a TCP address"]
    config = build_config(
        {"listen": [{"address": "127.0.0.1:1", "tls_certificate": "/c", "tls_key": "/k"},
                    {"address": "127.0.0.1:2"}], "route": route}
    )  # fmt: skip
    assert [files.certificate if files else None for files in config.tls] == ["/c", None]


def test_check_loads_the_certificate_and_key(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    require_tool("openssl")
    cert, key = make_cert(tmp_path, "a")
    other_cert, other_key = make_cert(tmp_path, "b")
    good = run_check("--config", str(write(tmp_path, tls_config(cert, key))))
    assert good.returncode == 0, good.stderr
    assert "ok: 1 listener(s) (127.0.0.1:0 (TLS)), 1 route(s)" in good.stdout
    missing = run_check("--config", str(write(tmp_path, tls_config(tmp_path / "nope.pem", key))))
    assert missing.returncode == 2
    assert f"TLS certificate {tmp_path / 'nope.pem'}: No such file or directory" in missing.stderr
    mismatched = run_check("--config", str(write(tmp_path, tls_config(cert, other_key))))
    assert mismatched.returncode == 2
    assert "KEY_VALUES_MISMATCH" in mismatched.stderr, mismatched.stderr
    not_pem = tmp_path / "junk.pem"
    not_pem.write_text("not a certificate\n")
    junk = run_check("--config", str(write(tmp_path, tls_config(not_pem, key))))
    assert junk.returncode == 2
    assert f"certificate {not_pem}" in junk.stderr, junk.stderr
    del other_cert


def test_front_without_kernel_tls_refuses_to_start_and_says_why(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    require_tool("openssl")
    cert, key = make_cert(tmp_path, "a")
    config = write(tmp_path, tls_config(cert, key))
    check = run_check("--config", str(config))
    assert check.returncode == 0  # the check may run on another machine: a warning
    # Read after the check: its probe may have made the kernel load the module.
    if "tls" in Path("/proc/sys/net/ipv4/tcp_available_ulp").read_text().split():
        pytest.skip("this kernel has kTLS: test_front_ktls.py covers TLS listeners here")
    assert "warning: listen 127.0.0.1:0: TLS cannot be handed off here" in check.stderr
    front = subprocess.run(
        [sys.executable, "-m", "fdhandoff", "front", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert front.returncode == 2, front.stderr
    assert (
        "listen 127.0.0.1:0: TLS cannot be handed off: this kernel has no TLS offload (kTLS)"
        in front.stderr
    )


def test_an_encrypted_key_is_refused_without_asking_for_a_pass_phrase(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    require_tool("openssl")
    key = tmp_path / "enc.key"
    cert = tmp_path / "enc.pem"
    for args in (
        ["genpkey", "-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-aes256",
         "-pass", "pass:secret", "-out", str(key)],
        ["req", "-x509", "-key", str(key), "-passin", "pass:secret", "-out", str(cert),
         "-days", "2", "-subj", "/CN=t"],
    ):  # fmt: skip
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)
    # A terminal to ask on would make OpenSSL wait there: the check must not.
    done = subprocess.run(
        [sys.executable, "-m", "fdhandoff", "check", "--config",
         str(write(tmp_path, tls_config(cert, key)))],
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"TLS key {key} is encrypted" in done.stderr, done.stderr
