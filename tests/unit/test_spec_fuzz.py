"""Property-based: whatever goes into a spec, a GuestSpec or a SpecError comes out.

Raw bytes, arbitrary text, structured TOML built from the known keys with values
of every type (huge integers, inf and nan, nested arrays and tables, odd strings)
and Python-level ``GuestSpec(**kwargs)`` with random values.  Anything else that
escapes (ValueError, TypeError, OverflowError, RecursionError, UnicodeError,
OSError, ...) is a bug: it would reach the user as a traceback.

The examples are derandomized and the example database is off, so every CI run
tries the same >= 10,000 specs.
"""

from __future__ import annotations

import functools
import math
import re
import tempfile
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from svirt.errors import SpecError
from svirt.host import host_memory_mib
from svirt.preflight import check_spec
from svirt.spec import (
    MIN_MEMORY_MIB,
    Console,
    Disk,
    GuestSpec,
    Nic,
    Security,
    load_spec,
    spec_from_mapping,
)

FUZZ = settings(
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example],
)
# per test; together at least 10,000 examples per run
RAW_BYTES = 2000
RAW_TEXT = 2000
STRUCTURED = 3500
PYTHON = 3000


# ------------------------------------------------------------------ files


@dataclass(frozen=True)
class Files:
    root: Path
    kernel: Path
    initrd: Path
    disks: tuple[Path, ...]
    kdir: Path
    logdir: Path
    spec: Path


@pytest.fixture(scope="module")
def files() -> Iterator[Files]:
    """A real kernel, initrd, disks and a log directory, so some specs are valid."""
    with tempfile.TemporaryDirectory(prefix="svirt-fuzz-") as tmp:
        root = Path(tmp)
        (root / "vmlinuz").write_bytes(b"kernel")
        (root / "initrd.img").write_bytes(b"initrd")
        disks = []
        for name in ("d0.img", "d1.img", "d 2,x.img"):
            (root / name).write_bytes(b"\0" * 512)
            disks.append(root / name)
        (root / "kdir").mkdir()
        (root / "logs").mkdir()
        yield Files(root, root / "vmlinuz", root / "initrd.img", tuple(disks), root / "kdir",
                    root / "logs", root / "guest.toml")


def check(build: Callable[[], GuestSpec]) -> GuestSpec | SpecError:
    """Run ``build`` and then preflight's host checks on what it built: a
    GuestSpec or a SpecError, each well formed, and nothing else."""
    try:
        spec = build()
        check_spec(spec)
    except SpecError as err:
        assert isinstance(err.message, str) and err.message
        assert "\n" not in err.message and "\r" not in err.message, err.message
        assert len(err.message) < 2000, err.message[:200]
        if err.hint is not None:
            assert "\n" not in err.hint
        key = re.sub(r"\[\d+\]", "", err.key) if err.key else err.key
        if currently_in_test_context():
            event(f"SpecError at {key if key in KNOWN else 'another key'}")
        return err
    if currently_in_test_context():
        event("valid GuestSpec")
    assert isinstance(spec, GuestSpec)
    assert re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", spec.name)
    assert spec.name[0] not in ".-"
    assert isinstance(spec.memory, int) and MIN_MEMORY_MIB <= spec.memory <= host_memory_mib()
    assert isinstance(spec.vcpus, int) and 1 <= spec.vcpus <= 255
    assert 0 < spec.shutdown_timeout <= 3600 and math.isfinite(spec.shutdown_timeout)
    assert spec.kernel is None or (spec.kernel.is_absolute() and spec.kernel.exists())
    assert isinstance(spec.uuid, uuidlib.UUID)
    assert isinstance(spec.disks, tuple) and all(isinstance(d, Disk) for d in spec.disks)
    assert isinstance(spec.nics, tuple) and all(isinstance(n, Nic) for n in spec.nics)
    assert len(spec.disks) <= 16 and len(spec.nics) <= 8
    assert isinstance(spec.console, Console) and isinstance(spec.security, Security)
    assert spec.netns is None or (spec.netns[0] != "-" and spec.netns not in (".", ".."))
    for i in range(len(spec.nics)):
        spec.nic_mac(i)
    return spec


