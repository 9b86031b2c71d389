#!/usr/bin/env python3
"""Generate docs/reference.md, the public API reference, from the code itself.

    .venv/bin/python scripts/gen_reference.py            # rewrite docs/reference.md
    .venv/bin/python scripts/gen_reference.py --check    # exit 1 if it is out of date

What is listed, so the page cannot drift from the code:

* every name in each public module's ``__all__`` (nothing else is public), with its
  signature from :mod:`inspect` and the first paragraph of its docstring; a constant
  shows its value and the first sentence of the ``#:`` comment above it;
* for a class, its public methods and properties (inherited ones included, except
  from a base documented in the same module, which is named instead), its public
  ``__slots__`` / dataclass fields, and its enum members;
* the CLI sub-commands, from the argparse parsers ``fdhandoff`` builds.

A name that ``__all__`` lists but the module lacks stops the generator (exit 2).
Run it after changing a public signature or docstring, and commit both.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "reference.md"

#: Public modules, in page order.
MODULES = (
    "fdhandoff.scgi",
    "fdhandoff.message",
    "fdhandoff.fdpass",
    "fdhandoff.aio",
    "fdhandoff.websocket",
    "fdhandoff.errors",
    "fdhandoff.metrics",
    "fdhandoff.receiver",
    "fdhandoff.receiver.sync",
    "fdhandoff.receiver.asgi",
)

#: CLI sub-commands, in page order.
COMMANDS = ("serve", "front", "check", "demo")

#: Dunder methods worth a mention: they make a class usable with a statement.
PROTOCOLS = {
    "__iter__": "`for ... in`",
    "__aiter__": "`async for ... in`",
    "__enter__": "`with`",
    "__aenter__": "`async with`",
    "__len__": "`len()`",
    "__contains__": "`in`",
    "__await__": "`await`",
}

#: Wide enough that argparse never wraps a usage line differently from run to run.
HELP_COLUMNS = "100"


class ExportError(Exception):
    """The code and its ``__all__`` disagree."""


# --- docstrings and comments -----------------------------------------------------------


def first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring, joined into one line."""
    if not doc:
        return ""
    text = inspect.cleandoc(doc)
    para = text.split("\n\n", 1)[0]
    return markdown(" ".join(line.strip() for line in para.splitlines()))


def markdown(text: str) -> str:
    """reST inline markup of the docstrings as Markdown: ``x`` and :role:`~a.b.x` -> `x`."""
    text = re.sub(r":\w+:`(~?)([^`]+)`", _role, text)
    text = text.replace("``", "`")
    return re.sub(r"(`[^`]+`) s\b", r"\1s", text)


def _role(match: re.Match[str]) -> str:
    target = match.group(2)
    if match.group(1):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def first_sentence(text: str) -> str:
    match = re.match(r"(.+?\.)(\s|$)", text)
    return match.group(1) if match else text


def own_doc(obj: Any) -> str | None:
    """``obj``'s docstring, but not one dataclasses or enum made up, nor an inherited one."""
    raw = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if not isinstance(raw, str) or not raw:
        return None
    doc: str = raw
    if isinstance(obj, type):
        if dataclasses.is_dataclass(obj) and doc.startswith(obj.__name__ + "("):
            return None
        if issubclass(obj, enum.Enum) and doc.startswith("An enumeration."):
            return None
        if doc.startswith(obj.__name__ + "(") and issubclass(obj, tuple):
            return None  # NamedTuple's generated docstring
    return doc


def constant_comments(module: ModuleType) -> dict[str, str]:
    """``#:`` comments above module-level assignments, by name."""
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    found: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        elif isinstance(node, ast.AnnAssign):
            target = node.target
        else:
            continue
        if not isinstance(target, ast.Name):
            continue
        comment: list[str] = []
        index = node.lineno - 2
        while index >= 0 and lines[index].lstrip().startswith("#:"):
            comment.insert(0, lines[index].lstrip()[2:].strip())
            index -= 1
        if comment:
            found[target.id] = " ".join(comment)
    return found


def alias_sources(module: ModuleType) -> dict[str, str]:
    """Source text of module-level assignments (type aliases are shown as written)."""
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name):
            segment = ast.get_source_segment(source, value)
            if segment is not None:
                found[target.id] = " ".join(segment.split())
    return found


# --- signatures --------------------------------------------------------------------------


