"""The layering of docs/design.md, enforced by reading the source with ``ast``.

* the sans-IO core (errors, scgi, message, httphead, routing, websocket*)
  imports no socket, asyncio, threading or selectors, nor anything above it
  (message may use ``socket`` for the SOCK_* constants only);
* fdpass imports no asyncio; the I/O primitives import no role;
* front and receiver never import each other;
* only cli.py exits (besides ``__main__``);
* only fdpass.py calls sendmsg/recvmsg.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = "fdhandoff"
SRC = Path(__file__).resolve().parent.parent / "src"

CORE_NAMES = ("errors", "scgi", "message", "httphead", "routing", "proxyproto")
IO_IN_CORE = ("socket", "asyncio", "threading", "selectors", "select", "uvloop")
ABOVE_CORE = tuple(f"{PACKAGE}.{name}" for name in ("fdpass", "aio", "front", "receiver", "cli"))
ROLES = (f"{PACKAGE}.front", f"{PACKAGE}.receiver")
FD_SYSCALLS = ("sendmsg", "recvmsg", "recvmsg_into", "send_fds", "recv_fds")


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    imports: set[str] = field(default_factory=set)


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module an import statement may refer to, made absolute.

    ``from x import y`` yields both ``x`` and ``x.y``, since ``y`` may be a
    submodule; relative imports are resolved against ``module``.
    """
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([node.module] if node.module else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def load_modules() -> dict[str, Module]:
    modules = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        name, is_package = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        modules[name] = Module(name, path, tree, imported_names(tree, name, is_package))
    return modules


MODULES = load_modules()


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def core_modules() -> list[str]:
    found = [f"{PACKAGE}.{n}" for n in CORE_NAMES if f"{PACKAGE}.{n}" in MODULES]
    found += sorted(n for n in MODULES if n.startswith(f"{PACKAGE}.websocket"))
    return found


def where(module: Module, node: ast.AST) -> str:
    return f"{module.path.relative_to(SRC)}:{getattr(node, 'lineno', '?')}"


# --- the scanner itself finds what it is looking for ------------------------------------


def test_scanner_resolves_relative_imports() -> None:
    tree = ast.parse(
        "from . import scgi\nfrom ..message import CLOSED\nimport socket, asyncio.tasks"
    )
    assert imported_names(tree, "fdhandoff.front.server", is_package=False) == {
        "fdhandoff.front",
        "fdhandoff.front.scgi",
        "fdhandoff.message",
        "fdhandoff.message.CLOSED",
        "socket",
        "asyncio.tasks",
    }
    pkg = imported_names(ast.parse("from .server import x"), "fdhandoff.front", is_package=True)
    assert "fdhandoff.front.server" in pkg


def test_scanner_sees_the_known_facts() -> None:
    # The rules below would pass vacuously if the scanner saw nothing.
    assert {"fdhandoff.errors", "fdhandoff.scgi", "fdhandoff.message"} <= set(core_modules())
    assert "socket" in MODULES["fdhandoff.fdpass"].imports
    assert "fdhandoff.fdpass" in MODULES["fdhandoff.aio"].imports
    assert fd_syscall_sites(MODULES["fdhandoff.fdpass"])
    assert exit_sites(MODULES["fdhandoff.__main__"])
    assert "fdhandoff.errors" in MODULES["fdhandoff.scgi"].imports


# --- core: sans-IO -------------------------------------------------------------------------


@pytest.mark.parametrize("name", core_modules())
def test_core_module_does_no_io(name: str) -> None:
    module = MODULES[name]
    bad = sorted(
        imported
        for imported in module.imports
        if any(under(imported, io) for io in IO_IN_CORE)
        and not (name == f"{PACKAGE}.message" and imported == "socket")
    )
    assert bad == [], f"{name} is sans-IO but imports {bad}"


@pytest.mark.parametrize("name", core_modules())
def test_core_module_imports_nothing_above_the_core(name: str) -> None:
    bad = sorted(i for i in MODULES[name].imports if any(under(i, up) for up in ABOVE_CORE))
    assert bad == [], f"{name} is core but imports {bad}"


def test_message_uses_socket_for_sock_constants_only() -> None:
    module = MODULES[f"{PACKAGE}.message"]
    uses = []
    allowed = set()
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom) and node.module == "socket":
            uses.extend(f"from socket import {a.name}" for a in node.names)
        if isinstance(node, ast.Import):
            uses.extend(
                f"import {a.name} as {a.asname}"
                for a in node.names
                if a.name == "socket" and a.asname
            )
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "socket"
        ):
            if node.attr.startswith("SOCK_"):
                allowed.add(id(node.value))
            else:
                uses.append(f"socket.{node.attr} at {where(module, node)}")
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Name) and node.id == "socket" and id(node) not in allowed:
            uses.append(f"bare 'socket' at {where(module, node)}")
    assert uses == [], f"message.py may use socket.SOCK_* only: {uses}"