KNOWN = {None, "name", "kernel", "backend", "uuid", "accel", "memory", "vcpus", "initrd",
         "cmdline", "netns", "shutdown_timeout", "console.mode", "console.log", "security.model",
         "security.type", "security.label", "security.relabel", "security.image_roots",
         "disk.path", "disk.format", "disk.readonly", "disk.shared", "disk.relabel", "nic.bridge",
         "nic.mac", "nic.model", "nic.isolated", "disk", "nic", "console", "security",
         "firmware", "nvram", "boot", "cdrom", "cdrom.path"}


def load(path: Path, data: bytes) -> GuestSpec | SpecError:
    path.write_bytes(data)
    return check(lambda: load_spec(path))


# ------------------------------------------------------------- raw input


@settings(FUZZ, max_examples=RAW_BYTES)
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes(files: Files, data: bytes) -> None:
    load(files.spec, data)


@settings(FUZZ, max_examples=RAW_BYTES // 4)
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_after_a_valid_spec(files: Files, data: bytes) -> None:
    head = f'name = "web1"\nkernel = "{files.kernel}"\n'.encode()
    load(files.spec, head + data)


TOML_ALPHABET = st.sampled_from(list('[]{}=".,\'#\n\t -_:+0123456789aeEfinrstux\\'))


@settings(FUZZ, max_examples=RAW_TEXT)
@given(text=st.text(max_size=400) | st.text(TOML_ALPHABET, max_size=400))
def test_arbitrary_text(files: Files, text: str) -> None:
    load(files.spec, text.encode("utf-8", "surrogatepass"))


# ------------------------------------------------------- structured TOML


def toml_string(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise AssertionError(type(value))


@dataclass(frozen=True)
class Raw:
    """A TOML value written as it is (dates, times)."""

    text: str


def toml_document(doc: dict[str, Any]) -> str:
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in doc.items())


HUGE_INTS = st.sampled_from([10**400, -(10**400), 2**63, 2**64 + 1, -(2**63) - 1, 10**4000])
ODD_TEXT = st.sampled_from([
    "", " ", "-", "--help", "-x", ".", "..", ".hidden", "a" * 65, "x" * 5000, "a\nb", "a\0b",
    "\u0660\u0661", "é", "\U0001f600", "a b", "a,b", "a/b", "a:b=c", "\\", "'", '"', "\t",
    "99999999999999999999G", "1e400", "inf", "nan", "-1", "0", "256M", "1T", "1048576K",
    "2g", " 128 M ", "9" * 70 + "G", "1" + " " * 60 + "G", "256B", "0x100",
])
SCALARS = st.one_of(
    st.just(Raw("1979-05-27")),
    st.just(Raw("07:32:00")),
    st.just(Raw("1979-05-27T07:32:00Z")),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    HUGE_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    ODD_TEXT,
)
ANY_TOML = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["path", "mode", "log", "x", "", "é", " "]), inner,
                      max_size=3),
    max_leaves=6,
)


def deep(levels: int, leaf: str) -> Raw:
    return Raw("[" * levels + leaf + "]" * levels)


def mix(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any] | None = None,
        weight: int = 6) -> st.SearchStrategy[Any]:
    """Mostly a good value (so later checks run), sometimes a bad one or anything at all."""
    return weighted(good, bad, ANY_TOML, weight)


def weighted(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any] | None,
             anything: st.SearchStrategy[Any], weight: int) -> st.SearchStrategy[Any]:
    # one_of() drops repeated branches, so weight by the number drawn first
    branches = [good] * weight + ([bad] if bad is not None else []) + [anything]
    return st.integers(0, len(branches) - 1).flatmap(lambda i: branches[i])