def annotation_text(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__qualname__
    return repr(annotation).replace("typing.", "")


def default_text(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    text = repr(value)
    return text if len(text) <= 40 else "..."


def signature(obj: Callable[..., Any], *, drop_first: bool = False) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    parts: list[str] = []
    params = list(sig.parameters.values())
    if drop_first and params:
        params = params[1:]
    star_done = False
    for index, param in enumerate(params):
        if param.kind is param.POSITIONAL_ONLY:
            later = params[index + 1 :]
            if not any(p.kind is p.POSITIONAL_ONLY for p in later):
                text = _param(param)
                parts.append(text)
                parts.append("/")
                continue
        if param.kind is param.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if param.kind is param.VAR_POSITIONAL:
            star_done = True
        parts.append(_param(param))
    result = f"({', '.join(parts)})"
    if sig.return_annotation is not sig.empty:
        result += f" -> {annotation_text(sig.return_annotation)}"
    return result


def _param(param: inspect.Parameter) -> str:
    prefix = ""
    if param.kind is param.VAR_POSITIONAL:
        prefix = "*"
    elif param.kind is param.VAR_KEYWORD:
        prefix = "**"
    text = prefix + param.name
    if param.annotation is not param.empty:
        text += f": {annotation_text(param.annotation)}"
    if param.default is not param.empty:
        sep = " = " if param.annotation is not param.empty else "="
        value = param.default
        if param.name.endswith("mode") and type(value) is int:
            text += sep + oct(value)  # a permission mode reads in octal
        else:
            text += sep + default_text(value)
    return text


# --- one module ------------------------------------------------------------------------------


def is_project_class(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "fdhandoff"


def class_members(cls: type, documented: set[type]) -> tuple[list[str], list[type]]:
    """Lines for the public members of ``cls``, and the documented bases it inherits from."""
    lines: list[str] = []
    seen: set[str] = set()
    inherited: list[type] = []
    protocols: list[str] = []
    attributes: list[str] = []
    for base in cls.__mro__:
        if base is not cls and base in documented:
            inherited.append(base)
            for name in _all_names(base):
                seen.add(name)
            continue
        if not is_project_class(base):
            continue
        for name in _slot_names(base):
            if not name.startswith("_") and name not in seen:
                seen.add(name)
                attributes.append(name)
        for name, member in base.__dict__.items():
            if name in seen:
                continue
            if name in PROTOCOLS and base is not enum.Enum:
                seen.add(name)
                protocols.append(PROTOCOLS[name])
                continue
            if name.startswith("_"):
                continue
            line = _member_line(cls, name, member)
            if line is not None:
                seen.add(name)
                lines.append(line)
    if dataclasses.is_dataclass(cls):
        fields = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
        attributes = fields + [a for a in attributes if a not in fields]
    elif issubclass(cls, tuple) and hasattr(cls, "_fields"):
        attributes = list(cls._fields)
    head: list[str] = []
    if attributes:
        head.append("  - attributes: " + ", ".join(f"`{a}`" for a in attributes))
    if protocols:
        head.append("  - supports " + ", ".join(protocols))
    return head + lines, inherited


def _all_names(cls: type) -> Iterator[str]:
    for base in cls.__mro__:
        if is_project_class(base):
            yield from base.__dict__
            yield from _slot_names(base)


def _slot_names(cls: type) -> list[str]:
    slots = cls.__dict__.get("__slots__", ())
    if isinstance(slots, str):
        slots = (slots,)
    return [s for s in slots if not s.startswith("_")]


def _member_line(cls: type, name: str, member: Any) -> str | None:
    if isinstance(member, property):
        ret = ""
        if member.fget is not None:
            ann = inspect.signature(member.fget).return_annotation
            if ann is not inspect.Signature.empty:
                ret = f": {annotation_text(ann)}"
        kind = "property" if member.fset is None else "property, settable"
        return f"  - `.{name}{ret}` ({kind}) — {first_paragraph(member.__doc__)}".rstrip(" —")
    if isinstance(member, staticmethod | classmethod):
        func = member.__func__
        drop = isinstance(member, classmethod)
        prefix = "classmethod " if drop else "staticmethod "
        text = f"  - {prefix}`.{name}{signature(func, drop_first=drop)}`"
        doc = first_paragraph(func.__doc__)
        return f"{text} — {doc}" if doc else text
    if inspect.isfunction(member):
        prefix = "async " if inspect.iscoroutinefunction(member) else ""
        text = f"  - {prefix}`.{name}{signature(member, drop_first=True)}`"
        doc = first_paragraph(member.__doc__)
        return f"{text} — {doc}" if doc else text
    return None


def describe_class(cls: type, documented: set[type]) -> list[str]:
    bases = [b.__name__ for b in cls.__bases__ if b is not object and b.__name__[0] != "_"]
    base_text = f"({', '.join(bases)})" if bases else ""
    doc = first_paragraph(own_doc(cls))
    # "see the module documentation" must name the module: it is not on this page.
    doc = doc.replace("the module documentation", f"the documentation of `{cls.__module__}`")
    if issubclass(cls, enum.Enum):
        values = ", ".join(f"`{m.name}` = `{m.value!r}`" for m in cls)
        lines = [f"- **class `{cls.__name__}`**{base_text} — {doc}".rstrip(" —")]
        lines.append(f"  - members: {values}")
        extra, _ = class_members(cls, documented)
        lines.extend(line for line in extra if "attributes:" not in line)
        return lines
    if issubclass(cls, BaseException):
        init = cls.__dict__.get("__init__")
        sig = signature(init, drop_first=True) if inspect.isfunction(init) else ""
    else:
        sig = signature(cls).removesuffix(" -> None")
    sig_text = f"`{sig}`" if sig else ""
    lines = [f"- **class `{cls.__name__}`**{sig_text}{(' ' + base_text) if bases else ''}"]
    if doc:
        lines[0] += f" — {doc}"
    members, inherited = class_members(cls, documented)
    # A base with no public members of its own (FdHandoffError) is named in base_text only.
    inherited = [b for b in inherited if class_members(b, documented - {b})[0]]
    if inherited:
        names = ", ".join(f"`{b.__name__}`" for b in inherited)
        members.insert(0, f"  - everything of {names}" + (", and:" if members else ""))
    lines.extend(members)
    return lines


def describe_module(name: str) -> list[str]:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        raise ExportError(f"{name} has no __all__")
    missing = [n for n in exported if not hasattr(module, n)]
    if missing:
        raise ExportError(f"{name}.__all__ names {missing} that the module lacks")
    comments: dict[str, str] = {}
    sources: dict[str, str] = {}
    for other in _package_modules(module):
        for key, value in constant_comments(other).items():
            if key in exported and getattr(other, key, None) is getattr(module, key):
                comments.setdefault(key, value)
        for key, value in alias_sources(other).items():
            if key in exported and getattr(other, key, None) is getattr(module, key):
                sources.setdefault(key, value)
    objects = {n: getattr(module, n) for n in exported}
    documented = {o for o in objects.values() if isinstance(o, type)}

    out = [f"## `{name}`", ""]
    doc = first_paragraph(module.__doc__)
    if doc:
        out += [doc, ""]
    constants: list[str] = []
    functions: list[str] = []
    classes: list[str] = []
    for export in sorted(exported, key=_sort_key):
        obj = objects[export]
        if isinstance(obj, type):
            classes += describe_class(obj, documented)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            prefix = "async " if inspect.iscoroutinefunction(obj) else ""
            line = f"- {prefix}**`{export}`**`{signature(obj)}`"
            text = first_paragraph(obj.__doc__)
            if obj.__module__ != name and not obj.__module__.startswith(name + "."):
                text = (text + " " if text else "") + f"(from `{obj.__module__}`)"
            functions.append(f"{line} — {text}" if text else line)
        else:
            constants.append(_constant_line(export, obj, comments, sources))
    for title, lines in (("Classes", classes), ("Functions", functions), ("Constants", constants)):
        if lines:
            out += [f"**{title}**", "", *lines, ""]
    return out


def _package_modules(module: ModuleType) -> list[ModuleType]:
    """``module`` first, then every loaded fdhandoff module (where re-exports come from)."""
    others = [
        m
        for n, m in sorted(sys.modules.items())
        if n.startswith("fdhandoff") and m is not module and isinstance(m, ModuleType)
    ]
    return [module, *others]


def _is_literal(source: str) -> bool:
    try:
        ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return False
    return True


def _sort_key(name: str) -> tuple[int, str]:
    return (0 if name[:1].isupper() and not name.isupper() else 1, name.lower())


def _constant_line(name: str, obj: Any, comments: dict[str, str], sources: dict[str, str]) -> str:
    comment = markdown(first_sentence(comments.get(name, "")))
    source = sources.get(name, "")
    if isinstance(obj, int | float | bytes | str) and not isinstance(obj, bool | enum.Enum):
        value = repr(obj)
        if source and not _is_literal(source) and len(source) <= 40:
            value = f"{value} ({source})"
    elif isinstance(obj, enum.Enum):
        value = f"{type(obj).__name__}.{obj.name}"
    elif source and len(source) <= 60:
        value = source
    else:
        value = type(obj).__name__
    line = f"- `{name}` = `{value}`"
    return f"{line} — {comment}" if comment else line


# --- the CLI ---------------------------------------------------------------------------------


def describe_cli() -> list[str]:
    os.environ["COLUMNS"] = HELP_COLUMNS
    from fdhandoff.cli import build_parser  # noqa: PLC0415

    parser = build_parser()
    choices: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            choices = dict(action.choices)
    out = ["## Command line", ""]
    out += [
        "`fdhandoff [--version] COMMAND ...`; every command exits `0` when done, `2` on a "
        "configuration error (one line naming it on stderr). Full text: "
        "`fdhandoff COMMAND --help`.",
        "",
    ]
    for command in COMMANDS:
        sub = choices.get(command)
        if sub is None:
            raise ExportError(f"fdhandoff has no {command!r} command")
        out += [f"### `fdhandoff {command}`", ""]
        if sub.description:
            out += [" ".join(sub.description.split()), ""]
        prefix = "usage: "
        usage = sub.format_usage().strip().removeprefix(prefix)
        lines = usage.splitlines()
        usage = "\n".join([lines[0], *(line.removeprefix(" " * len(prefix)) for line in lines[1:])])
        out += ["```", usage, "```", ""]
        rows = []
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings:
                flag = ", ".join(action.option_strings)
                if action.metavar or action.nargs != 0:
                    meta = action.metavar or (
                        "{" + ",".join(map(str, action.choices)) + "}"
                        if action.choices
                        else action.dest.upper()
                    )
                    flag += f" {meta}"
            else:
                flag = str(action.metavar or action.dest)
            text = (action.help or "").replace("%(default)s", str(action.default))
            if action.choices and action.option_strings and action.metavar:
                text += f" ({', '.join(map(str, action.choices))})"
            cell = text.replace("|", "\\|") or "—"
            rows.append(f"| `{flag}` | {cell} |")
        out += ["| argument | meaning |", "|---|---|", *rows, ""]
    return out


# --- the page ----------------------------------------------------------------------------------


def anchor(title: str) -> str:
    """GitHub's anchor for a heading."""
    text = title.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def build() -> str:
    sections: list[list[str]] = [describe_module(name) for name in MODULES]
    sections.append(describe_cli())
    toc = ["## Contents", ""]
    for section in sections:
        title = section[0].removeprefix("## ")
        toc.append(f"- [{title.replace('`', '')}](#{anchor(title)})")
        if title == "Command line":
            for line in section:
                if line.startswith("### "):
                    sub = line.removeprefix("### ")
                    toc.append(f"  - [{sub.replace('`', '')}](#{anchor(sub)})")
    head = [
        "# API reference",
        "",
        "<!-- Generated by scripts/gen_reference.py from the code: do not edit by hand. -->",
        "",
        "Every public name of each public module (its `__all__`), with its signature and the first",
        "paragraph of its docstring, and the command-line interface. How the parts fit together:",
        "[design.md](design.md); guides: [receiver.md](receiver.md), [front.md](front.md),",
        "[howto-asgi.md](howto-asgi.md), [howto-websocket.md](howto-websocket.md),",
        "[howto-sse.md](howto-sse.md); wire formats: [protocol.md](protocol.md); limits:",
        "[security.md](security.md). This page is generated: after changing a public name,",
        "signature or docstring, run `.venv/bin/python scripts/gen_reference.py`",
        "(`--check` exits 1 when the page is out of date).",
        "",
    ]
    body: list[str] = []
    for section in sections:
        body += section
    text = "\n".join(head + toc + [""] + body).rstrip() + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate docs/reference.md from the code.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    try:
        text = build()
    except ExportError as exc:
        print(f"gen_reference: {exc}", file=sys.stderr)
        return 2
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run scripts/gen_reference.py")
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
