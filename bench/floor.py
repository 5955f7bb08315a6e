"""Section "floor": svirt's own overhead against the floor (issue 13, item 4).

* Launch to the guest's marker line, UML and QEMU-TCG, in rotating order per
  round: the raw argv (as the launch section runs it: root, no uid switch,
  no jail, console on stdout), ``svirt run`` (jailed, the default) and
  ``svirt run`` of the same spec with ``jail = false``.  The overhead of
  each svirt variant is taken per round against the raw run of that round.
* The command line: ``python -c pass`` (the interpreter with site and the
  venv's .pth files) and ``python -I -c pass`` (without them), ``svirt
  --version``, ``svirt list`` with 1,000 registered guests (fake records
  whose supervisors are live ``sleep`` processes), interleaved.
* ``Registry.reserve`` + ``release`` with 10,000 registered guests, in
  process, with a private claims directory.
* With ``--baseline-tree DIR`` (a directory holding an older ``svirt``
  package, e.g. ``git archive OLD svirt | tar -x -C DIR``) the command-line
  rows and reserve + release are also measured with that tree, interleaved
  with the current one, so that before/after come from the same minutes.
* ``python -X importtime`` of ``svirt --version``, ``svirt list`` (1,000
  guests) and ``svirt run`` (one UML boot): the slowest imports by
  cumulative time.

The concurrent launches (50 and 100 UML guests against as many raw ones)
are the scale section's: ``bench/run --only scale --scale-sizes 50,100``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from bench.fake import add_fake_records, fake_registry
from bench.guests import QEMU_TCG, UML, Flavor, Images, Workspace, raw_command, raw_setup
from bench.procs import Watched, run_once, stop_gently
from bench.util import (
    PYTHON,
    REPO,
    SVIRT,
    SectionResult,
    Series,
    Sleepers,
    Target,
    differences,
    make_temp_dir,
    now,
    run_dir_base,
    summarize,
)

MARKER = "SVIRT-BENCH-FLOOR"
LAUNCH_OVER_LIMIT_S = 0.025
VERSION_LIMIT_S = 0.040
LIST_LIMIT_S = 0.100
SLOT_LIMIT_S = 0.020
LIST_GUESTS = 1_000
SLOT_GUESTS = 10_000
VARIANTS = ("raw", "svirt", "nojail")
LABELS = {"raw": "raw argv (no jail, no uid switch)", "svirt": "svirt run (jailed)",
          "nojail": "svirt run, jail = false"}


def run(imgs: Images, runs: int, sleepers: Sleepers,
        baseline_tree: Path | None = None) -> SectionResult:
    res = SectionResult("floor")
    ws = Workspace("floor")
    _launch(res, ws, imgs, runs)
    claims = make_temp_dir("bench-claims-", run_dir_base(), 0o700)
    env_claims = dict(ws.env(), SVIRT_CLAIMS_DIR=str(claims))
    reg_list = fake_registry("list1k")
    add_fake_records(reg_list, LIST_GUESTS, sleepers.start(100))
    trees: dict[str, Path | None] = {"": None}
    if baseline_tree:
        trees["before"] = baseline_tree.resolve()
    if baseline_tree:
        res.notes.append(f"'before' rows: svirt from {baseline_tree}, interleaved with the "
                         "current tree")
    _cli(res, runs, env_claims, dict(env_claims, SVIRT_RUN_DIR=str(reg_list)), trees)
    _slots(res, ws, imgs, runs, sleepers, claims, trees)
    res.extra["importtime"] = _importtimes(
        ws, imgs, env_claims, dict(env_claims, SVIRT_RUN_DIR=str(reg_list)))
    res.targets += _targets(res)
    return res


# ------------------------------------------------------------------ launch
def _launch(res: SectionResult, ws: Workspace, imgs: Images, runs: int) -> None:
    flavors: list[Flavor] = [UML, QEMU_TCG]
    specs: dict[str, dict[str, str]] = {}
    plans: dict[str, dict[str, Any]] = {}
    for fl in flavors:
        jailed = ws.write_spec(f"bench-floor-{fl.key}", fl, imgs, "poweroff", MARKER)
        loose = ws.write_spec(f"bench-floor-{fl.key}-nojail", fl, imgs, "poweroff", MARKER,
                              jail=False)
        specs[fl.key] = {"svirt": str(jailed), "nojail": str(loose)}
        plans[fl.key] = ws.check(jailed)
    series: dict[str, Series] = {}
    for fl in flavors:
        for v in VARIANTS:
            series[f"{fl.key}.{v}"] = res.new(
                f"launch.{fl.key}.{v}", f"{fl.key} {LABELS[v]}: start -> marker", "s",
                baseline=None if v == "raw" else f"launch.{fl.key}.raw")
    failures: list[dict[str, Any]] = []

    def one(fl: Flavor, v: str, label: str) -> Watched:
        if v == "raw":
            raw_dir = ws.raw_dir()
            argv, env = raw_command(plans[fl.key], raw_dir)
            return run_once(argv, marker=MARKER, env=env, cwd=str(raw_dir),
                            stderr_path=ws.log_path(label), preexec=raw_setup(plans[fl.key]))
        return run_once([SVIRT, "run", specs[fl.key][v], "--console", "stdio"], marker=MARKER,
                        env=ws.env(), stderr_path=ws.log_path(label), stop=stop_gently)

    for fl in flavors:  # warm-up: page cache, .pyc files, the registry's host cache
        for v in VARIANTS:
            one(fl, v, f"warm-{fl.key}-{v}")
    for rnd in range(runs):
        for fl in flavors:
            k = rnd % len(VARIANTS)
            got: dict[str, float] = {}
            for v in VARIANTS[k:] + VARIANTS[:k]:
                w = one(fl, v, f"{fl.key}-{v}-{rnd}")
                if w.marker_s is not None and w.returncode == 0:
                    got[v] = w.marker_s
                else:
                    failures.append({"round": rnd, "flavor": fl.key, "variant": v,
                                     "returncode": w.returncode, "tail": w.tail()})
            if len(got) == len(VARIANTS):  # keep the series paired by round
                for v, t in got.items():
                    series[f"{fl.key}.{v}"].add(t)
        print(f"bench: floor launch round {rnd + 1}/{runs} done", flush=True)
    res.extra["launch_failures"] = failures


# --------------------------------------------------------------------- cli
def _wall(argv: list[str], env: dict[str, str]) -> float:
    t0 = now()
    out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=env, timeout=120)
    dt = now() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {out.stderr.decode(errors='replace')}")
    return dt


def _with_tree(env: dict[str, str], tree: Path | None) -> dict[str, str]:
    """``env`` with svirt from ``tree`` (None: the one measured everywhere
    else) and the bench's own package from this checkout."""
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(env, PYTHONPATH=os.pathsep.join(
        ([str(tree)] if tree is not None else []) + path + [str(REPO)]))


