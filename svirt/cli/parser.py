"""The command line's grammar: ``svirt --version`` and one sub-parser per
verb, each verb module adding its own (``add_verbs``) with its ``func`` and
``needs_root`` (the verbs that give guests uids, labels and devices)."""

from __future__ import annotations

from svirt.cli.boot import add_verbs as add_boot_verbs
from svirt.cli.common import VERSION
from svirt.cli.detached import add_verbs as add_detached_verbs
from svirt.cli.exec import add_verbs as add_exec_verbs
from svirt.cli.host import add_verbs as add_host_verbs
from svirt.cli.image import add_verbs as add_image_verbs
from svirt.cli.run import add_verbs as add_run_verbs
from svirt.cli.schema import add_verbs as add_schema_verbs

# typing is not imported at run time (see svirt/cli/__init__.py)
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


def build_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="svirt", description="Launch guests confined sVirt-style, without libvirt.")
    parser.add_argument("--version", action="version", version=f"svirt {VERSION}")
    sub = parser.add_subparsers(dest="verb", required=True)
    # in this order in --help: run, the detached verbs, exec and cp, the host's, those at
    # boot, images, the spec's schema
    add_run_verbs(sub)
    add_detached_verbs(sub)
    add_exec_verbs(sub)
    add_host_verbs(sub)
    add_boot_verbs(sub)
    add_image_verbs(sub)
    add_schema_verbs(sub)
    return parser