@functools.cache
def structured(files: Files) -> st.SearchStrategy[dict[str, Any]]:
    good_kernel = st.sampled_from([str(files.kernel), "vmlinuz", "./vmlinuz", "kdir/../vmlinuz"])
    good_path = st.sampled_from(["initrd.img", "d0.img", "d1.img", str(files.disks[0])])
    bad_path = st.sampled_from([
        "d 2,x.img", "kdir", "missing", "", "/", "/dev/null", "/proc/self/mem", "a\0b",
        "x" * 300, "x/" * 3000, "../" * 50 + "etc/passwd", "nodir/c.log", "logs",
        "vmlinuz/x", "\u0660", "a\nb",
    ])
    good_name = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", fullmatch=True)
    good_memory = (st.integers(min_value=MIN_MEMORY_MIB, max_value=1024)
                   | st.sampled_from(["256M", "1G", "64MiB", " 128 M ", "1048576K", "16"]))
    bad_memory = st.integers(min_value=-10, max_value=2**20) | ODD_TEXT | HUGE_INTS | st.floats()
    disk = st.fixed_dictionaries(
        {"path": mix(good_path, bad_path)},
        optional={"format": mix(st.sampled_from(["raw", "qcow2"]), st.just("vmdk")),
                  "readonly": mix(st.booleans()), "shared": mix(st.booleans()),
                  "relabel": mix(st.booleans()), "size": ANY_TOML},
    )
    nic = st.fixed_dictionaries(
        {},
        optional={"bridge": mix(st.sampled_from(["br0", "virbr0", "a.b-c_d"]),
                                st.sampled_from(["-br", ".", "..", "x" * 16]) | ODD_TEXT),
                  "mac": mix(st.sampled_from(["52:54:00:12:34:56", "52:54:00:AB:CD:EF"]),
                             st.sampled_from(["01:00:5e:00:00:01", "zz:54:00:12:34:56"])),
                  "isolated": mix(st.booleans()),
                  "model": mix(st.sampled_from(["virtio", "e1000", "rtl8139"]),
                               st.just("ne2k"))},
    )
    console = st.fixed_dictionaries(
        {},
        optional={"mode": mix(st.sampled_from(["stdio", "pty", "none"]),
                              st.sampled_from(["log", "serial"])),
                  "log": mix(st.sampled_from(["logs/c.log", str(files.logdir / "d.log")]),
                             bad_path)},
    )
    security = st.fixed_dictionaries(
        {},
        optional={"model": mix(st.sampled_from(["auto", "selinux", "smack", "dac", "none"]),
                               st.just("apparmor")),
                  "type": mix(st.sampled_from(["svirt_t", "svirt_web_t"]),
                              st.sampled_from(["Svirt", "_t", "a_t\n"])),
                  "label": mix(st.just("system_u:system_r:svirt_t:s0:c1,c2"),
                               st.sampled_from(["svirt_t", "a:b:c:d e", "a:b:c:\0"])),
                  "relabel": mix(st.booleans()),
                  "image_roots": mix(st.lists(good_path | st.just("."), max_size=3),
                                     st.lists(bad_path, min_size=1, max_size=2))},
    )
    keys: dict[str, st.SearchStrategy[Any]] = {
        "backend": mix(st.sampled_from(["qemu", "uml", "lguest"]), st.just("xen")),
        "uuid": mix(st.uuids().map(str), st.sampled_from(["not-a-uuid", ""])),
        "accel": mix(st.sampled_from(["auto", "kvm", "tcg"]), st.just("hvf")),
        "memory": mix(good_memory, bad_memory),
        "vcpus": mix(st.just(1) | st.integers(1, 255), st.integers(-2, 300) | HUGE_INTS),
        "initrd": mix(st.just("initrd.img"), bad_path),
        "cmdline": mix(st.text(st.characters(min_codepoint=32), max_size=40), ODD_TEXT),
        "netns": mix(st.sampled_from(["lab", "a.b"]),
                     st.sampled_from(["-lab", ".", "..", "a/b"]) | ODD_TEXT),
        "shutdown_timeout": mix(st.floats(0.001, 3600) | st.integers(1, 3600),
                                st.floats() | st.integers(-5, 4000) | HUGE_INTS),
        "console": mix(console),
        "security": mix(security),
        "disk": mix(st.lists(disk, max_size=3)),
        "nic": mix(st.lists(nic, max_size=3)),
    }
    required = {"name": mix(good_name, ODD_TEXT, weight=12),
                "kernel": mix(good_kernel, bad_path, weight=12)}
    return st.one_of(
        *[st.fixed_dictionaries(required, optional=keys)] * 10,
        st.fixed_dictionaries({}, optional={**required, **keys}),  # a required key missing
        st.fixed_dictionaries(required, optional={**keys, "colour": ANY_TOML}),  # unknown key
        st.fixed_dictionaries(  # nested far too deep for the parser
            {**required,
             "cmdline": st.sampled_from([900, 1100, 5000]).map(lambda n: deep(n, "1"))}),
    )


