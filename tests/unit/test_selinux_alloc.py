"""SELinux contexts, MLS ranges and category-pair allocation (no SELinux needed)."""

from __future__ import annotations

import random
import time
import uuid as uuidlib
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import pytest

import svirt.security.selinux as sel
from svirt.errors import SecurityError, SlotsExhausted
from svirt.procfs import LiveProcesses
from svirt.security.base import Label
from svirt.security.selinux import Context, SELinuxDriver, pair_of, parse_range, pick_pair
from svirt.spec import Accel, Backend, GuestSpec, Security

LAUNCHER = "system_u:system_r:unconfined_t:s0-s0:c0.c1023"
DOMAIN = "system_u:system_r:svirt_t:s0"
IMAGE = "system_u:object_r:svirt_image_t:s0"
CONTENT = "system_u:object_r:virt_content_t:s0"


class FakeLive(LiveProcesses):
    """A process table with fixed contexts (the real one scans /proc)."""

    def __init__(self, contexts: Iterable[str] = (), uids: Iterable[int] = ()) -> None:
        super().__init__()
        self._fixed_contexts = set(contexts)
        self._fixed_uids = set(uids)

    @property
    def contexts(self) -> set[str]:
        return self._fixed_contexts

    @property
    def uids(self) -> set[int]:
        return self._fixed_uids


