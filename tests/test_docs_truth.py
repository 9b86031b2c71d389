"""The documentation says what the code does: config keys and defaults, flags, examples, links.

Everything here reads files and calls pure functions in-process: no sockets, no servers.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from fdhandoff import cli
from fdhandoff.front import config as front_config
from fdhandoff.front.describe import Endpoint, describe
from fdhandoff.httphead import parse_head
from fdhandoff.receiver import options

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOC_FILES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _prose(path: Path) -> str:
    """The file without its fenced code blocks."""
    return _FENCE.sub("", _text(path))


# --- the front's configuration reference ---------------------------------------------------


def _front_reference() -> dict[str, str]:
    """``key`` → default cell of the table in docs/front.md, "Configuration reference"."""
    text = _text(DOCS / "front.md")
    section = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_\[\].]+)` \| ([^|]+) \|", section, re.M)
    assert rows, "no key table in docs/front.md, Configuration reference"
    return {key: default.strip() for key, default in rows}


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _front_keys() -> dict[str, str | None]:
    """Every key the front accepts → its default as the table writes it (None: required)."""
    keys: dict[str, str | None] = {}
    route_defaults = {f.name: f.default for f in dataclasses.fields(front_config.RouteConfig)}
    for name in front_config._LISTEN_KEYS:
        if name == "backlog":
            keys[f"listen[].{name}"] = _shown(front_config.DEFAULT_BACKLOG)
        elif name.startswith("tls_"):
            keys[f"listen[].{name}"] = "none"  # optional: plain HTTP without
        elif name == "sni":
            keys[f"listen[].{name}"] = "`[]`"  # no certificates chosen by name
        elif name == "proxy_protocol":
            keys[f"listen[].{name}"] = "`false`"  # the TOML spelling
        else:
            keys[f"listen[].{name}"] = None
    for name in front_config._ROUTE_KEYS:
        default = route_defaults.get(name, dataclasses.MISSING)
        if isinstance(default, front_config.Mode | front_config.HandoffFormat):
            keys[f"route[].{name}"] = _shown(default.value)
        elif name == "host":
            keys[f"route[].{name}"] = "none"
        elif name in ("subprotocols", "allowed_origins"):
            assert default == ()
            keys[f"route[].{name}"] = "[]"  # the TOML spelling of the empty tuple
        else:
            keys[f"route[].{name}"] = None  # required (in some mode)
    for section, instance in (
        ("limits", front_config.Limits()),
        ("timeouts", front_config.Timeouts()),
        ("log", front_config.LogConfig()),
    ):
        for field in dataclasses.fields(instance):
            keys[f"{section}.{field.name}"] = _shown(getattr(instance, field.name))
    keys["metrics.address"] = "none"
    workers = next(f for f in dataclasses.fields(front_config.FrontConfig) if f.name == "workers")
    keys["workers"] = _shown(workers.default)
    return keys


def test_every_front_key_is_in_the_reference_with_its_default() -> None:
    documented = _front_reference()
    for key, default in _front_keys().items():
        assert key in documented, f"{key} is missing from docs/front.md's key table"
        if default is None:
            assert documented[key].startswith("required"), (key, documented[key])
        else:
            assert documented[key] == f"`{default}`" or documented[key] == default, (
                f"docs/front.md gives {key} the default {documented[key]}, the code {default}"
            )


def test_the_reference_lists_no_key_the_front_refuses() -> None:
    unknown = set(_front_reference()) - set(_front_keys())
    assert not unknown, f"docs/front.md documents keys the front does not accept: {unknown}"


def test_every_front_section_is_known_to_the_loader() -> None:
    sections = {key.split("[")[0].split(".")[0] for key in _front_keys()}
    sections |= {"listen", "route"}
    assert sections == set(front_config._TOP_KEYS)


def test_security_md_names_every_front_limit_and_timeout() -> None:
    text = _text(DOCS / "security.md")
    for section, cls in (("limits", front_config.Limits), ("timeouts", front_config.Timeouts)):
        for field in dataclasses.fields(cls):
            assert f"`{section}.{field.name}`" in text, f"{section}.{field.name} not in security.md"


# --- TOML examples ---------------------------------------------------------------------------


def _toml_examples() -> list[tuple[str, str]]:
    found = []
    for path in DOC_FILES:
        text = _text(path)
        for match in _FENCE.finditer(text):
            if match.group(1) == "toml":
                line = text[: match.start()].count("\n") + 1
                found.append((f"{path.relative_to(ROOT)}:{line}", match.group(2)))
    return found


@pytest.mark.parametrize(("where", "body"), _toml_examples(), ids=lambda v: v.split("\n")[0])
def test_every_toml_example_passes_check(
    where: str, body: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tomllib.loads(body)
    path = tmp_path / "front.toml"
    path.write_text(body, encoding="utf-8")
    argv = ["check", "--config", str(path)]
    # A fragment (one [[route]] table) gets what a whole file would add.
    if "listen" not in raw:
        argv += ["--listen", "127.0.0.1:0"]
    if "route" not in raw:
        argv += ["--route", "/=unix:/run/x.sock"]
    status = cli.main(argv)
    assert status == 0, f"{where}: fdhandoff check says:\n{capsys.readouterr().err}"


def test_there_are_toml_examples() -> None:
    assert len(_toml_examples()) >= 3


# --- command-line flags ----------------------------------------------------------------------


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]  # type: ignore[no-any-return]
    raise AssertionError("no sub-commands")


def _flags(name: str) -> set[str]:
    return {
        flag
        for action in _subparser(name)._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help"
    }


def test_receiver_synopsis_shows_every_serve_flag_and_no_other() -> None:
    text = _text(DOCS / "receiver.md")
    section = text.split("## Running it", 1)[1]
    synopsis = _FENCE.search(section)
    assert synopsis is not None
    shown = set(re.findall(r"--[a-z][a-z0-9-]*", synopsis.group(2)))
    assert shown == _flags("serve"), (
        f"missing: {_flags('serve') - shown}, unknown: {shown - _flags('serve')}"
    )


def test_serve_limit_defaults_match_the_options() -> None:
    defaults = {
        action.dest: action.default
        for action in _subparser("serve")._actions
        if action.option_strings
    }
    built = options.Options()
    for field in dataclasses.fields(options.Options):
        if field.name in defaults and field.name != "metrics":
            assert defaults[field.name] == getattr(built, field.name), field.name


def test_security_md_names_every_serve_limit_flag() -> None:
    text = _text(DOCS / "security.md")
    receiver = text.split("## Receiver", 1)[1].split("\n## ", 1)[0]
    group = next(g for g in _subparser("serve")._action_groups if g.title and "limits" in g.title)
    for action in group._group_actions:
        flag = action.option_strings[0]
        assert f"`{flag}`" in receiver, f"{flag} is not in security.md's receiver table"


def test_flags_in_the_docs_exist() -> None:
    """Every ``fdhandoff COMMAND --flag`` written on one line uses a flag COMMAND has."""
    commands = {name: _flags(name) for name in ("front", "serve", "check", "demo")}
    line_re = re.compile(r"fdhandoff (front|serve|check|demo)\b([^`\n]*(?:\\\n[^`\n]*)*)")
    for path in DOC_FILES:
        for match in line_re.finditer(_text(path)):
            command, rest = match.group(1), match.group(2)
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
                assert flag in commands[command], f"{path.name}: fdhandoff {command} {flag}"


# --- the SCGI example of docs/front.md -----------------------------------------------------


def test_front_md_scgi_example_is_what_the_front_sends() -> None:
    text = _text(DOCS / "front.md")
    after = text.split("One example, byte for byte", 1)[1]
    block = _FENCE.search(after)
    assert block is not None
    shown = block.group(2).replace("\n", "").replace("\\0", "\0").encode()
    head = parse_head(
        b"GET /events/chat?room=1 HTTP/1.1\r\nHost: example.com\r\n"
        b"Accept: text/event-stream\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
        http10=True,
    )
    message, _ = describe(
        head,
        remote=Endpoint(b"203.0.113.7", b"51234"),
        server=Endpoint(b"192.0.2.1", b"8080"),
        route=b"/events",
        channel=True,
    )
    assert shown == message
    length = message.split(b":", 1)[0].decode()
    assert f"({len(message)} bytes;" in after.split("```", 1)[0]
    assert f"`{length}` is the length of the block" in after


# --- links ----------------------------------------------------------------------------------


def _anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    for title in re.findall(r"^#{1,6} +(.+?) *$", _prose(path), re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def test_links_between_docs_resolve() -> None:
    broken = []
    for path in DOC_FILES:
        for link in re.findall(r"\]\(([^)\s]+)\)", _prose(path)):
            if re.match(r"[a-z][a-z0-9+.-]*:", link):
                continue  # http:, mailto:
            target, _, anchor = link.partition("#")
            resolved = (path.parent / target).resolve() if target else path
            if not resolved.exists():
                broken.append(f"{path.name}: {link} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{path.name}: {link} (no such heading)")
    assert not broken, "\n".join(broken)
