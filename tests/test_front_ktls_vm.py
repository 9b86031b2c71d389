"""Run tests/test_front_ktls.py inside User-Mode Linux, whose kernel has kTLS.

The kernel these tests usually run on may lack the ``tls`` module that TLS
handoff needs, and loading modules into the host kernel is neither possible
in a container nor something a test should do.  Debian's ``user-mode-linux``
package is a Linux kernel (6.1) that runs as an ordinary process, with its
modules, ``tls.ko`` among them.  It boots in a few seconds with the host's
file system as its root (``hostfs``), so the same Python, virtualenv and
project run inside it.  Its init (written below) mounts ``/proc``, ``/sys``
and a ``tmpfs`` for the tests' UNIX sockets, loads the crypto and TLS modules
(``finit_module``), brings up ``lo``, runs pytest on the kTLS module and
powers off.  The VM has no network but its own loopback.
"""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
UML_MODULES = "/usr/lib/uml/modules"
#: tls.ko and what AES-GCM needs in the UML kernel, in load order.
MODULES = ("gf128mul", "ghash-generic", "ctr", "gcm", "seqiv", "tls")
#: Boot, run the kTLS tests (about 10 s), power off; generous for a loaded CI machine.
VM_TIMEOUT = 600

INIT = r'''#!{python}
"""init (pid 1) of the test VM: prepare, run the kTLS tests, power off."""
import ctypes, fcntl, glob, os, socket, struct, subprocess, sys

libc = ctypes.CDLL(None, use_errno=True)


def mount(source, target, fstype):
    os.makedirs(target, exist_ok=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        print("vm: mount", target, os.strerror(ctypes.get_errno()), flush=True)


def load(name):
    found = glob.glob({modules!r} + f"/*/kernel/**/{{name}}.ko*", recursive=True)
    if not found:
        print("vm: no module", name, flush=True)
        return
    fd = os.open(found[0], os.O_RDONLY)
    # finit_module(2), x86_64 syscall 313; EEXIST: built in or loaded already.
    if libc.syscall(313, fd, b"", 0) != 0 and ctypes.get_errno() != 17:
        print("vm: load", name, os.strerror(ctypes.get_errno()), flush=True)
    os.close(fd)


status = 1
try:
    mount("proc", "/proc", "proc")
    mount("sysfs", "/sys", "sysfs")
    mount("tmpfs", "/dev/shm", "tmpfs")
    for name in {names!r}:
        load(name)
    with socket.socket() as s:  # lo up: SIOCGIFFLAGS, SIOCSIFFLAGS | IFF_UP
        flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))
    env = {env!r}
    status = subprocess.call({command!r}, cwd={cwd!r}, env=env)
except BaseException as exc:
    print("vm: init failed:", repr(exc), flush=True)
print(f"vm: exit status {{status}}", flush=True)
sys.stdout.flush()
libc.sync()
libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF
'''


def uml_kernel() -> str | None:
    for path in ("/usr/bin/linux.uml", "/usr/bin/linux"):
        if os.access(path, os.X_OK) and glob.glob(f"{UML_MODULES}/*/kernel/net/tls/tls.ko*"):
            return path
    return None


@pytest.mark.timeout(VM_TIMEOUT + 60)
def test_ktls_suite_in_a_user_mode_linux_vm(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    kernel = uml_kernel()
    if kernel is None:
        # Under CI a missing kernel fails (never a silently skipped suite).
        require_tool("linux.uml (Debian package user-mode-linux, with its tls module)")
        return
    report = tmp_path / "report.xml"
    command = [
        sys.executable, "-m", "pytest", str(TESTS / "test_front_ktls.py"),
        "-p", "no:cacheprovider", "-q", "-rA", f"--junitxml={report}",
    ]  # fmt: skip
    # FDHANDOFF_KTLS_K=EXPR runs only the matching tests (pytest -k), when working on one.
    selected = os.environ.get("FDHANDOFF_KTLS_K")
    if selected:
        command += ["-k", selected]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "TMPDIR": "/dev/shm",
        "LANG": "C.UTF-8",
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO / "src")]),
        "FDHANDOFF_KTLS_VM": "1",
    }
    init = tmp_path / "init.py"
    init.write_text(
        INIT.format(
            python=sys.executable,
            modules=UML_MODULES,
            names=list(MODULES),
            env=env,
            command=command,
            cwd=str(REPO),
        )
    )
    init.chmod(0o755)
    boot = [
        kernel, "mem=1024M", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "rw",
        f"init={init}", "con=null", "con0=fd:0,fd:1", "quiet",
    ]  # fmt: skip
    # UML keeps its memory in a file under TMPDIR; its own session, so a
    # timeout can kill every one of its host processes.
    proc = subprocess.Popen(
        boot,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(os.environ, TMPDIR=str(tmp_path)),
    )
    try:
        output, _ = proc.communicate(timeout=VM_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail("the VM did not finish:\n" + output.decode(errors="replace")[-5000:])
    text = output.decode(errors="replace")
    found = re.search(r"vm: exit status (\d+)", text)
    assert found, f"the VM never ran the tests:\n{text[-5000:]}"
    assert report.exists(), text[-5000:]
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {key: int(suite.get(key, "0")) for key in ("tests", "failures", "errors", "skipped")}
    assert found.group(1) == "0", text[-8000:]
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, text[-8000:]
    assert counts["tests"] >= (1 if selected else 26), counts