def seeded(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311 - reproducible allocations, not secrets


def driver(launcher: str = LAUNCHER) -> SELinuxDriver:
    return SELinuxDriver(launcher_context=launcher, domain_context=DOMAIN, image_context=IMAGE,
                         content_context=CONTENT, enforcing=False)


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinuz"
    k.write_bytes(b"k")
    return k


def make_spec(kernel: Path, **kwargs: object) -> GuestSpec:
    args: dict[str, object] = {"name": "g", "kernel": kernel, "accel": Accel.KVM,
                               "uuid": uuidlib.UUID(int=7)}
    args.update(kwargs)
    return GuestSpec(**args)  # type: ignore[arg-type]


def selinux_label(pair: tuple[int, int], sens: str = "s0") -> Label:
    level = f"{sens}:c{pair[0]},c{pair[1]}"
    return Label("selinux", f"system_u:system_r:svirt_t:{level}",
                 f"system_u:object_r:svirt_image_t:{level}", CONTENT, IMAGE)


# ------------------------------------------------------------------ Context


def test_context_parse_with_range() -> None:
    ctx = Context.parse(LAUNCHER)
    assert ctx == Context("system_u", "system_r", "unconfined_t", "s0-s0:c0.c1023")
    assert str(ctx) == LAUNCHER


def test_context_parse_strips_nul_and_newline() -> None:
    assert Context.parse("u:r:t:s0:c1,c2\0") == Context("u", "r", "t", "s0:c1,c2")
    assert Context.parse("u:r:t:s0\n").level == "s0"


def test_context_parse_without_level_defaults_to_s0() -> None:
    assert Context.parse("u:r:t") == Context("u", "r", "t", "s0")


def test_context_with_type_and_level() -> None:
    ctx = Context.parse(DOMAIN)
    assert str(ctx.with_type("svirt_tcg_t")) == "system_u:system_r:svirt_tcg_t:s0"
    assert str(ctx.with_level("s0:c3,c9")) == "system_u:system_r:svirt_t:s0:c3,c9"
    assert ctx == Context.parse(DOMAIN)  # frozen: the originals are unchanged


@pytest.mark.parametrize("text", ["", "unconfined_t", "user_u:role_r", "a:b\0"])
def test_context_parse_rejects(text: str) -> None:
    with pytest.raises(SecurityError) as info:
        Context.parse(text)
    assert "is not an SELinux context" in info.value.message


# ---------------------------------------------------------------- parse_range


def test_parse_range_s0() -> None:
    assert parse_range("s0") == ("s0", "s0", set())


def test_parse_range_full_categories() -> None:
    low, high, cats = parse_range("s0-s0:c0.c1023")
    assert (low, high) == ("s0", "s0")
    assert len(cats) == 1024
    assert cats == set(range(1024))


def test_parse_range_two_sensitivities() -> None:
    low, high, cats = parse_range("s2-s3:c0.c255")
    assert (low, high) == ("s2", "s3")
    assert cats == set(range(256))


def test_parse_range_list_of_ranges() -> None:
    assert parse_range("s0:c0.c3,c7") == ("s0", "s0", {0, 1, 2, 3, 7})


def test_parse_range_low_categories_are_ignored() -> None:
    # what a guest may be given is the high level's categories
    assert parse_range("s0:c5-s0:c1,c2") == ("s0", "s0", {1, 2})


@pytest.mark.parametrize(
    "level",
    ["", "x0", "s0-x1", "s", "s0:c5.c2", "s0:c1024", "s0-s0:c0.c1024", "s0:cat1", "s0:c1.",
     "s0:1,2", "s0:c1,,c2", "s0-s0:c0.c3,c-1"],
)
def test_parse_range_rejects(level: str) -> None:
    with pytest.raises(SecurityError):
        parse_range(level)


# ------------------------------------------------------------------- pair_of


@pytest.mark.parametrize(
    ("level", "pair"),
    [("s0:c1,c2", (1, 2)), ("s0:c9,c3", (3, 9)), ("s3:c0,c1023", (0, 1023)),
     ("s0", None), ("s0:c5", None), ("s0:c0.c3", None), ("s0-s0:c1,c2", None),
     ("s0:c1,c2,c3", None), ("", None)],
)
def test_pair_of(level: str, pair: tuple[int, int] | None) -> None:
    assert pair_of(level) == pair


# ------------------------------------------------------------------ pick_pair


def assert_pair(pair: tuple[int, int], cats: set[int]) -> None:
    a, b = pair
    assert a < b, pair
    assert a in cats and b in cats, pair


def test_pick_pair_100k_allocations_with_guests_coming_and_going() -> None:
    """100,000 allocations over c0.c500 while a few guests hold a pair each.

    A new pair never equals a held one, is always ordered and inside the range,
    and the allocations spread over the whole range (random, not sequential).
    """
    rng = seeded(20240601)
    cats = sorted(parse_range("s0-s0:c0.c500")[2])
    assert len(cats) * (len(cats) - 1) // 2 == 125_250
    catset = set(cats)
    held: deque[tuple[int, int]] = deque()
    used: set[tuple[int, int]] = set()
    seen: set[tuple[int, int]] = set()
    firsts: set[int] = set()
    lasts: set[int] = set()
    for _ in range(100_000):
        pair = pick_pair(cats, used, rng)
        assert pair not in used
        a, b = pair
        assert a < b and a in catset and b in catset
        used.add(pair)
        held.append(pair)
        seen.add(pair)
        firsts.add(a)
        lasts.add(b)
        if len(held) > 4:  # more would be slow: pick_pair is O(len(used) * len(cats))
            used.discard(held.popleft())
    # 100k random draws from 125,250 pairs: about 69k distinct; sequential would be 100k
    assert 60_000 < len(seen) < 80_000
    assert min(firsts) == 0 and max(lasts) == 500


def test_pick_pair_exhausts_a_range_without_duplicates() -> None:
    """c0.c45: every one of the 1,035 pairs exactly once, then SlotsExhausted."""
    rng = seeded(7)
    cats = list(range(46))
    used: set[tuple[int, int]] = set()
    total = 46 * 45 // 2
    for _ in range(total):
        pair = pick_pair(cats, used, rng)
        assert_pair(pair, set(cats))
        assert pair not in used
        used.add(pair)
    assert used == {(a, b) for a in cats for b in cats if a < b}
    with pytest.raises(SlotsExhausted) as info:
        pick_pair(cats, used, rng)
    assert f"all {total} category pairs of c0..c45 are in use" in info.value.message


def test_pick_pair_stays_fast_with_100k_pairs_in_use() -> None:
    """Where 100,000 growing allocations over c0.c500 get to: 100k pairs already used.

    1,000 more allocations must stay fast (a set lookup each) and never repeat.
    Today each call costs ~0.1 s here, so 100k growing allocations take hours.
    """
    rng = seeded(1)
    cats = list(range(501))
    all_pairs = [(a, b) for a in cats for b in cats if a < b]
    used = set(rng.sample(all_pairs, 100_000))
    for _ in range(1_000):
        pair = pick_pair(cats, used, rng)
        assert pair[0] < pair[1] and pair not in used
        used.add(pair)
    assert len(used) == 101_000


def test_pick_pair_tiny_range_exhausts_fast() -> None:
    cats = [0, 1, 2]
    used: set[tuple[int, int]] = set()
    start = time.monotonic()
    for _ in range(3):
        used.add(pick_pair(cats, used))
    assert used == {(0, 1), (0, 2), (1, 2)}
    with pytest.raises(SlotsExhausted) as info:
        pick_pair(cats, used)
    assert "all 3 category pairs" in info.value.message
    assert info.value.hint is not None
    assert time.monotonic() - start < 1.0


def test_pick_pair_finds_the_last_free_pair() -> None:
    cats = list(range(20))
    all_pairs = {(a, b) for a in cats for b in cats if a < b}
    for last in [(0, 1), (7, 13), (18, 19)]:
        for seed in range(5):
            assert pick_pair(cats, all_pairs - {last}, seeded(seed)) == last


def test_pick_pair_ignores_used_pairs_outside_the_range() -> None:
    cats = [10, 11, 12]
    used = {(0, 1), (10, 500), (3, 11), (10, 11), (10, 12)}
    assert pick_pair(cats, used) == (11, 12)


def test_pick_pair_unsorted_duplicate_categories() -> None:
    rng = seeded(3)
    for _ in range(200):
        assert_pair(pick_pair([9, 3, 3, 7, 9], set(), rng), {3, 7, 9})


@pytest.mark.parametrize("cats", [[], [5], [5, 5]])
def test_pick_pair_needs_two_categories(cats: list[int]) -> None:
    with pytest.raises(SlotsExhausted):
        pick_pair(cats, set())


# ------------------------------------------------------------------ label_for


def test_label_for_default(kernel: Path) -> None:
    label = driver().label_for(make_spec(kernel), 0, taken=[], live=LiveProcesses())
    process = Context.parse(label.process)
    assert (process.user, process.role, process.type) == ("system_u", "system_r", "svirt_t")
    pair = pair_of(process.level)
    assert pair is not None
    a, b = pair
    assert 0 <= a < b <= 1023
    assert process.level == f"s0:c{a},c{b}"
    assert label.driver == "selinux"
    assert label.image == f"system_u:object_r:svirt_image_t:s0:c{a},c{b}"
    assert label.content == "system_u:object_r:virt_content_t:s0"
    assert label.shared == "system_u:object_r:svirt_image_t:s0"


def test_label_for_is_random(kernel: Path) -> None:
    d = driver()
    spec = make_spec(kernel)
    levels = {Context.parse(d.label_for(spec, 0, [], FakeLive()).process).level
              for _ in range(50)}
    assert len(levels) > 40  # 523,776 pairs: collisions are rare


def test_label_for_never_returns_a_taken_pair(kernel: Path) -> None:
    d = driver("system_u:system_r:unconfined_t:s0-s0:c0.c2")
    spec = make_spec(kernel)
    taken = [selinux_label((0, 1)), selinux_label((1, 2))]
    for _ in range(100):
        label = d.label_for(spec, 0, taken, FakeLive())
        assert label.process == "system_u:system_r:svirt_t:s0:c0,c2"
        assert label.image == "system_u:object_r:svirt_image_t:s0:c0,c2"


def test_label_for_skips_pairs_of_live_processes(kernel: Path) -> None:
    d = driver("system_u:system_r:unconfined_t:s0-s0:c0.c2")
    live = FakeLive(["system_u:system_r:svirt_t:s0:c0,c2", "system_u:system_r:svirt_t:s0:c2,c1",
                     "kernel", "system_u:system_r:init_t:s0"])
    for _ in range(50):
        assert d.label_for(make_spec(kernel), 0, [], live).process.endswith(":s0:c0,c1")


def test_label_for_exhausted(kernel: Path) -> None:
    d = driver("system_u:system_r:unconfined_t:s0-s0:c0.c2")
    taken = [selinux_label(p) for p in [(0, 1), (0, 2)]]
    live = FakeLive(["system_u:system_r:svirt_t:s0:c1,c2"])
    with pytest.raises(SlotsExhausted):
        d.label_for(make_spec(kernel), 0, taken, live)


def test_label_for_launcher_without_categories(kernel: Path) -> None:
    with pytest.raises(SlotsExhausted):
        driver("system_u:system_r:unconfined_t:s0").label_for(make_spec(kernel), 0, [],
                                                               FakeLive())


def test_label_for_other_sensitivity(kernel: Path) -> None:
    d = driver("system_u:system_r:unconfined_t:s2-s3:c0.c255")
    label = d.label_for(make_spec(kernel), 0, [], FakeLive())
    level = Context.parse(label.process).level
    pair = pair_of(level)
    assert pair is not None and pair[1] <= 255
    assert level.startswith("s2:c")
    assert label.image.endswith(f":svirt_image_t:{level}")
    assert label.content == "system_u:object_r:virt_content_t:s2"
    assert label.shared == "system_u:object_r:svirt_image_t:s2"


def test_label_for_spec_type(kernel: Path) -> None:
    spec = make_spec(kernel, security=Security(type="svirt_web_t"))
    label = driver().label_for(spec, 0, [], FakeLive())
    process = Context.parse(label.process)
    assert process.type == "svirt_web_t"
    assert process.role == "system_r"
    assert pair_of(process.level) is not None
    assert Context.parse(label.image).type == "svirt_image_t"


def test_label_for_static_label(kernel: Path) -> None:
    static = "system_u:system_r:svirt_t:s0:c17,c42"
    spec = make_spec(kernel, security=Security(label=static, relabel=False))
    label = driver().label_for(spec, 3, [selinux_label((1, 2))], FakeLive())
    assert label.process == static
    assert driver().label_claim(spec, label) == "mcs-c17-c42"  # claimed like a dynamic one
    # its own last run (a restart) remembers the same context: not another guest
    assert driver().label_for(spec, 3, [Label("selinux", static, "", "", "")],
                              FakeLive()).process == static
    assert label.image == "system_u:object_r:svirt_image_t:s0:c17,c42"
    assert label.content == "system_u:object_r:virt_content_t:s0"
    assert label.shared == "system_u:object_r:svirt_image_t:s0"


@pytest.mark.parametrize(("valid", "ptype"), [(True, "svirt_tcg_t"), (False, "svirt_t")])
def test_label_for_tcg_type(kernel: Path, monkeypatch: pytest.MonkeyPatch, valid: bool,
                            ptype: str) -> None:
    checked: list[str] = []

    def fake_valid(context: str) -> bool:
        checked.append(context)
        return valid

    monkeypatch.setattr(sel, "_context_valid", fake_valid)
    label = driver().label_for(make_spec(kernel, accel=Accel.TCG), 0, [], FakeLive())
    assert Context.parse(label.process).type == ptype
    assert checked == ["system_u:system_r:svirt_tcg_t:s0"]
    # KVM and non-QEMU backends never ask for the TCG type
    checked.clear()
    assert Context.parse(driver().label_for(make_spec(kernel), 0, [], FakeLive())
                         .process).type == "svirt_t"
    uml = make_spec(kernel, backend=Backend.UML, accel=Accel.TCG)
    assert Context.parse(driver().label_for(uml, 0, [], FakeLive()).process).type == "svirt_t"
    assert checked == []


def test_slot_usable_is_always_true() -> None:
    assert driver().slot_usable(0, FakeLive(["system_u:system_r:svirt_t:s0:c0,c1"])) is True


@pytest.mark.parametrize("holder", [
    "other-type",  # another guest's context with another type, same pair (an
    # identical context is its claim's: the registry test below)
    "live",  # a process of another registry or tool runs at that level
])
def test_a_static_pair_another_guest_holds_is_refused(kernel: Path, holder: str) -> None:
    """Two processes at one level reach each other's objects: a spec's own
    context may not take a pair a guest holds or a live process runs with.
    (The live process table is a stand-in: this kernel has no SELinux to run
    a process at a level.)"""
    static = "system_u:system_r:svirt_t:s0:c17,c42"
    spec = make_spec(kernel, security=Security(label=static))
    taken: list[Label] = []
    live = FakeLive(["system_u:system_r:unconfined_t:s0-s0:c0.c1023"])
    if holder == "other-type":
        taken = [Label("selinux", "system_u:system_r:svirt_web_t:s0:c17,c42", "", "", "")]
    else:
        live = FakeLive(["system_u:system_r:svirt_tcg_t:s0:c17,c42"])
    with pytest.raises(SecurityError, match="category pair c17,c42 is"):
        driver().label_for(spec, 3, taken, live)


def test_a_registry_refuses_a_static_pair_of_a_reserved_guest(tmp_path: Path,
                                                             kernel: Path) -> None:
    """Through a real registry and host claims: guest a gets a dynamic pair;
    guest b naming that pair as its own context is refused; a static guest's
    pair is claimed, so a dynamic guest never gets it."""
    from svirt.claims.host import HostClaims
    from svirt.launcher.registry import Registry

    registry = Registry(tmp_path / "run", tmp_path / "state",
                        claims=HostClaims(tmp_path / "claims"))
    a = registry.reserve(make_spec(kernel, name="a"), [driver()])
    level = Context.parse(a.labels["selinux"].process).level
    with pytest.raises(SecurityError, match="held by another guest"):
        registry.reserve(make_spec(kernel, name="b", security=Security(
            label=f"system_u:system_r:svirt_t:{level}")), [driver()])
    assert [r.name for r in registry.records()] == ["a"]
    static = registry.reserve(make_spec(kernel, name="c", security=Security(
        label="system_u:system_r:svirt_t:s0:c5,c6")), [driver()])
    assert "mcs-c5-c6" in static.claims
    registry.release(a)
    registry.release(static)