# --- I/O primitives and roles ----------------------------------------------------------------


def test_fdpass_imports_no_asyncio() -> None:
    imports = MODULES[f"{PACKAGE}.fdpass"].imports
    assert sorted(i for i in imports if under(i, "asyncio") or under(i, "uvloop")) == []


@pytest.mark.parametrize("name", [f"{PACKAGE}.fdpass", f"{PACKAGE}.aio"])
def test_io_primitives_import_no_role(name: str) -> None:
    bad = sorted(
        i for i in MODULES[name].imports if any(under(i, r) for r in (*ROLES, f"{PACKAGE}.cli"))
    )
    assert bad == [], f"{name} imports {bad}"


@pytest.mark.parametrize(("role", "other"), [(ROLES[0], ROLES[1]), (ROLES[1], ROLES[0])])
def test_roles_never_import_each_other(role: str, other: str) -> None:
    bad = [
        f"{name} imports {imported}"
        for name, module in MODULES.items()
        if under(name, role)
        for imported in sorted(module.imports)
        if under(imported, other)
    ]
    assert bad == []


# --- who may exit, who may pass fds -------------------------------------------------------------


def exit_sites(module: Module) -> list[str]:
    sites = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "exit"
                and isinstance(func.value, ast.Name)
                and func.value.id == "sys"
            ) or (isinstance(func, ast.Name) and func.id in ("exit", "quit")):
                sites.append(f"{ast.unparse(func)}() at {where(module, node)}")
        elif isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                sites.append(f"raise SystemExit at {where(module, node)}")
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module == "sys"
            and any(a.name == "exit" for a in node.names)
        ):
            sites.append(f"from sys import exit at {where(module, node)}")
    return sites


def test_only_cli_exits() -> None:
    allowed = {f"{PACKAGE}.cli", f"{PACKAGE}.__main__"}
    bad = [site for name, m in MODULES.items() if name not in allowed for site in exit_sites(m)]
    assert bad == [], "library code must return a status, not exit"


def fd_syscall_sites(module: Module) -> list[str]:
    return [
        f".{node.func.attr}() at {where(module, node)}"
        for node in ast.walk(module.tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in FD_SYSCALLS
    ]


def test_only_fdpass_calls_sendmsg_and_recvmsg() -> None:
    bad = [
        site
        for name, module in MODULES.items()
        if name != f"{PACKAGE}.fdpass"
        for site in fd_syscall_sites(module)
    ]
    assert bad == [], "fds cross processes through fdhandoff.fdpass only"


def test_fdpass_never_uses_the_flag_ignoring_helpers() -> None:
    # socket.send_fds/recv_fds ignore their flags (no MSG_CMSG_CLOEXEC): gh-107898.
    sites = fd_syscall_sites(MODULES[f"{PACKAGE}.fdpass"])
    assert [s for s in sites if s.startswith((".send_fds", ".recv_fds"))] == []
