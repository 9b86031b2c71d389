"""The ``fdhandoff demo``: a front, the demo receivers and a small auth application."""
