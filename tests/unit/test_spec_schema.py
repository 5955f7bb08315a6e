"""The published JSON Schema of a spec: committed as generated, and in step with
the TOML reader on every example spec in the repository.

Checked with the ``jsonschema`` package (a test dependency): a real
validator, not the schema's own reading of itself.
"""

from __future__ import annotations

import ast
import copy
import io
import json
import random
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from svirt.cli.schema import print_schema
from svirt.errors import SpecError
from svirt.images.build import TinyGuest
from svirt.spec import (
    Backend,
    Console,
    Disk,
    GuestSpec,
    Limits,
    Nic,
    Restart,
    Security,
    SecurityModel,
    json_schema,
    schema_text,
    spec_from_mapping,
    spec_to_mapping,
)
from tests.integration.helpers import write_spec

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "svirt" / "data" / "spec.schema.json"
VALIDATOR = jsonschema.Draft202012Validator(json_schema())
# the reader's messages for what the schema knows too: keys, types, presence
SCHEMA_ERRORS = ("unknown key", "expected a string", "expected an integer", "expected a table",
                 "expected an array", "expected true/false", "expected a number",
                 "missing (required)", "needs both path and format")
SPEC_KEYS = {"name", "kernel", "disk", "nic", "console", "security", "limits", "agent",
             "cloud_init"}


def schema_problems(data: object) -> list[str]:
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in VALIDATOR.iter_errors(data)]


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(json_schema())


def test_the_committed_schema_is_the_generated_one() -> None:
    assert COMMITTED.read_text() == schema_text(), (
        "svirt/data/spec.schema.json is stale: regenerate it with `svirt schema`")


def test_print_schema_prints_the_committed_text() -> None:
    out = io.StringIO()
    assert print_schema(out) == 0
    assert json.loads(out.getvalue()) == json.loads(COMMITTED.read_text())


# ------------------------------------------------------------------ README

def readme_blocks() -> Iterator[tuple[int, dict[str, Any]]]:
    """The README's literal blocks (after ``::``) that are TOML and spec-shaped:
    whole specs and fragments of one (a [[disk]] or [limits] table)."""
    lines = (ROOT / "README.rst").read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.rstrip().endswith("::"):
            continue
        block: list[str] = []
        for text in lines[i + 2:]:
            if text.strip() and not text.startswith((" ", "\t")):
                break
            block.append(text)
        try:
            data = tomllib.loads("\n".join(block))
        except tomllib.TOMLDecodeError:
            continue
        if data and set(data) & SPEC_KEYS:
            yield i + 1, data


def test_every_readme_spec_example_validates() -> None:
    blocks = list(readme_blocks())
    assert len(blocks) >= 4, blocks  # the guest, a static label, backing, limits
    assert any("name" in data for _, data in blocks)
    fragment = {**VALIDATOR.schema, "required": []}  # a table shown on its own
    for line, data in blocks:
        problems = [e.message for e in jsonschema.Draft202012Validator(fragment)
                    .iter_errors(data)]
        assert not problems, f"README.rst:{line}: {problems}"


# ------------------------------------------------------------- test fixtures

