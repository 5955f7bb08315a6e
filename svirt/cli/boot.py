"""Guests at boot (issue 11): ``enable``, ``disable`` and ``unit``."""

from __future__ import annotations

import os
import sys

from svirt.cli.common import print_json, usage_error

# typing is not imported at run time (see svirt/cli/__init__.py)
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


def add_verbs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("enable", help="start a guest at boot: copy its spec to "
                                      "/etc/svirt/guests (svirt start --enabled)")
    p.add_argument("spec", nargs="?", help="the guest spec (TOML)")
    p.add_argument("--list", action="store_true", help="list the enabled guests")
    p.add_argument("--json", action="store_true", help="with --list")
    p.set_defaults(func=cmd_enable)
    p = sub.add_parser("disable", help="no longer start a guest at boot")
    p.add_argument("name")
    p.set_defaults(func=cmd_disable)
    p = sub.add_parser("unit", help="print a systemd unit (or init script) for guests")
    p.add_argument("name", nargs="?",
                   help="an enabled guest: a unit that runs it with svirt run")
    p.add_argument("--boot", action="store_true",
                   help="svirt-guests.service: svirt start --enabled at boot, "
                        "svirt stop --all at shutdown")
    p.add_argument("--sysv", action="store_true",
                   help="with --boot: an LSB init script (/etc/init.d/svirt-guests)")
    p.set_defaults(func=cmd_unit)


def _require_root(verb: str) -> None:
    from svirt.errors import HostError

    if os.geteuid() != 0:
        raise HostError(f"svirt {verb} must be root: each guest gets a uid, labels and "
                        "devices of its own", hint=f"run it as root (sudo svirt {verb} ...)")


def cmd_enable(args: argparse.Namespace) -> int:
    from svirt.service.enabled import enable

    if args.list:
        if args.spec is not None:
            return usage_error("svirt enable --list takes no spec")
        return _list_enabled(args.json)
    if args.spec is None:
        return usage_error("svirt enable needs a spec file (or --list)")
    _require_root("enable")
    result = enable(args.spec)
    notes = ["replaced the earlier copy"] if result.replaced else []
    notes += ["relative paths made absolute"] if result.rewritten else []
    notes += [f"uuid {result.pinned_uuid} pinned"] if result.pinned_uuid else []
    print(f"svirt: guest {result.name} enabled: {result.path}"
          + (f" ({'; '.join(notes)})" if notes else ""))
    return 0


def _running_names() -> set[str]:
    from svirt.launcher.registry import Registry

    return {r.name for r in Registry().records()
            if r.hypervisor is not None and r.hypervisor.alive()}


def _list_enabled(as_json: bool) -> int:
    from svirt.service.enabled import enabled_guests

    guests, problems = enabled_guests()
    running = _running_names()
    if as_json:
        print_json([{"name": g.name, "path": str(g.path), "running": g.name in running}
                    for g in guests])
    else:
        for g in guests:
            print(f"{g.name:20} {'running' if g.name in running else 'stopped':8} {g.path}")
    for problem in problems:
        print(f"svirt: warning: {problem}", file=sys.stderr)
    return 0


def cmd_disable(args: argparse.Namespace) -> int:
    from svirt.service.enabled import disable

    _require_root("disable")
    path = disable(args.name)
    still = f" (it still runs: svirt stop {args.name})" if args.name in _running_names() else ""
    print(f"svirt: guest {args.name} disabled: removed {path}{still}")
    return 0


def cmd_unit(args: argparse.Namespace) -> int:
    from svirt.service import units

    if args.boot:
        if args.name is not None:
            return usage_error("svirt unit --boot takes no guest name")
        text = units.boot_script() if args.sysv else units.boot_unit()
    elif args.sysv:
        return usage_error("--sysv goes with --boot")
    elif args.name is None:
        return usage_error("svirt unit needs a guest name (or --boot)")
    else:
        text = units.guest_unit(args.name)
    sys.stdout.write(text)
    return 0