def _cli(res: SectionResult, runs: int, env: dict[str, str], env_list: dict[str, str],
         trees: dict[str, Path | None]) -> None:
    cli: list[tuple[Series, list[str], dict[str, str]]] = [
        (res.new("cli.python", "python -c pass (site, venv .pth files)", "s"),
         [PYTHON, "-c", "pass"], env),
        (res.new("cli.python_isolated", "python -I -c pass (no site-packages .pth files)",
                 "s"), [PYTHON, "-I", "-c", "pass"], env),
    ]
    for tag, tree in trees.items():
        suffix, what = (f".{tag}", f" ({tag})") if tag else ("", "")
        cli += [
            (res.new(f"cli.version{suffix}", f"svirt --version{what}", "s",
                     baseline="cli.python"), [SVIRT, "--version"], _with_tree(env, tree)),
            (res.new(f"cli.list1k{suffix}", f"svirt list, {LIST_GUESTS:,} guests{what}", "s",
                     baseline="cli.python"), [SVIRT, "list"], _with_tree(env_list, tree)),
        ]
    for _, argv, e in cli:  # page cache, .pyc files
        _wall(argv, e)
    for rnd in range(runs * 2):
        k = rnd % len(cli)
        for series, argv, e in cli[k:] + cli[:k]:
            series.add(_wall(argv, e))


