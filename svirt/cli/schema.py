"""``svirt schema``: print the JSON Schema of a spec file, for editors.

What it prints is
:func:`svirt.spec.schema_text`, the same text as the committed
``svirt/data/spec.schema.json`` (a test keeps the two equal).
"""

from __future__ import annotations

import sys
from typing import IO, Any

from svirt.spec import schema_text

# typing is not imported at run time (see svirt/cli/__init__.py)
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


def print_schema(out: IO[str] | None = None) -> int:
    """Write the spec's JSON Schema to ``out`` (stdout); the exit code, 0."""
    (out or sys.stdout).write(schema_text())
    return 0


def cmd_schema(args: Any = None) -> int:
    """The ``svirt schema`` verb (it takes no arguments)."""
    return print_schema()


def add_verbs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("schema", help="print the JSON Schema of a guest spec (for editors)")
    p.set_defaults(func=cmd_schema)
