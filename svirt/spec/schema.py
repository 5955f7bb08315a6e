"""Everything derived from the spec's one declaration (:mod:`svirt.spec.keys`).

The TOML reader's key and type checks (:func:`spec_from_mapping`), its
inverse (:func:`spec_to_mapping`), the absolute-path rewriting for a spec
copied elsewhere (:func:`absolute_paths`) and the JSON Schema published for
editors (:func:`json_schema`, committed as ``svirt/data/spec.schema.json``)
all walk the same :class:`~svirt.spec.keys.Entry` rows, so they cannot
disagree about which keys exist, what they hold and which are paths.
"""

from __future__ import annotations

import enum
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import MISSING
from pathlib import Path
from typing import Any

from svirt.errors import SpecError
from svirt.spec.keys import Entry, entries, entry_map
from svirt.spec.model import GuestSpec
from svirt.spec.values import _fail, _show, show_path

SCHEMA_FILE = "spec.schema.json"  # in svirt/data: the committed json_schema()
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


# ---------------------------------------------------------------- TOML in

def _check_table(
    table: Mapping[str, Any], allowed: Mapping[str, tuple[type, ...]], prefix: str
) -> None:
    for key, value in table.items():
        full = f"{prefix}{show_path(key) if len(str(key)) <= 64 else _show(key)}"
        if key not in allowed:
            raise _fail(full, "unknown key", hint=f"known keys: {', '.join(sorted(allowed))}")
        types = allowed[key]
        if isinstance(value, bool) and bool not in types:
            raise _fail(full, f"expected {_type_names(types)}, got a boolean")
        if not isinstance(value, types):
            raise _fail(full, f"expected {_type_names(types)}, got {type(value).__name__}")


