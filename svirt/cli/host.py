"""Verbs about this host and its registry: ``check`` (a spec's plan),
``host`` (what this host can run), ``list``, ``gc``, ``demo`` and ``explain``
(kernel denials, guest by guest)."""

from __future__ import annotations

import os
import sys

from svirt.cli.common import EPHEMERAL_HELP, one_line, print_json

# typing is not imported at run time (see svirt/cli/__init__.py)
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


def add_verbs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="validate a spec and show the argv and label plan")
    p.add_argument("spec")
    p.add_argument("--ephemeral", action="store_true", help=EPHEMERAL_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("host", help="what this host can run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_host)
    p = sub.add_parser("list", help="running guests")
    p.add_argument("-Z", action="store_true", help="show security labels and uid:gid")
    p.add_argument("--usage", action="store_true",
                   help="show memory and cpu time from each guest's cgroup")
    p.add_argument("--cluster", action="store_true",
                   help="every host's guests, from the cluster's etcd ([cluster] in the config)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("gc", help="release the records of guests that are gone")
    p.set_defaults(func=cmd_gc)
    p = sub.add_parser("demo", help="build tiny guests and boot a UML and a QEMU guest")
    p.add_argument("--real", action="store_true",
                   help="instead: build (or reuse) the Debian image and boot it through UEFI "
                        "with a cloud-init seed, exec in it through its agent")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("explain", help="explain SELinux/AppArmor/SMACK denials guest by guest")
    p.add_argument("file", nargs="?",
                   help="a log to read ('-': stdin); default: /dev/kmsg and the audit log")
    p.add_argument("--since", metavar="TIME",
                   help="only newer denials: ISO-8601, or a span back (10m, 2h, 1d)")
    p.add_argument("--guest", metavar="NAME",
                   help="only denials of this guest, or of another guest on its objects")
    p.add_argument("--json", action="store_true", help="one JSON object per line and denial")
    p.set_defaults(func=cmd_explain)


def cmd_host(args: argparse.Namespace) -> int:
    from svirt.host import probe_host

    host = probe_host()
    cluster = _cluster_status()
    if args.json:
        print_json({**host.to_dict(), **({"cluster": cluster} if cluster else {})})
        return 0
    for name, binary in host.binaries.items():
        print(f"{name:20} {binary.version + '  ' + binary.path if binary else 'not installed'}")
    print(f"{'kvm':20} {'usable' if host.kvm.usable else 'unusable'}: {host.kvm.reason}")
    mls = " (MLS/MCS)" if host.selinux_mls else ""
    print(f"{'selinux':20} {host.selinux}{mls}"
          f"{' policy ' + host.selinux_policy if host.selinux_policy else ''}")
    print(f"{'smack':20} {'active' if host.smack else 'not active'}")
    print(f"{'apparmor':20} {'active' if host.apparmor else 'not active'}")
    print(f"{'lguest':20} {'/dev/lguest present' if host.lguest_device else '/dev/lguest absent'}")
    if host.uml_xstate_fallback:
        print(f"{'uml fpu':20} AMX host: UML falls back to FXSAVE (seccomp), guests without AVX")
    print(f"{'lsm':20} {','.join(host.lsms) or 'unknown'}")
    if cluster:
        _print_cluster(cluster)
    return 0


def _cluster_status() -> dict[str, Any] | None:
    """The [cluster] state for svirt host (None: this host alone)."""
    import svirt.config as config
    from svirt.errors import ConfigError

    try:
        conf = config.load().cluster
    except ConfigError:
        if os.geteuid() == 0:
            raise
        return None  # a user who may not read the host config: the host alone
    if conf is None:
        return None
    from svirt.claims.cluster import ClusterClaims
    from svirt.claims.host import default_claims_dir

    return ClusterClaims(conf).status(default_claims_dir())


def _print_cluster(c: dict[str, Any]) -> None:
    print(f"{'cluster':20} {c['name']} (this host: {c['host']}, lease TTL {c['ttl']}s)")
    for h in c["health"]:
        print(f"{'  member':20} {h['endpoint']}: {h['state']}")
    names = ", ".join(m["name"] or m["id"] for m in c["members"])
    print(f"{'  members':20} {names or 'unknown: ' + c.get('error', '')}")
    lease = c["lease"]
    if lease is None:
        print(f"{'  lease':20} none (no guest of this host holds one)")
    elif "error" in lease:
        print(f"{'  lease':20} {lease['id']}: {lease['error']}")
    else:
        print(f"{'  lease':20} {lease['id']}: {lease['ttl_left']}s left, {lease['keys']} keys")


def _list_cluster(as_json: bool) -> int:
    import svirt.config as config
    from svirt.errors import ConfigError

    conf = config.load().cluster
    if conf is None:
        raise ConfigError("no [cluster] table", source=str(config.config_path()),
                          hint="svirt list --cluster needs [cluster] etcd = [...]")
    from svirt.claims.cluster import ClusterClaims
    from svirt.termsafe import escape_text as esc

    guests = ClusterClaims(conf).guests()
    if as_json:
        print_json(guests)  # json escapes every control character itself
        return 0
    # every value comes from etcd, which any host of the cluster writes: escaped
    print(f"{'HOST':16} {'NAME':20} {'UID':>8} {'MCS':12} {'LEASE':17} IMAGES")
    for g in guests:
        uid = next((str(c)[4:] for c in g["claims"] if str(c).startswith("uid-")), "-")
        mcs = next((str(c)[4:] for c in g["claims"] if str(c).startswith("mcs-")), "-")
        print(f"{esc(str(g['host'])):16} {esc(str(g['name'] or '(no guest)')):20} "
              f"{esc(uid):>8} {esc(mcs):12} {esc(str(g['lease'] or '-')):17} "
              f"{esc(' '.join(map(str, g['images'])) or '-')}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import shlex

    from svirt.launcher.launch import describe
    from svirt.spec import load_spec

    spec = load_spec(args.spec)
    if args.ephemeral:
        spec = spec.with_ephemeral_disks()
    plan = describe(spec)
    for problem in plan["warnings"]:
        print(f"svirt: warning: {one_line(problem)}", file=sys.stderr)
    if args.json:
        print_json(plan)
        return 0
    print(f"guest {plan['name']}: backend {plan['backend']}, accel {plan['accel']}, "
          f"security {' + '.join(plan['security']) or 'none'}, "
          f"jail {'on' if plan['jail'] else 'OFF'}")
    print("argv:")
    print("  " + " ".join(shlex.quote(a) for a in plan["argv"]))
    if plan["env"]:
        print("env: " + " ".join(f"{k}={v}" for k, v in plan["env"].items()))
    if plan["slot"] is None:
        print("process: unconfined (security model none)")
    else:
        print(f"process (slot {plan['slot']} if launched now):")
        for drv, proc in plan["process"].items():
            print(f"  {drv}: {proc['identity']}" + (f"  ({proc['note']})" if proc["note"] else ""))
    print("label plan:")
    for r in plan["resources"]:
        made = "  (made by the launch)" if r["made_by_launch"] else ""
        print(f"  {r['kind']:12} {r['access']:7} {one_line(r['path'])}{made}")
        if r["refused"]:
            print(f"      refused: {one_line(r['refused'])}")
        for drv, obj in r["plan"].items():
            first, *more = obj["setting"].splitlines() or [""]
            note = f"  ({obj['note']})" if obj["note"] else ""
            print(f"      {drv}: {one_line(first)}{note}")
            for line in more:  # an AppArmor directory: two rules
                print(f"      {' ' * len(drv)}  {one_line(line)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from svirt.errors import SvirtError
    from svirt.launcher.cgroups import record_usage
    from svirt.launcher.registry import Registry

    if args.cluster:
        return _list_cluster(args.json)
    registry = Registry()
    records = registry.reconcile_records() if os.geteuid() == 0 else registry.records()
    if os.geteuid() == 0:
        from svirt.service.client import bring_back

        try:
            bring_back(registry)  # detached guests whose supervisor died: adopted again
        except SvirtError as err:  # the list of every guest still comes
            registry.problems.append(f"detached guests not adopted: {err.message}")
    orphans = registry.orphans(records=records)
    usage = {r.name: record_usage(r.journal) for r in records} if args.usage else {}
    # a record that cannot be read is kept for a person: shown, never dropped
    unreadable = {name: f"restore-failed: unreadable record ({why})"
                  for name, why in registry.unreadable.items()}
    if args.json:
        print_json([{**r.to_json(), **({"usage": usage[r.name]} if args.usage else {})}
                    for r in records]
                   + [{"name": name, "status": status} for name, status in unreadable.items()]
                   + [{"name": None, "status": "orphan", "pid": pid, "uid": uid}
                      for pid, uid in orphans])
        return 0
    for problem in registry.problems:
        print(f"svirt: warning: {one_line(problem)}", file=sys.stderr)
    header = f"{'NAME':20} {'BACKEND':7} {'SLOT':>5} {'PID':>8} {'STATUS':9}"
    if args.usage:
        header += f" {'MEM':>9} {'CPU':>9}"
    if args.Z:
        header += f" {'PROCESS LABEL':45} {'IMAGE LABEL':45} UID:GID"
    print(header)
    for r in records:
        pid = r.hypervisor.pid if r.hypervisor else "-"
        # a restore-failed status quotes what failed (names from the guest's home)
        line = f"{r.name:20} {r.backend:7} {r.slot:>5} {pid!s:>8} {one_line(r.status):9}"
        if args.usage:
            u = usage[r.name]
            mem = f"{u['memory'] / 2**20:.1f}M" if "memory" in u else "-"
            cpu = f"{u['cpu_ns'] / 1e9:.1f}s" if "cpu_ns" in u else "-"
            line += f" {mem:>9} {cpu:>9}"
        if args.Z:
            se = (r.labels.get("selinux") or r.labels.get("apparmor")
                  or r.labels.get("smack"))
            dac = r.labels.get("dac")
            line += (f" {se.process if se else '-':45} {se.image if se else '-':45}"
                     f" {dac.process if dac else '-'}")
        print(line)
    for name, status in unreadable.items():
        print(f"{name:20} {'-':7} {'-':>5} {'-':>8} {one_line(status)}")
    for pid, uid in orphans:
        line = f"{'(orphan)':20} {'-':7} {'-':>5} {pid:>8} {'orphan':9}"
        line += f" {'-':>9} {'-':>9}" if args.usage else ""
        print(line + (f" {'-':45} {'-':45} {uid}:-" if args.Z else ""))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from svirt.errors import SvirtError
    from svirt.launcher.registry import Registry

    registry = Registry()
    killed = registry.kill_orphans()
    done = registry.reconcile()
    from svirt.service.client import bring_back

    try:
        adopted = bring_back(registry)
    except SvirtError as err:  # gc of every other guest still goes on
        adopted = []
        registry.problems.append(f"detached guests not adopted: {err.message}")
    if adopted:
        print(f"svirt gc: detached guests supervised again: {', '.join(adopted)}")
    swept = registry.sweep_claims() + registry.sweep_control()
    for line in swept + killed:  # swept: stale claims of any registry on the host
        print(line)
    if not done and not killed:
        print("svirt gc: nothing to release")
    failed = False
    for name, report in done:
        if any(line.startswith("restore failed") for line in report):
            failed = True
            print(f"could not release guest {name} (kept; gc retries)")
        else:
            print(f"released guest {name}")
        for line in report:
            print(f"  {line}")
    for problem in registry.problems:
        failed = True
        print(f"svirt: warning: {one_line(problem)}", file=sys.stderr)
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    if not args.real:
        from svirt.demo import run_demo

        return run_demo()
    from contextlib import nullcontext

    from svirt.cli.image import TerminalProgress
    from svirt.demo import real_image, run_real_demo

    print("building the Debian image (once: then from the image cache)", flush=True)
    with TerminalProgress(sys.stderr) if sys.stderr.isatty() else nullcontext() as progress:
        image, seconds = real_image(progress)
    return run_real_demo(image, seconds)


def cmd_explain(args: argparse.Namespace) -> int:
    """Kernel denials (SELinux, AppArmor, SMACK) explained guest by guest."""
    import json
    import time

    from svirt.explain import explain_host

    findings, problems = explain_host(args.file, since=args.since, guest=args.guest,
                                      stdin=sys.stdin.buffer if args.file == "-" else None)
    for problem in problems:
        print(f"svirt: warning: {one_line(problem)}", file=sys.stderr)
    if args.json:
        for f in findings:
            print(json.dumps(f.to_json(), sort_keys=True))
        if not findings:
            print("no denials found", file=sys.stderr)
        return 0
    if not findings:
        print("no denials found")
        return 0
    for f in findings:
        d = f.denial
        when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.time))
                if d.time is not None else "(time unknown)")
        who = f"guest {f.guest}" if f.guest else "no guest"
        proc = " ".join(x for x in (f"pid {d.pid}" if d.pid else "", d.comm or "") if x)
        print(one_line(f"{when}  {d.lsm}  {who} ({f.guest_by}{'; ' + proc if proc else ''})"))
        print(one_line(f"  {f.classification}: {f.summary}"))
        if f.rule:
            print(one_line(f"    {f.rule}"))
        if d.fields.get("permissive") == "1":
            print("  (permissive: the access was logged, not stopped)")
    return 0