# ------------------------------------------------------------------- slots
def _slots(res: SectionResult, ws: Workspace, imgs: Images, runs: int, sleepers: Sleepers,
           claims: Path, trees: dict[str, Path | None]) -> None:
    """reserve + release in a worker process per batch (bench.slotworker), the
    trees alternating batch by batch."""
    root = fake_registry("slots10k")
    t0 = now()
    add_fake_records(root, SLOT_GUESTS, sleepers.start(100))
    res.extra["slots_fill_s"] = now() - t0
    spec = ws.write_spec("bench-floor-slot", UML, imgs, "poweroff", MARKER)
    series: dict[str, tuple[Series, Series, Series]] = {}
    for tag in trees:
        suffix, what = (f".{tag}", f" ({tag})") if tag else ("", "")
        series[tag] = (
            res.new(f"slot.reserve10k{suffix}", f"Registry.reserve, {SLOT_GUESTS:,} guests{what}",
                    "s"),
            res.new(f"slot.release10k{suffix}", f"Registry.release, {SLOT_GUESTS:,} guests{what}",
                    "s"),
            res.new(f"slot.both10k{suffix}", f"reserve + release, {SLOT_GUESTS:,} guests{what}",
                    "s", baseline=None if not tag else "slot.both10k"))
    slots: set[int] = set()
    for _ in range(runs):
        for tag, tree in trees.items():
            done = subprocess.run(
                [PYTHON, "-m", "bench.slotworker", str(root), str(claims), str(spec), "2"],
                capture_output=True, text=True, timeout=600, cwd="/",  # not REPO: sys.path[0]
                env=_with_tree(dict(os.environ), tree))
            if done.returncode != 0:
                raise RuntimeError(f"bench.slotworker failed: {done.stderr[-1500:]}")
            data = json.loads(done.stdout)
            s_res, s_rel, s_both = series[tag]
            for a, b in zip(data["reserve"], data["release"], strict=True):
                s_res.add(a)
                s_rel.add(b)
                s_both.add(a + b)
            slots.update(data["slots"])
    res.extra["slots_given"] = sorted(slots)


# -------------------------------------------------------------- importtime
def _importtimes(ws: Workspace, imgs: Images, env: dict[str, str],
                 env_list: dict[str, str]) -> dict[str, Any]:
    spec = ws.write_spec("bench-floor-imports", UML, imgs, "poweroff", MARKER)
    out: dict[str, Any] = {}
    for name, argv, e in (
            ("svirt --version", ["--version"], env),
            (f"svirt list ({LIST_GUESTS:,} guests)", ["list"], env_list),
            ("svirt run (UML)", ["run", str(spec), "--console", "none"], env)):
        done = subprocess.run([PYTHON, "-X", "importtime", SVIRT, *argv],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=e, timeout=300)
        out[name] = importtime_summary(done.stderr)
    return out


def importtime_summary(stderr: str, top: int = 12) -> dict[str, Any]:
    """Total import time after ``site``, and the slowest imports (cumulative ms, depth)."""
    rows: list[tuple[int, int, str]] = []
    after_site = False
    total = 0
    for line in stderr.splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3:
            continue
        head = parts[0].split(":")[-1].strip()
        if not head.isdigit():
            continue  # the header line
        cumulative = int(parts[1])
        name = parts[2].rstrip()
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        if after_site:
            rows.append((cumulative, depth, name.strip()))
            if depth == 0:
                total += cumulative
        if name.strip() == "site" and depth == 0:
            after_site = True
    rows.sort(reverse=True)
    return {"total_ms": total / 1000,
            "top": [{"module": n, "depth": d, "cumulative_ms": c / 1000}
                    for c, d, n in rows[:top]]}


# ----------------------------------------------------------------- targets
def _median(values: list[float]) -> float | None:
    s = summarize(values)
    return None if s is None else s["median"]


def _targets(res: SectionResult) -> list[Target]:
    out: list[Target] = []

    def get(key: str) -> list[float]:
        s = res.get(key)
        return s.samples if s else []

    for fl in (UML, QEMU_TCG):
        for v in ("svirt", "nojail"):
            over = _median(differences(get(f"launch.{fl.key}.{v}"), get(f"launch.{fl.key}.raw")))
            out.append(Target(
                f"{LABELS[v]} over raw to the marker ({fl.key})",
                "n/a" if over is None else f"{over * 1000:+.1f} ms",
                f"<= {LAUNCH_OVER_LIMIT_S * 1000:.0f} ms",
                None if over is None else over <= LAUNCH_OVER_LIMIT_S))
    for key, limit, name in (
            ("cli.version", VERSION_LIMIT_S, "svirt --version"),
            ("cli.list1k", LIST_LIMIT_S, f"svirt list, {LIST_GUESTS:,} guests"),
            ("slot.both10k", SLOT_LIMIT_S, f"reserve + release, {SLOT_GUESTS:,} guests")):
        m = _median(get(key))
        out.append(Target(name, "n/a" if m is None else f"{m * 1000:.1f} ms",
                          f"<= {limit * 1000:.0f} ms", None if m is None else m <= limit))
    return out


__all__ = ["importtime_summary", "run"]
