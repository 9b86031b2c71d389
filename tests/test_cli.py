"""The ``fdhandoff`` command as a user runs it: ``python -m fdhandoff`` and the console script."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import fdhandoff
from fdhandoff import cli

#: The console script pip installed into the same virtualenv as this Python
#: (not resolved: the venv's bin/python may be a symlink to the system one).
CONSOLE_SCRIPT = Path(sys.executable).parent / "fdhandoff"


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)


def subcommands() -> list[str]:
    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return sorted(action.choices)
    raise AssertionError("the parser has no sub-commands")


def test_python_m_help() -> None:
    result = run(sys.executable, "-m", "fdhandoff", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fdhandoff")
    for name in ("serve", "front", "demo"):
        assert name in result.stdout
    assert result.stderr == ""


def test_console_script_version() -> None:
    assert CONSOLE_SCRIPT.is_file(), f"{CONSOLE_SCRIPT} missing: install the package (.[test])"
    result = run(str(CONSOLE_SCRIPT), "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"fdhandoff {fdhandoff.__version__}\n"


def test_python_m_version_matches_the_console_script() -> None:
    result = run(sys.executable, "-m", "fdhandoff", "--version")
    assert result.returncode == 0
    assert result.stdout == f"fdhandoff {fdhandoff.__version__}\n"


def test_version_is_the_installed_distribution_version() -> None:
    assert importlib.metadata.version("fdhandoff") == fdhandoff.__version__


def test_console_script_help() -> None:
    result = run(str(CONSOLE_SCRIPT), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fdhandoff")


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["--no-such-option"]])
def test_usage_errors_exit_2_with_a_message(argv: list[str]) -> None:
    result = run(sys.executable, "-m", "fdhandoff", *argv)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage: fdhandoff" in result.stderr
    assert "error:" in result.stderr


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    names = subcommands()
    assert {"serve", "front", "demo"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as info:
            cli.main([name, "--help"])
        assert info.value.code == 0, name
        assert f"usage: fdhandoff {name}" in capsys.readouterr().out
