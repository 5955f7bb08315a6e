"""svirt under SMACK: the lab image booted under User-Mode-Linux with
``security=smack``, in one boot.

Debian's x86 kernels are built without SMACK; its User-Mode-Linux kernel
(the host's ``user-mode-linux`` package) has it.  ``image.run_lab(...,
lsm="smack")`` boots the same root image under that kernel; ``tests/lab/
inside/smack_main.py`` runs as root with the floor label, security model
"auto".  The guests are QEMU-TCG guests (UML does not run inside UML):

1. ``setup``: the product's probe (``svirt.host.probe_smack``) sees SMACK;
2. ``boot``: three guests, every process of each (tini, the hypervisor)
   labelled ``svirt-<slot>``, distinct, stacked with DAC; their disks and logs
   carry the label, the read-only disk the floor ``_``, the shared one
   ``svirt-shared`` with a rule loaded for each guest that shares it;
3. ``matrix``: a probe with each guest's label (taken at exec like the
   hypervisor) against every guest: as the guest itself, and with the
   *other* guest's uid, where only SMACK stands in the way;
4. ``explain``: real denials (cross-guest; a mislabelled disk) named by
   ``svirt explain --json``; ``conflict``: a disk labelled with a running
   guest's label is refused; ``jail_attack``: the hostile stand-in in its jail;
5. ``restore_stop`` / ``kill_gc``: labels, owners, modes and ACLs back and
   no rule left, after a stop and after SIGKILL of the launcher + ``svirt gc``;
6. ``static`` (a label from the spec) and ``detached`` (console FIFOs and a
   QMP socket made by the launcher) work; ``plan``: ``svirt check --json``
   shows the label, uid and disk label the launch then gives; ``network``: a
   QEMU guest's tap fd works under its label;
7. no SMACK denial outside the probes' attacks.
"""

from __future__ import annotations

import pytest

from .image import skip_reason
from .passes import Passes, PassRun
from .test_lab_svirt import ACTIONS, format_matrix

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def lab(lab_passes: Passes) -> PassRun:
    if reason := skip_reason(lsm="smack"):
        pytest.skip(reason)
    return PassRun.of("smack", lab_passes)


def test_lab_setup(lab: PassRun) -> None:
    c = lab.check("setup")
    assert c["ok"], lab.explain("setup")
    assert c["smack"] is True and "smack" in lab.result.lsms.split(","), c
    assert c["launcher_label"] == "_", c
    assert c["rules_before"] == [], c


def test_guests_boot_labelled(lab: PassRun) -> None:
    """2: every process of each guest has its own svirt-N label, + DAC; its
    objects carry it; one shared-disk rule per sharing guest."""
    c = lab.check("boot")
    assert c["ok"], lab.explain("boot")
    guests = c["guests"]
    labels = {g["label"] for g in guests.values()}
    assert len(labels) == 3 and all(lab_.startswith("svirt-") for lab_ in labels), labels
    for name, g in guests.items():
        assert g["drivers"] == ["smack", "dac"], g
        assert len(g["labels"]) >= 2 and set(g["labels"].values()) == {g["label"]}, g
        assert g["uid"] >= 1_000_000, g
        files = g["files"]
        assert files[f"/var/lib/svirt-lab/images/{name}.img"] == g["label"], files
        assert files["/var/lib/svirt-lab/images/shared.img"] == "svirt-shared", files
        assert files["/var/lib/svirt-lab/images/readonly.img"] == "_", files
        print(f"{name}: uid {g['uid']} {g['labels']}")
    sharing = {f"{guests[n]['label']} svirt-shared rwa" for n in ("s1", "s2")}
    assert sorted(c["rules"]) == sorted(sharing), c["rules"]


def test_isolation_matrix(lab: PassRun) -> None:
    """3: A's label reaches all of its own guest and nothing of B's, as A and
    with B's uid; every refusal with B's uid is SMACK's, logged."""
    c = lab.check("matrix")
    assert c["ok"], lab.explain("matrix")
    cells = c["cells"]
    print(format_matrix(cells, "guest"))
    print(format_matrix(cells, "smack-only"))
    problems = []
    for x in cells:
        results = x["results"]
        where = f"{x['phase']} ({x['label']} uid {x['uid']})"
        if x["from"] == x["to"]:
            if set(results) != set(ACTIONS) or set(results.values()) != {"ok"}:
                problems.append(f"{where}: own resources {results}")
            continue
        # signal 0 is an existence test SMACK does not mediate (smack_task_kill);
        # DAC refuses it with the guest's own uid
        reached = {a: v for a, v in results.items()
                   if v == "ok" and not (a == "signull" and x["mode"] == "smack-only")}
        if reached:
            problems.append(f"{where}: reached {reached}")
        if x["mode"] == "smack-only":
            mine = [d for d in x["denials"] if f'subject="{x["label"]}"' in d]
            if len(mine) < 5:
                problems.append(f"{where}: refused without SMACK denials: {x['denials']}")
    assert not problems, "\n".join(problems)


