"""The chaos driver: random verbs through the real CLI on a few guests at
once, hostile stand-ins drawing their attacks from the catalogue, and the
invariants checked after every step.

Everything random comes from one seed (printed; ``SVIRT_CHAOS_SEED`` or
``--seed``), so a failing run is replayed with the same seed (the draws
repeat; timings do not).  A violation carries the seed, the step, the step
history and the evidence.

Bounds: every verb has the time it must end within (``BOUNDS``, seconds):
the bound svirt documents for it (README "Every wait has a bound", computed
from the same constants: ``service.client.answer_bound``, the ladder's
steps) plus a margin, never a guess of the suite's.  Each verb's slowest
run is in the summary (``slowest``), so a verb that nears its bound shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svirt.launcher import supervisor
from svirt.service import client
from tests.hostile.chaos import catalogue, hypervisor, invariants
from tests.hostile.chaos.world import (
    GuestDef,
    World,
    build,
    cleanup,
    fix_disk,
    fix_nvram,
    spec_text,
)
from tests.hostile.helpers import Canaries

#: the spec's shutdown_timeout in every chaos guest (world.spec_text) and the
#: --timeout the driver gives run -- CMD
GRACEFUL = 1.0
RUN_CMD_TIMEOUT = 8.0
#: svirt exec/cp --timeout
AGENT_TIMEOUT = 5.0
#: the stand-in powers off by itself within this (``poweroff=`` 300-3000 ms)
POWEROFF = 3.0
#: added to every documented bound: a loaded 2-core machine, the CLI's own
#: start (Python imports) and its exit
MARGIN = 10.0
#: the CLI's way to svirt's supervisor (README "Every wait has a bound"):
#: connecting (CONNECT_SECONDS), and starting it when none runs (START_SECONDS)
_TO_SUPERVISOR = client.CONNECT_SECONDS + client.START_SECONDS
_LADDER = supervisor.HARD_SECONDS + supervisor.SIGTERM_SECONDS + supervisor.SIGKILL_SECONDS

#: seconds each verb must end within: the bound svirt documents for it (README
#: "Every wait has a bound"; service.client.answer_bound is the CLI's side of
#: it) plus MARGIN.  A verb svirt documents no bound for (list, gc, explain,
#: check: they run in the CLI, no wait on the guest) gets the answer bound of
#: "others" (ANSWER_SECONDS), gc a release's (RELEASE_SECONDS) on top
BOUNDS: dict[str, float] = {
    "start": client.answer_bound({"op": "start", "wait_for": "SVIRT-READY", "timeout": 5})
    + _TO_SUPERVISOR + MARGIN,
    # in the launcher: a launch (the supervisor's LAUNCH_SECONDS), the guest's
    # own poweroff, the ladder should a step of it stall, the release
    "run": client.LAUNCH_SECONDS + POWEROFF + GRACEFUL + _LADDER + client.RELEASE_SECONDS
    + MARGIN,
    "run_cmd": client.LAUNCH_SECONDS + RUN_CMD_TIMEOUT + GRACEFUL + _LADDER
    + client.RELEASE_SECONDS + MARGIN,
    # stop without --timeout: the spec's shutdown_timeout is the graceful time
    "stop": client.answer_bound({"op": "stop", "timeout": GRACEFUL}) + _TO_SUPERVISOR
    + MARGIN,
    # a status (the names), then every stop at once
    "stop_all": client.ANSWER_SECONDS + client.answer_bound({"op": "stop", "timeout": GRACEFUL})
    + _TO_SUPERVISOR + MARGIN,
    "kill": client.answer_bound({"op": "kill"}) + _TO_SUPERVISOR + MARGIN,
    "restart": client.answer_bound({"op": "restart", "timeout": GRACEFUL}) + _TO_SUPERVISOR
    + MARGIN,
    "status": client.ANSWER_SECONDS + _TO_SUPERVISOR + MARGIN,
    "logs": client.ANSWER_SECONDS + MARGIN,
    "console": client.ANSWER_SECONDS + _TO_SUPERVISOR + MARGIN,
    "list": client.ANSWER_SECONDS + MARGIN,
    "gc": client.ANSWER_SECONDS + client.RELEASE_SECONDS + MARGIN,
    "explain": client.ANSWER_SECONDS + MARGIN,
    "check": client.ANSWER_SECONDS + MARGIN,
    "kill_supervisor": 5.0,
    "kill_launcher": 5.0,  # a SIGKILL (after a SIGTERM and at most 1 s)
    # the agent: one deadline (--timeout) for the lock, the connect and the exchange
    "exec": AGENT_TIMEOUT + MARGIN,
    "cp": AGENT_TIMEOUT + MARGIN,
    "image_info": 10.0 + MARGIN,  # a few KiB read, whatever the disk claims
}
WEIGHTS: dict[str, float] = {
    "start": 3.0, "run": 1.2, "run_cmd": 1.0, "stop": 2.0, "stop_all": 0.2, "kill": 0.8,
    "restart": 0.8, "status": 1.5, "logs": 1.5, "console": 0.8, "list": 1.5, "gc": 1.2,
    "explain": 0.8, "check": 0.4, "kill_supervisor": 0.5, "kill_launcher": 0.5,
    "exec": 1.0, "cp": 0.5,
    "image_info": 0.5,
}
#: svirt exec and cp: the command's status, or podman's 125/126/127
AGENT_EXIT_CODES = frozenset({125, 126, 127})
#: exit codes svirt documents (0 poweroff, 1 error, 2 bad spec, 3 panic,
#: 4 crash, 5 forced by the ladder)
EXIT_CODES = frozenset({0, 1, 2, 3, 4, 5})
MAX_BACKGROUND = 2  # `svirt run` launchers alive at once


@dataclass
class Step:
    n: int
    verb: str
    guest: str | None
    argv: list[str]
    primitives: list[str] = field(default_factory=list)
    rc: int | None = None
    seconds: float = 0.0
    note: str = ""

    def short(self) -> str:
        prims = f" [{','.join(self.primitives)}]" if self.primitives else ""
        rc = "bg" if self.rc is None else self.rc
        return (f"#{self.n} {self.verb} {self.guest or ''}{prims} -> {rc} "
                f"({self.seconds:.1f}s){' ' + self.note if self.note else ''}")


@dataclass
class Background:
    step: Step
    proc: subprocess.Popen[bytes]
    started: float
    out: Path
    err: Path
    guest: str
    killed: bool = False


class Violation(Exception):
    pass


@dataclass
class Result:
    seed: int
    steps: int
    violations: list[dict[str, Any]]
    seconds: float
    skipped: dict[str, str]
    verbs: dict[str, int]
    #: each verb's slowest run (seconds), to set against BOUNDS
    slowest: dict[str, float] = field(default_factory=dict)
    #: how many guest runs drew each primitive
    drawn: dict[str, int] = field(default_factory=dict)


class Chaos:
    def __init__(self, seed: int, steps: int, *, include_open: bool = False,
                 keep_going: bool = False, log: Any = None, verbose: bool = False,
                 only: list[str] | None = None, budget: float | None = None) -> None:
        self.budget = budget
        self.verbose = verbose
        self.only = only  # draw from these primitives only (and at least one)
        self.seed = seed
        self.steps = steps
        self.include_open = include_open
        self.keep_going = keep_going
        self.rnd = random.Random(seed)  # noqa: S311 - reproducible fuzzing
        self.history: list[Step] = []
        self.violations: list[dict[str, Any]] = []
        self.background: list[Background] = []
        self.verbs: dict[str, int] = {}
        self.slowest: dict[str, float] = {}
        self.drawn: dict[str, int] = {}
        self.log_seen: dict[str, int] = {}  # how far svirtd.log was read
        self.log = log or sys.stderr
        self.world: World
        self.canaries: Canaries
        self.skipped = {k: v for k, v in catalogue.KNOWN_OPEN.items()
                        if catalogue.open_reason(k, include_open)}

    # ----------------------------------------------------------- lifetime
    def run(self) -> Result:
        started = time.monotonic()
        self.world = build()
        self._say(f"chaos: seed {self.seed}, {self.steps} steps, world {self.world.base}")
        for name, why in sorted(self.skipped.items()):
            self._say(f"chaos: left out (known open): {name}: {why}")
        self.canaries = Canaries(self.world.canary_base, [])
        self.canaries.write_targets(extra_files=[self.world.state / "lock"],
                                    extra_dirs=[self.world.state, self.world.run_root])
        self.canaries.baseline()
        done = 0
        try:
            for n in range(1, self.steps + 1):
                if self.budget is not None and time.monotonic() - started > self.budget:
                    self._say(f"chaos: budget of {self.budget:g} s spent after {n - 1} steps")
                    break
                self._step(n)
                done = n
        except Violation:
            pass
        except KeyboardInterrupt:
            self._say("chaos: interrupted")
        finally:
            self._teardown()
        return Result(self.seed, done, self.violations, time.monotonic() - started,
                      self.skipped, self.verbs, self.slowest, self.drawn)

    def _teardown(self) -> None:
        """Stop everything, then the final checks: after the last gc nothing of
        any guest is left."""
        step = Step(len(self.history) + 1, "teardown", None, [])
        try:
            for bg in self.background:
                with contextlib.suppress(OSError):
                    bg.proc.send_signal(signal.SIGTERM)
            for bg in self.background:
                try:
                    bg.proc.wait(BOUNDS["run"])
                except subprocess.TimeoutExpired:
                    self._violate(step, f"teardown: svirt run of {bg.guest} ignored SIGTERM "
                                  f"for {BOUNDS['run']:g} s", raise_=False)
                    bg.proc.kill()
                    bg.proc.wait()
            self._cli(step, "stop_all", ["stop", "--all", "--force"], raise_=False)
            self._cli(step, "gc", ["gc"], raise_=False)
            time.sleep(0.5)
            self._cli(step, "gc", ["gc"], raise_=False)
            self._invariants(step, after_gc=True, raise_=False)
        finally:
            from tests.hostile.helpers import kill_uid

            for uid in invariants.live_uids(self.world.uid_range):
                kill_uid(uid)
            for pid in invariants.supervisor_pids(self.world):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self.canaries.close()
            if os.environ.get("SVIRT_CHAOS_KEEP"):
                self._say(f"chaos: kept {self.world.base}, {self.world.state}")
            else:
                with contextlib.suppress(Exception):
                    subprocess.run([self.world.svirt, "gc"], env=self.world.env, timeout=60,
                                   capture_output=True, check=False)
                cleanup(self.world)

    def _say(self, text: str) -> None:
        print(text, file=self.log, flush=True)

    # -------------------------------------------------------------- steps
    def _step(self, n: int) -> None:
        self._reap_background(n)
        verbs = list(WEIGHTS)
        verb = self.rnd.choices(verbs, [WEIGHTS[v] for v in verbs])[0]
        g = self.rnd.choice(self.world.guests)
        if verb in ("start", "run", "run_cmd") and self.rnd.random() < 0.8:
            # mostly a guest that is not running: a refused launch ("already
            # running") performs none of the primitives it drew
            idle = [x for x in self.world.guests if not self._has_record(x.name)]
            g = self.rnd.choice(idle) if idle else g
        self.verbs[verb] = self.verbs.get(verb, 0) + 1
        getattr(self, f"_verb_{verb}")(n, g)
        if self.verbose:
            self._say(self.history[-1].short())
        self._invariants(self.history[-1], after_gc=verb == "gc")

    def _draw(self, g: GuestDef, n: int, *, run: bool) -> tuple[list[str], str]:
        """The primitives this run of ``g`` performs, and its command-line words."""
        pool = catalogue.drawable(g.shape, g.jail, self.include_open)
        if run:  # svirt run: its console output is ours, the rest the same
            pool = [p for p in pool if p.name != "qmp_noaccept"]
        if self.only is not None:
            pool = [p for p in pool if p.name in self.only]
        k = self.rnd.choice([1, 1, 2] if self.only else [0, 0, 1, 1, 2, 3])
        prims = sorted(p.name for p in self.rnd.sample(pool, min(k, len(pool))))
        for name in prims:
            self.drawn[name] = self.drawn.get(name, 0) + 1
        targets = ":".join(str(p) for p in self.canaries.files + [self.world.state / "lock"])
        words = (f"chaos={','.join(prims)} seed={self.seed * 100_003 + n} targets={targets} "
                 f"fifo={self.world.fifo}")
        return prims, words

    def _spec(self, g: GuestDef, n: int, words: str) -> Path:
        restart = self.rnd.choice(["no", "no", "on-failure", "always"])
        path = self.world.base / f"{g.name}.toml"
        if not self._has_record(g.name) and self.rnd.random() < 0.7:
            fix_disk(g)  # else: whatever the last run left in it
        if not self._has_record(g.name):
            fix_nvram(g)  # a store the guest broke is refused, rightly: a new one
        path.write_text(spec_text(self.world, g, words, restart=restart))
        path.chmod(0o644)
        return path

    def _has_record(self, name: str) -> bool:
        return (self.world.state / "guests" / f"{name}.json").exists()

    def _verb_start(self, n: int, g: GuestDef) -> None:
        prims, words = self._draw(g, n, run=False)
        spec = self._spec(g, n, words)
        argv = ["start", str(spec)]
        if self.rnd.random() < 0.4:
            argv += ["--wait-for", "SVIRT-READY", "--timeout", "5"]
        self._cli(Step(n, "start", g.name, argv, prims), "start", argv)

    def _verb_run(self, n: int, g: GuestDef) -> None:
        alive = [b for b in self.background if b.proc.poll() is None]
        if len(alive) >= MAX_BACKGROUND or any(b.guest == g.name for b in alive):
            return self._verb_status(n, g)
        prims, words = self._draw(g, n, run=True)
        words += f" poweroff={self.rnd.randrange(300, 3000)}"
        spec = self._spec(g, n, words)
        argv = ["run", str(spec)]
        step = Step(n, "run", g.name, argv, prims)
        out = self.world.base / "out" / f"{n}.out"
        err = self.world.base / "out" / f"{n}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen([self.world.svirt, *argv], env=self.world.env,  # noqa: S603
                                    stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                    start_new_session=True)
        self.background.append(Background(step, proc, time.monotonic(), out, err, g.name))
        self.history.append(step)
        time.sleep(0.3)  # let it start: the next steps meet it running

    def _verb_run_cmd(self, n: int, g: GuestDef) -> None:
        prims, words = self._draw(g, n, run=True)
        spec = self._spec(g, n, words)
        argv = ["run", "--timeout", "8", str(spec), "--", "echo", "chaos-ok"]
        step = Step(n, "run_cmd", g.name, argv, prims)
        rc, out, _err = self._cli(step, "run_cmd", argv)
        if rc == 0 and out != b"chaos-ok\n":
            self._violate(step, f"run -- CMD: exit 0 but the output is not the command's: "
                          f"{out[:300]!r}")

    def _verb_stop(self, n: int, g: GuestDef) -> None:
        argv = ["stop", g.name]
        r = self.rnd.random()
        if r < 0.3:
            argv += ["--timeout", "1"]
        elif r < 0.4:
            argv.append("--force")
        self._cli(Step(n, "stop", g.name, argv), "stop", argv)

    def _verb_stop_all(self, n: int, g: GuestDef) -> None:
        argv = ["stop", "--all", "--timeout", "1"]
        self._cli(Step(n, "stop_all", None, argv), "stop_all", argv)

    def _verb_kill(self, n: int, g: GuestDef) -> None:
        argv = ["kill", g.name]
        self._cli(Step(n, "kill", g.name, argv), "kill", argv)

    def _verb_restart(self, n: int, g: GuestDef) -> None:
        argv = ["restart", g.name, "--timeout", "1"]
        self._cli(Step(n, "restart", g.name, argv), "restart", argv)

    def _verb_status(self, n: int, g: GuestDef) -> None:
        argv = ["status"] + self.rnd.choice([[], [g.name], ["--json"], [g.name, "--json"]])
        self._cli(Step(n, "status", g.name, argv), "status", argv)

    def _verb_logs(self, n: int, g: GuestDef) -> None:
        argv = ["logs", g.name, "-n", str(self.rnd.choice([5, 50, 1000]))]
        self._cli(Step(n, "logs", g.name, argv), "logs", argv)

    def _verb_console(self, n: int, g: GuestDef) -> None:
        argv = ["console", g.name] + (["--read-only"] if self.rnd.random() < 0.4 else [])
        self._cli(Step(n, "console", g.name, argv), "console", argv,
                  stdin=b"echo typed\n\x1d")

    def _verb_list(self, n: int, g: GuestDef) -> None:
        argv = ["list"] + self.rnd.choice([[], ["-Z"], ["--json"], ["--usage"]])
        self._cli(Step(n, "list", None, argv), "list", argv)

    def _verb_gc(self, n: int, g: GuestDef) -> None:
        self._cli(Step(n, "gc", None, ["gc"]), "gc", ["gc"])

    def _verb_explain(self, n: int, g: GuestDef) -> None:
        argv = ["explain", "--json", "--since", "10m"]
        self._cli(Step(n, "explain", None, argv), "explain", argv)

    def _verb_check(self, n: int, g: GuestDef) -> None:
        spec = self.world.base / f"{g.name}.toml"
        if not spec.exists():
            return self._verb_list(n, g)
        argv = ["check", str(spec)]
        self._cli(Step(n, "check", g.name, argv), "check", argv)

    def _verb_exec(self, n: int, g: GuestDef) -> None:
        argv = ["exec", "--timeout", f"{AGENT_TIMEOUT:g}", g.name, "--", "echo", "chaos ok"]
        step = Step(n, "exec", g.name, argv)
        rc, out, err = self._cli(step, "exec", argv)
        self._check_agent_verb(step, rc, err)
        if rc == 0 and out not in (b"chaos ok\n", hypervisor.AGENT_ESCAPES):
            self._violate(step, f"exec: exit 0 but not the command's output: {out[:300]!r}")

    def _verb_cp(self, n: int, g: GuestDef) -> None:
        dst = self.world.base / "out" / f"{n}.cp"
        argv = ["cp", "--timeout", f"{AGENT_TIMEOUT:g}", f"{g.name}:/etc/hostname", str(dst)]
        step = Step(n, "cp", g.name, argv)
        rc, _out, err = self._cli(step, "cp", argv)
        self._check_agent_verb(step, rc, err)
        if rc != 0 and dst.exists():
            self._violate(step, "cp: failed, but left its half-written file")

    def _check_agent_verb(self, step: Step, rc: int | None, err: bytes) -> None:
        """A failure is one error line (and a hint), no terminal order in it."""
        lines = err.splitlines()
        if rc == 125 and (len([ln for ln in lines if ln.startswith(b"svirt: error:")]) != 1
                          or len(lines) > 2 or b"\x1b" in err):
            self._violate(step, f"{step.verb}: not one escaped error line: {err[:600]!r}")

    def _verb_image_info(self, n: int, g: GuestDef) -> None:
        """What the guest wrote to its disk, read back by an admin: one line
        or a description, within the bound, never a traceback."""
        argv = ["image", "info", *(["--json"] if self.rnd.random() < 0.5 else []), str(g.disk)]
        rc, _out, err = self._cli(Step(n, "image_info", g.name, argv), "image_info", argv)
        if rc == 1 and len(err.splitlines()) > 2:
            self._violate(self.history[-1], f"image info: {len(err.splitlines())} lines on "
                          "stderr (one error line and a hint at most)")

    def _verb_kill_supervisor(self, n: int, g: GuestDef) -> None:
        pids = invariants.supervisor_pids(self.world)
        step = Step(n, "kill_supervisor", None, [], note=f"pids {pids}")
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.history.append(step)

    def _verb_kill_launcher(self, n: int, g: GuestDef) -> None:
        alive = [b for b in self.background if b.proc.poll() is None]
        if not alive:
            # none running: start one (a guest powers off within 3 s, so one
            # is seldom still there when this verb is drawn) and let it boot
            self._verb_run(n, g)
            time.sleep(self.rnd.uniform(0.0, 0.5))
            alive = [b for b in self.background if b.proc.poll() is None]
            if not alive:
                return None
        bg = self.rnd.choice(alive)
        bg.killed = True
        note = f"svirt run of step #{bg.step.n}"
        if self.rnd.random() < 0.5:
            # SIGTERM first: the launcher starts the shutdown ladder (an
            # mconsole or QMP exchange, its reply socket in RUN/ctl), and is
            # SIGKILLed in the middle of it (the first 1 s of its ladder)
            delay = self.rnd.uniform(0.05, 1.0)
            with contextlib.suppress(OSError):
                bg.proc.send_signal(signal.SIGTERM)
            time.sleep(delay)
            note += f", SIGKILL {delay:.2f} s into its ladder"
        bg.proc.kill()
        bg.proc.wait()
        self.history.append(Step(n, "kill_launcher", bg.guest, [], note=note))

    # ---------------------------------------------------------- commands
    def _cli(self, step: Step, verb: str, argv: list[str], *, stdin: bytes = b"",
             raise_: bool = True) -> tuple[int | None, bytes, bytes]:
        if step not in self.history:
            self.history.append(step)
        bound = BOUNDS[verb]
        started = time.monotonic()
        proc = subprocess.Popen([self.world.svirt, *argv], env=self.world.env,  # noqa: S603
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(stdin, timeout=bound)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            step.seconds = time.monotonic() - started
            step.rc = proc.returncode
            self._violate(step, f"bound: svirt {' '.join(argv)} did not end within {bound:g} s "
                          f"(stderr: {err[-600:]!r})", raise_=raise_)
            return None, out, err
        step.seconds = time.monotonic() - started
        step.rc = proc.returncode
        self._timed(verb, step.seconds)
        if proc.returncode:
            lines = err.decode(errors="replace").strip().splitlines()
            step.note = next((ln for ln in lines if "error" in ln), lines[-1] if lines else "")[
                :200]
        self._check_command(step, verb, proc.returncode, out, err, raise_)
        return proc.returncode, out, err

    def _check_command(self, step: Step, verb: str, rc: int, out: bytes, err: bytes,
                       raise_: bool = True) -> None:
        problems = []
        if rc not in EXIT_CODES and not (verb in ("exec", "cp") and rc in AGENT_EXIT_CODES):
            problems.append(f"exit code {rc} (svirt documents {sorted(EXIT_CODES)})")
        if b"Traceback (most recent call last)" in err:
            problems.append("a Python traceback on stderr")
        if b"internal error" in err:
            problems.append("an internal error (a bug, by svirt's own words)")
        if problems:
            self._violate(step, f"command: svirt {' '.join(step.argv)}: " + "; ".join(problems)
                          + f"\nstderr: {err[-1500:].decode(errors='replace')}", raise_=raise_)
        for check, name in ((invariants.check_terminal_safe, "terminal_safe"),
                            (invariants.check_explain, "explain_audit_only")):
            if catalogue.open_reason(f"inv:{name}", self.include_open):
                continue
            for v in check(verb, out):
                self._violate(step, v, raise_=raise_)

    def _timed(self, verb: str, seconds: float) -> None:
        self.slowest[verb] = round(max(self.slowest.get(verb, 0.0), seconds), 1)

    def _reap_background(self, n: int) -> None:
        now = time.monotonic()
        for bg in list(self.background):
            rc = bg.proc.poll()
            if rc is None:
                if now - bg.started > BOUNDS["run"]:
                    bg.proc.kill()
                    bg.proc.wait()
                    self.background.remove(bg)
                    bg.step.seconds = now - bg.started
                    self._violate(bg.step, f"bound: svirt run of {bg.guest} (step #{bg.step.n})"
                                  f" did not end within {BOUNDS['run']:g} s")
                continue
            self.background.remove(bg)
            bg.step.rc = rc
            bg.step.seconds = now - bg.started
            self._timed("run", bg.step.seconds)
            if bg.killed:
                continue
            self._check_command(bg.step, "run", rc, bg.out.read_bytes()[-4096:],
                                bg.err.read_bytes())
            for v in invariants.check_breaches([(f"svirt run output #{bg.step.n}",
                                                 bg.out.read_bytes())]):
                self._violate(bg.step, v)

    # ---------------------------------------------------------- invariants
    def _invariants(self, step: Step, *, after_gc: bool, raise_: bool = True) -> None:
        w = self.world
        snap, problems = invariants.read_registry(w)
        found = list(problems)
        found += invariants.check_registry(snap, after_gc)
        found += invariants.check_canaries(self.canaries)
        found += invariants.check_registry_files(
            w, snap, ctl_leftovers=not catalogue.open_reason("inv:ctl_leftovers",
                                                             self.include_open),
            after_gc=after_gc)
        found += invariants.check_free_space(w)
        found += invariants.check_supervisor_fds(w)
        found += invariants.check_supervisor_log(w, self.log_seen)
        found += invariants.check_nvram_restored(w)

        def records() -> list[dict[str, Any]]:
            return invariants.read_registry(w)[0].records

        found += invariants.check_processes(w, records, set)
        if not catalogue.open_reason("inv:storage_bounded", self.include_open):
            found += invariants.check_storage_bounded(w, snap)
        if not catalogue.open_reason("inv:clean_env", self.include_open):
            found += invariants.check_clean_env(snap)
        logs = w.state / "logs"
        if logs.is_dir():
            texts = []
            for p in logs.glob("*.log*"):
                with contextlib.suppress(OSError):
                    texts.append((str(p), p.read_bytes()))
            found += invariants.check_breaches(texts)
        for v in dict.fromkeys(found):
            self._violate(step, v, raise_=raise_)

    def _violate(self, step: Step, evidence: str, raise_: bool = True) -> None:
        if any(v["evidence"] == evidence for v in self.violations):
            return  # the same thing seen again: once is enough
        record = {"seed": self.seed, "step": step.n, "verb": step.verb, "guest": step.guest,
                  "evidence": evidence, "history": [s.short() for s in self.history[-30:]]}
        self.violations.append(record)
        self._say(format_violation(record))
        if raise_ and not self.keep_going:
            raise Violation(evidence)


def format_violation(v: dict[str, Any]) -> str:
    return (f"chaos VIOLATION (seed {v['seed']}, step {v['step']}, {v['verb']} "
            f"{v['guest'] or ''}):\n  {v['evidence']}\n  replay: SVIRT_CHAOS_SEED={v['seed']} "
            f"python -m tests.hostile.chaos --steps {v['step']}\n  history:\n    "
            + "\n    ".join(v["history"]))


def summary(result: Result) -> str:
    verbs = ", ".join(f"{k} {v}" for k, v in sorted(result.verbs.items()))
    slowest = ", ".join(f"{k} {v:g}/{BOUNDS[k]:g}" for k, v in sorted(result.slowest.items()))
    return (f"chaos summary: seed {result.seed}, steps {result.steps}, violations "
            f"{len(result.violations)}, time {result.seconds:.1f} s\n  verbs: {verbs}\n"
            f"  slowest/bound (s): {slowest}\n"
            f"  primitives drawn: {', '.join(f'{k} {v}' for k, v in sorted(result.drawn.items()))}")


def dump(result: Result, path: Path) -> None:
    path.write_text(json.dumps({"seed": result.seed, "steps": result.steps,
                                "seconds": round(result.seconds, 1),
                                "violations": result.violations, "skipped": result.skipped,
                                "verbs": result.verbs, "slowest": result.slowest,
                                "drawn": result.drawn,
                                "bounds": BOUNDS}, indent=1))