def _strings(path: Path) -> Iterator[str]:
    """Every string a test module spells from constants (``BASE + '...'``)."""
    tree = ast.parse(path.read_text())
    names: dict[str, str] = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            names[node.targets[0].id] = node.value.value

    def value(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return names.get(node.id)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = value(node.left), value(node.right)
            return left + right if left is not None and right is not None else None
        return None

    for expr in ast.walk(tree):
        if (text := value(expr)) is not None and "=" in text:
            yield text


def fixture_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """The TOML spec texts of the tests (valid and invalid), as data."""
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for text in _strings(path):
            try:
                data = tomllib.loads(text)
            except (tomllib.TOMLDecodeError, ValueError, RecursionError):
                continue
            if "name" in data and "kernel" in data:
                yield f"{path.relative_to(ROOT)}: {text[:60]!r}", data


def test_the_schema_and_the_reader_agree_on_the_tests_spec_fixtures() -> None:
    """A fixture the reader accepts, the schema accepts; one the reader refuses
    for a key, a type or a missing key, the schema refuses too."""
    accepted = refused = 0
    for where, data in fixture_specs():
        problems = schema_problems(data)
        try:
            spec_from_mapping(data, base=Path("/srv/specs"))
        except SpecError as err:
            if any(m in err.detail for m in SCHEMA_ERRORS):
                assert problems, f"{where}: the reader says {err}, the schema nothing"
                refused += 1
            continue
        assert not problems, f"{where}: {problems}"
        accepted += 1
    assert accepted >= 10 and refused >= 10, (accepted, refused)


def test_the_integration_tests_spec_file_validates(tmp_path: Path) -> None:
    guest = TinyGuest(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img")
    for backend in ("qemu", "uml"):
        path = write_spec(tmp_path / f"{backend}.toml", "g", backend, guest,
                          extra='[console]\nmode = "none"\n')
        assert not schema_problems(tomllib.loads(path.read_text()))


# -------------------------------------------------------- specs from Python

@pytest.mark.parametrize("spec", [
    # the demo's two guests (svirt/demo.py), with stand-in paths
    GuestSpec(name="demo-uml", backend=Backend.UML, kernel=Path("/cache/linux"),
              initrd=Path("/cache/initrd"), memory=128, cmdline="svirt.mode=stay",
              shutdown_timeout=20),
    GuestSpec(name="demo-qemu", backend=Backend.QEMU, kernel=Path("/cache/vmlinuz"),
              initrd=Path("/cache/initrd"), memory=256, cmdline="svirt.mode=stay",
              shutdown_timeout=20),
    # every table filled
    GuestSpec(name="full", kernel=Path("/k"), memory=1024, vcpus=2, netns="lab",
              console=Console(log=Path("/var/log/svirt/full.log"), max_bytes=8192, keep=2),
              security=Security(model=SecurityModel.SELINUX, type="svirt_web_t",
                                image_roots=(Path("/img"),)),
              limits=Limits(pids=64, cpu_weight=100, cpus="0-1"),
              disks=(Disk(Path("/img/a.img")), Disk(Path("/img/b.img"), ephemeral=True)),
              nics=(Nic(bridge="br0", mac="52:54:00:12:34:56"), Nic(model="e1000")),
              restart=Restart.ON_FAILURE),
], ids=["demo-uml", "demo-qemu", "full"])
def test_a_spec_built_in_python_validates_as_its_mapping(spec: GuestSpec) -> None:
    data = spec_to_mapping(spec)
    assert not schema_problems(data)
    assert spec_from_mapping(data) == spec


def test_the_schema_refuses_what_the_reader_refuses() -> None:
    base = {"name": "g", "kernel": "/k"}
    for bad in ({"colour": "red"}, {"vcpus": "2"}, {"memory": True},
                {"disk": [{"format": "raw"}]}, {"disk": [{"path": "/d", "size": 1}]},
                {"disk": [{"path": "/d", "backing": [{"path": "/b"}]}]},
                {"console": {"mode": "loud"}}, {"limits": {"pids": 1}}):
        assert schema_problems({**base, **bad}), bad
        with pytest.raises(SpecError):
            spec_from_mapping({**base, **bad})


# ------------------------------------------------------------ mutations

_VALUES: list[Any] = [None, 1, -1, True, "x", "", 1.5, [], [1], {}, {"path": "p"}, {"zz": 1},
                      [{}], [{"path": "q"}], [{"path": 1}], "/abs", "0-1", 10**30]
_KEYS = ["zz", "path", "format", "mode", "log", "backing", "image_roots", "disk", "name"]


def _mutated(data: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """``data`` with one to three keys, in any of its tables, removed, replaced
    by a value of another type or added."""
    data = copy.deepcopy(data)

    def tables(x: Any, out: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if isinstance(x, dict):
            out.append(x)
            for v in x.values():
                tables(v, out)
        elif isinstance(x, list):
            for v in x:
                tables(v, out)
        return out

    for _ in range(rng.randint(1, 3)):
        table = rng.choice(tables(data, []))
        keys, op = list(table), rng.random()
        if op < 0.3 and keys:
            del table[rng.choice(keys)]
        elif op < 0.8 and keys:
            table[rng.choice(keys)] = copy.deepcopy(rng.choice(_VALUES))
        else:
            table[rng.choice(_KEYS)] = copy.deepcopy(rng.choice(_VALUES))
    return data


def test_the_schema_and_the_reader_agree_on_mutated_specs() -> None:
    """2000 seeded mutations of the examples: what the reader accepts the schema
    accepts, and what it refuses for a key or a type the schema refuses."""
    corpus = [data for _, data in fixture_specs()]
    corpus += [data for _, data in readme_blocks() if "name" in data]
    rng = random.Random(23)  # noqa: S311 - a repeatable test, not a secret
    for _ in range(2000):
        data = _mutated(rng.choice(corpus), rng)
        problems = schema_problems(data)
        try:
            spec_from_mapping(data, base=Path("/srv/specs"))
        except SpecError as err:
            if any(m in err.detail for m in SCHEMA_ERRORS):
                assert problems, f"{data}: the reader says {err}, the schema nothing"
            continue
        assert not problems, f"{data}: {problems}"