def test_explain_names_guests_and_files(lab: PassRun) -> None:
    """svirt explain on real SMACK denials: s1 going for s2's disk is
    cross-guest (s1 denied, s2's object); s1's own disk with the floor label is
    mislabelled (label found ``_``, label svirt gives s1's)."""
    c = lab.check("explain")
    assert c["ok"], lab.explain("explain")
    for f in c["cross"][:1] + c["mislabelled"][:1]:
        print(f"{f['classification']}: {f['summary']}")
    assert lab.phase_denials.get("explain"), "no real denial was provoked"


def test_jail_attack(lab: PassRun) -> None:
    """The hostile stand-in in its jail with its own label: every attempt on
    the host and on the victim fails; no denial but the attacker's."""
    c = lab.check("jail_attack")
    assert c["ok"], lab.explain("jail_attack") + "\n" + c.get("table", "")
    print(c["table"])
    print(f"labels {c['labels']}, attacker uid {c['uid']}")


def test_conflict_refused(lab: PassRun) -> None:
    """4: a disk carrying a running guest's label is refused, not relabelled."""
    c = lab.check("conflict")
    assert c["ok"], lab.explain("conflict")
    assert "the label of a running process" in c["error"], c


def test_restored_after_stop(lab: PassRun) -> None:
    """5a: labels, owners, modes, ACLs back; no svirt rule; registry empty."""
    assert lab.check("stop")["ok"], lab.explain("stop")
    c = lab.check("restore_stop")
    assert c["ok"], lab.explain("restore_stop")
    assert c["diff"] == [] and c["rules"] == [] and c["leftovers"] == [], c


def test_restored_after_launcher_kill_and_gc(lab: PassRun) -> None:
    """5b: SIGKILL of the launcher leaves the rule loaded; svirt gc removes it."""
    c = lab.check("kill_gc")
    assert c["ok"], lab.explain("kill_gc")
    assert c["rules_during"] and c["rules_after_gc"] == [], c
    assert "SMACK rule" in c["gc"]["stdout"], c["gc"]
    print(f"gc:\n{c['gc']['stdout']}")


def test_static_label(lab: PassRun) -> None:
    c = lab.check("static")
    assert c["ok"], lab.explain("static")


def test_detached_guest_labelled(lab: PassRun) -> None:
    c = lab.check("detached")
    assert c["ok"], lab.explain("detached")
    assert c["label"].startswith("svirt-"), c
    assert c["fds"]["3"].endswith("/console.in") and c["fds"]["1"].endswith("/console.out"), c


def test_tap_fd_works_labelled(lab: PassRun) -> None:
    """QEMU keeps the tap fd the launcher opened across the exec into its label."""
    c = lab.check("network")
    assert c["ok"], lab.explain("network")


def test_check_shows_the_real_plan(lab: PassRun) -> None:
    """svirt check --json: the SMACK label, uid and disk label it plans are the
    ones the launch gives."""
    c = lab.check("plan")
    assert c["ok"], lab.explain("plan")
    print(f"planned {c['process']}, launched as {c['label']} uid {c['uid']}")


def test_no_denial_on_normal_paths(lab: PassRun) -> None:
    """7: SMACK denials only where a probe attacks (the matrix)."""
    attacks = ("explain", "jail_attack:attack")
    normal = {p: d for p, d in lab.phase_denials.items()
              if d and not p.startswith("matrix:") and p not in attacks}
    assert not normal, "\n".join(f"{p}:\n  " + "\n  ".join(d) for p, d in normal.items())


def test_summary(lab: PassRun) -> None:
    c = lab.check("summary")
    assert c["ok"], {n: x.get("error") for n, x in lab.checks.items() if not x.get("ok")}
    print(f"smack checks {c['seconds']}s, lab pass {lab.result.seconds:.1f}s")
