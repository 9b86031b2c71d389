"""fdhandoff: hand live client connections from a front server to backend daemons.

A front accepts a client, reads the request head, and passes the live socket
(``SCM_RIGHTS`` over a UNIX socket, the request described as SCGI headers) to
a receiver daemon that owns it from then on.  See docs/design.md.
"""

from __future__ import annotations

__version__ = "0.1.0"
