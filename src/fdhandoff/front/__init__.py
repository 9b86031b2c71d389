"""The front role (see docs/design.md)."""