def valid_or_spec_error(files: Files, doc: dict[str, Any]) -> None:
    load(files.spec, toml_document(doc).encode("utf-8", "surrogatepass"))
    # the same data without TOML (types TOML cannot carry are skipped by the writer above)
    check(lambda: spec_from_mapping(_plain(doc), base=files.root))


def _plain(value: Any) -> Any:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@settings(FUZZ, max_examples=STRUCTURED)
@given(data=st.data())
def test_structured_toml(files: Files, data: st.DataObject) -> None:
    valid_or_spec_error(files, data.draw(structured(files)))


def test_structured_toml_reaches_valid_specs(files: Files) -> None:
    """The generator is not all noise: a plain document from it loads."""
    doc = {"name": "web1", "kernel": "vmlinuz", "memory": "64M", "disk": [{"path": "d0.img"}],
           "nic": [{"bridge": "br0"}], "console": {"log": "logs/c.log"}}
    spec = load(files.spec, toml_document(doc).encode("utf-8", "surrogatepass"))
    assert isinstance(spec, GuestSpec), spec


# ------------------------------------------------------------- Python API


@dataclass(frozen=True)
class Make:
    """A Disk/Nic/Console/Security to build inside the checked call."""

    cls: type[Any]
    kwargs: dict[str, Any]


def realise(value: Any) -> Any:
    if isinstance(value, Make):
        return value.cls(**{k: realise(v) for k, v in value.kwargs.items()})
    if isinstance(value, list):
        return [realise(v) for v in value]
    if isinstance(value, tuple):
        return tuple(realise(v) for v in value)
    return value


ANY_PY = st.recursive(
    st.none() | st.booleans() | st.integers() | HUGE_INTS | st.floats() | st.text(max_size=30)
    | ODD_TEXT | st.binary(max_size=10) | st.uuids() | st.just(Path("relative"))
    | st.just(object()) | st.complex_numbers(),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(st.sampled_from(["a", "path", ""]), inner, max_size=2)
    | st.frozensets(st.integers(), max_size=3),
    max_leaves=6,
)


def pymix(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any] | None = None,
          weight: int = 6) -> st.SearchStrategy[Any]:
    return weighted(good, bad, ANY_PY, weight)


