"""``python -m fdhandoff`` is the ``fdhandoff`` command."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
