"""The receiver role (see docs/design.md)."""
