"""Moved: :mod:`svirt.claims` (re-exports removed at merge)."""