@functools.cache
def python_kwargs(files: Files) -> st.SearchStrategy[dict[str, Any]]:
    kernel = st.sampled_from([files.kernel, str(files.kernel)])
    good_path = st.sampled_from([files.initrd, *files.disks[:2], str(files.disks[0])])
    bad_path = st.sampled_from([
        files.disks[2], files.kdir, files.root / "missing", Path("relative"), "", "\0",
        "a\ud800b", "/tmp/\udcff", "x" * 5000, files.root / ("x" * 300), Path("/dev/null"),
        files.root / "vmlinuz" / "x",
    ])
    disk = st.builds(lambda kw: Make(Disk, kw), st.fixed_dictionaries(
        {"path": pymix(good_path, bad_path)},
        optional={"format": pymix(st.sampled_from(["raw", "qcow2"]), st.just("vmdk")),
                  "readonly": pymix(st.booleans()), "shared": pymix(st.booleans()),
                  "relabel": pymix(st.booleans())}))
    nic = st.builds(lambda kw: Make(Nic, kw), st.fixed_dictionaries(
        {}, optional={"bridge": pymix(st.just("br0"),
                                      st.sampled_from(["-x", "..", "x" * 16]) | ODD_TEXT),
                      "mac": pymix(st.just("52:54:00:12:34:56"), st.just("ff:ff:ff:ff:ff:ff")),
                      "isolated": pymix(st.booleans()),
                      "model": pymix(st.sampled_from(["virtio", "e1000"]), st.just("x"))}))
    console = st.builds(lambda kw: Make(Console, kw), st.fixed_dictionaries(
        {}, optional={"mode": pymix(st.sampled_from(["pty", "none", "stdio"]),
                                    st.sampled_from(["log", "x"])),
                      "log": pymix(st.just(files.logdir / "c.log"),
                                   st.just(files.root / "no" / "c.log") | bad_path)}))
    security = st.builds(lambda kw: Make(Security, kw), st.fixed_dictionaries(
        {}, optional={"model": pymix(st.sampled_from(["dac", "none"]), st.just("apparmor")),
                      "type": pymix(st.just("svirt_t"), st.just("Bad")),
                      "label": pymix(st.just("u:r:t:s0"), st.just("x")),
                      "relabel": pymix(st.booleans()),
                      "image_roots": pymix(st.lists(good_path, max_size=2).map(tuple),
                                           st.lists(bad_path, max_size=2).map(tuple))}))
    fields: dict[str, st.SearchStrategy[Any]] = {
        "backend": pymix(st.sampled_from(["qemu", "uml", "lguest"]), st.just("xen")),
        "uuid": pymix(st.uuids() | st.uuids().map(str), st.just("x")),
        "accel": pymix(st.sampled_from(["auto", "kvm", "tcg"])),
        "memory": pymix(st.integers(MIN_MEMORY_MIB, 1024) | st.just("1G"),
                        st.integers(min_value=0, max_value=2**16) | ODD_TEXT | HUGE_INTS),
        "vcpus": pymix(st.integers(1, 255), st.integers(-1, 300) | HUGE_INTS),
        "initrd": pymix(st.just(files.initrd), bad_path),
        "cmdline": pymix(st.text(max_size=20)),
        "disks": pymix(st.lists(disk, max_size=3).map(tuple) | st.lists(disk, max_size=2)),
        "nics": pymix(st.lists(nic, max_size=3).map(tuple)),
        "netns": pymix(st.just("lab"), st.sampled_from(["-lab", "."]) | ODD_TEXT),
        "console": pymix(console),
        "shutdown_timeout": pymix(st.floats(0.5, 3600) | st.integers(1, 3600),
                                  st.floats() | st.integers(-1, 4000) | HUGE_INTS),
        "security": pymix(security),
    }
    return st.fixed_dictionaries(
        {"name": pymix(st.sampled_from(["web1", "a", "x" * 64]),
                       st.sampled_from(["-web", ".web"]) | ODD_TEXT, weight=12),
         "kernel": pymix(kernel, bad_path, weight=12)},
        optional=fields)


@settings(FUZZ, max_examples=PYTHON)
@given(data=st.data())
def test_python_kwargs(files: Files, data: st.DataObject) -> None:
    kwargs = data.draw(python_kwargs(files))
    check(lambda: GuestSpec(**{k: realise(v) for k, v in kwargs.items()}))


# ------------------------------------------------------ fixed hard cases


@pytest.mark.parametrize("levels", [100, 999, 1000, 5000, 100_000])
def test_deep_nesting(files: Files, levels: int) -> None:
    for leaf in ("1", "{a = 1}"):
        body = f'name = "a"\nkernel = "vmlinuz"\nx = {"[" * levels}{leaf}{"]" * levels}\n'
        assert isinstance(load(files.spec, body.encode()), SpecError)


def test_deep_python_values_do_not_blow_the_message(files: Files) -> None:
    nested: Any = []
    for _ in range(100_000):
        nested = [nested]
    err = check(lambda: GuestSpec(name=nested, kernel=files.kernel))
    assert isinstance(err, SpecError) and err.key == "name"
