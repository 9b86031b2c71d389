"""What a TLS listener's handshake costs the front: CPU per handshake, memory per waiting one.

The front does every TLS handshake itself (docs/front.md, "TLS"), with the
context ``fdhandoff.front.tls.server_context`` builds, so this measures that
context, in this process, with OpenSSL's memory BIOs (no kernel TLS needed):

* server CPU time (``CLOCK_PROCESS_CPUTIME_ID``) per full handshake and per
  resumed one (the client offers the session of an earlier handshake);
* RSS growth per handshake left waiting for the client (ServerHello sent,
  the client silent), which a slow or hostile client makes the front hold
  until ``timeouts.head``.

Certificates: ECDSA P-256 and RSA-2048, self-signed, made with the openssl
command.  Prints medians and ``RESULT`` lines.

Run: ``.venv/bin/python bench/tls_handshake.py`` (about ten seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fdhandoff.front.tls import TlsFiles, server_context

KEYS = {
    "ecdsa-p256": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    "rsa-2048": ["-newkey", "rsa:2048"],
}


def make_cert(where: Path, kind: str) -> TlsFiles:
    cert, key = where / f"{kind}.pem", where / f"{kind}.key"
    subprocess.run(
        ["openssl", "req", "-x509", *KEYS[kind], "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=bench"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return TlsFiles(str(cert), str(key))


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the server's side is what is measured
    return context


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[float, ssl.SSLSession | None]:
    """One handshake over memory BIOs: the server's CPU seconds, the client's session."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, session=session)
    cpu = 0.0
    server_done = client_done = False
    while not (server_done and client_done):
        if not client_done:
            try:
                c.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not server_done:
            start = time.process_time()
            try:
                s.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            cpu += time.process_time() - start
        c_in.write(s_out.read())
    return cpu, c.session


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def waiting_kib(server: ssl.SSLContext, client: ssl.SSLContext, count: int) -> float:
    """RSS growth per server handshake left waiting after its ServerHello."""
    held: list[object] = []

    def one() -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        tls = server.wrap_socket(ours, server_side=True, do_handshake_on_connect=False)
        c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        c = client.wrap_bio(c_in, c_out)
        with contextlib.suppress(ssl.SSLWantReadError):
            c.do_handshake()  # the ClientHello
        theirs.sendall(c_out.read())
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()  # ServerHello out, then waiting for the client
        theirs.close()
        held.append(tls)

    for _ in range(50):  # warm-up: allocator arenas, caches
        one()
    gc.collect()
    before = rss_kib()
    for _ in range(count):
        one()
    gc.collect()
    growth = (rss_kib() - before) / count
    for tls in held:
        tls.close()  # type: ignore[attr-defined]
    return growth


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--handshakes", type=int, default=300, help="per kind (default 300)")
    parser.add_argument("--waiting", type=int, default=2000, help="waiting handshakes held")
    args = parser.parse_args()
    if shutil.which("openssl") is None:
        print("the openssl command is needed to make the certificates", file=sys.stderr)
        return 2
    print(f"{ssl.OPENSSL_VERSION}, Python {sys.version.split()[0]}")
    client = client_context()
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KEYS:
            server = server_context(make_cert(Path(tmp), kind))
            handshake(server, client)  # warm-up
            full = [handshake(server, client)[0] for _ in range(args.handshakes)]
            _, session = handshake(server, client)
            resumed = [handshake(server, client, session)[0] for _ in range(args.handshakes)]
            full_us = statistics.median(full) * 1e6
            resumed_us = statistics.median(resumed) * 1e6
            print(f"{kind}: full handshake {full_us:.0f} us, resumed {resumed_us:.0f} us "
                  f"of server CPU (median of {args.handshakes})")  # fmt: skip
            print(f"RESULT tls_{kind}_full_us={full_us:.0f} tls_{kind}_resumed_us={resumed_us:.0f}")
        server = server_context(make_cert(Path(tmp), "ecdsa-p256"))
        kib = waiting_kib(server, client, args.waiting)
        print(f"a handshake waiting for its client holds {kib:.1f} KiB (RSS, {args.waiting} held)")
        print(f"RESULT tls_waiting_handshake_kib={kib:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