def _type_names(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true/false",
             dict: "a table", list: "an array"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def spec_from_mapping(data: Mapping[str, Any], base: Path | None = None) -> GuestSpec:
    """Build a GuestSpec from parsed TOML; relative paths are taken from ``base``."""
    if not isinstance(data, Mapping):
        raise _fail("", f"expected a table, got {type(data).__name__}")

    def rel(value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() or base is None else base / p

    return GuestSpec(**_kwargs(GuestSpec, data, "", rel))


def _kwargs(cls: type, table: Mapping[str, Any], prefix: str,
            rel: Callable[[str], Path], missing: str | None = None) -> dict[str, Any]:
    """``table``'s keys checked and made into ``cls``'s arguments: paths
    relative to the spec file, tables and arrays of tables built."""
    known = entry_map(cls)
    _check_table(table, {name: e.toml for name, e in known.items()}, prefix)
    for e in known.values():
        if e.required and e.name not in table:
            if missing:
                raise _fail(prefix.rstrip("."), missing)
            raise _fail(f"{prefix}{e.name}", "missing (required)")
    out: dict[str, Any] = {}
    for name, value in table.items():
        e = known[name]
        if e.table is not None and e.toml == (list,):
            value = tuple(_item(e, item, f"{prefix}{name}[{i}]", rel)
                          for i, item in enumerate(value))
        elif e.table is not None:
            value = e.table(**_kwargs(e.table, value, f"{prefix}{name}.", rel))
        elif e.path and e.toml == (list,):
            if not all(isinstance(r, str) for r in value):
                raise _fail(f"{prefix}{name}", "expected an array of paths")
            value = tuple(rel(r) for r in value)
        elif e.path:
            value = rel(value)
        out[e.attr] = value
    return out


def _item(e: Entry, item: object, where: str, rel: Callable[[str], Path]) -> Any:
    """One table of an array of tables (``[[disk]]``, ``backing = [{...}]``)."""
    assert e.table is not None  # noqa: S101 - only called for arrays of tables
    if not isinstance(item, dict):
        raise _fail(where, e.key.not_a_table or f"expected a table ([[{e.name}]])")
    return _indexed(e.table, _kwargs(e.table, item, f"{where}.", rel, e.key.missing), where)


def _indexed(cls: type[Any], entry: dict[str, Any], where: str) -> Any:
    try:
        return cls(**entry)
    except SpecError as err:
        key = (err.key or "").split(".", 1)[-1]
        raise SpecError(err.detail, key=f"{where}.{key}", hint=err.hint) from None


# ---------------------------------------------------------------- TOML out

def spec_to_mapping(spec: GuestSpec) -> dict[str, Any]:
    """The TOML keys of ``spec`` (paths absolute): spec_from_mapping's inverse,
    so a spec built in Python can go where a spec file goes (svirt start)."""
    return _mapping(spec)


def _mapping(obj: object) -> dict[str, Any]:
    cls: type = type(obj)
    return {e.name: _plain(v) for e in entries(cls)
            if (v := getattr(obj, e.attr)) is not None}


def _plain(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, Path | uuidlib.UUID):
        return str(v)
    if isinstance(v, tuple | list):
        return [_plain(i) for i in v]
    if hasattr(v, "__dataclass_fields__"):
        return _mapping(v)
    return v


def absolute_paths(data: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """``data`` (a spec's TOML, already valid) with every relative path made
    absolute against ``base``, exactly as :func:`spec_from_mapping` would
    resolve it: the same spec, readable from any directory (``svirt enable``)."""
    def rel(value: str) -> str:
        return value if Path(value).is_absolute() else str(base / value)

    return _absolute(GuestSpec, data, rel)


def _absolute(cls: type, table: Mapping[str, Any], rel: Callable[[str], str]) -> dict[str, Any]:
    known = entry_map(cls)
    out = dict(table)
    for name, value in table.items():
        e = known.get(name)
        if e is None:
            continue
        if e.table is not None and e.toml == (list,):
            out[name] = [_absolute(e.table, item, rel) for item in value]
        elif e.table is not None:
            out[name] = _absolute(e.table, value, rel)
        elif e.path and e.toml == (list,):
            out[name] = [rel(r) for r in value]
        elif e.path:
            out[name] = rel(value)
    return out


# ---------------------------------------------------------------- JSON Schema

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean",
               dict: "object", list: "array"}


def json_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of a spec file, for editors (``svirt schema``).

    It knows the keys, their types, defaults and bounds; the checks that look
    at several keys at once (a qcow2 layer below a raw one, vcpus for uml)
    are the reader's alone, so a file the schema accepts can still be refused.
    """
    defs: dict[str, Any] = {}
    root = _object_schema(GuestSpec, defs)
    return {"$schema": SCHEMA_DIALECT, "title": "svirt guest spec",
            **root, "$defs": dict(sorted(defs.items()))}


def schema_text() -> str:
    """:func:`json_schema` as the committed file holds it."""
    import json  # only here: loading a spec needs no JSON

    return json.dumps(json_schema(), indent=2) + "\n"


def _object_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    rows = entries(cls)
    out: dict[str, Any] = {"type": "object",
                           "properties": {e.name: _key_schema(e, defs) for e in rows},
                           "additionalProperties": False}
    if required := [e.name for e in rows if e.required]:
        out["required"] = required
    return out


def _key_schema(e: Entry, defs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"description": e.key.doc}
    if e.table is not None:
        name = e.table.__name__
        if name not in defs:
            defs[name] = {}  # a placeholder while it is made: no table holds itself
            defs[name] = _object_schema(e.table, defs)
        ref = {"$ref": f"#/$defs/{name}"}
        out.update({"type": "array", "items": ref} if e.toml == (list,) else ref)
        return {**out, **e.key.schema}
    if e.path and e.toml == (list,):
        out.update(type="array", items={"type": "string"})
    else:
        types = [_JSON_TYPES[t] for t in e.toml if not (t is int and float in e.toml)]
        out["type"] = types[0] if len(types) == 1 else types
    if e.choices is not None:
        out["enum"] = [m.value for m in e.choices]
    for word, value in (("minimum", e.key.minimum), ("maximum", e.key.maximum),
                        ("exclusiveMinimum", e.key.exclusive_minimum)):
        if value is not None:
            out[word] = value
    if e.default is not MISSING and e.default is not None:
        out["default"] = _plain(e.default)
    out.update(e.key.schema)
    return out
