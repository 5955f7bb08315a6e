"""The one declaration of a spec's keys: a dataclass field and its :class:`Key`.

Every field of the spec's dataclasses is declared with :func:`key` (its doc,
its TOML name when that differs, bounds); its TOML types, default, whether
it is a path and which table it opens are read from the field's annotation.
:func:`entries` gives the result as :class:`Entry` rows, from which the TOML
reader's checks, ``spec_to_mapping``, the absolute-path rewriting and the
JSON Schema are derived (:mod:`svirt.spec.schema`), so a new key is one
field and its ``__post_init__`` check.
"""

from __future__ import annotations

import enum
import functools
import typing
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType, NoneType, UnionType
from typing import Any

_META = "svirt.spec"


@dataclass(frozen=True)
class Key:
    """What a field's annotation does not say about its TOML key."""

    doc: str
    name: str | None = None  # the TOML key, when not the field's name (disks: disk)
    toml: tuple[type, ...] | None = None  # the TOML types, when more than the annotation's
    required: bool = False  # in TOML, although the dataclass has a default
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    schema: Mapping[str, Any] = field(default_factory=dict)  # more JSON Schema words
    #: for an array of tables: the message for an item that is not a table, and
    #: for a missing required key (at the item, not the key); None: the usual ones
    not_a_table: str | None = None
    missing: str | None = None


def key(doc: str, default: Any = MISSING, *, factory: Any = MISSING, **more: Any) -> Any:
    """A dataclass field with its :class:`Key` (``more``: Key's other fields)."""
    meta = {_META: Key(doc, **more)}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Entry:
    """One TOML key of a table, derived from its field."""

    attr: str  # the dataclass field
    name: str  # the TOML key
    toml: tuple[type, ...]  # the TOML types it accepts, in the order messages name them
    key: Key
    default: Any  # MISSING: none (required, or made by a factory)
    required: bool
    path: bool = False  # a path, or an array of paths, relative to the spec file
    choices: type[enum.StrEnum] | None = None
    table: type | None = None  # a table of this dataclass, or (array) of tables


@functools.cache
def entries(cls: type) -> tuple[Entry, ...]:
    """The TOML keys of one of the spec's dataclasses, in field order."""
    hints = typing.get_type_hints(cls)
    return tuple(_entry(f, hints[f.name]) for f in fields(cls))


@functools.cache
def entry_map(cls: type) -> Mapping[str, Entry]:
    """The TOML keys of one of the spec's dataclasses, by name (read only)."""
    return MappingProxyType({e.name: e for e in entries(cls)})


@functools.cache
def bounds(cls: type, attr: str) -> tuple[Any, Any]:
    """A field's declared (minimum, maximum): the check and the schema share them."""
    meta = _meta(next(f for f in fields(cls) if f.name == attr))
    return meta.minimum, meta.maximum


def _meta(f: Field[Any]) -> Key:
    meta = f.metadata.get(_META)
    if not isinstance(meta, Key):
        raise TypeError(f"spec field {f.name} is not declared with key()")
    return meta


def _entry(f: Field[Any], hint: Any) -> Entry:
    meta = _meta(f)
    args = typing.get_args(hint)
    if isinstance(hint, UnionType):  # X | None
        hint = next(a for a in args if a is not NoneType)
        args = typing.get_args(hint)
    common: dict[str, Any] = {"attr": f.name, "name": meta.name or f.name, "key": meta,
                              "default": f.default,
                              "required": meta.required or (f.default is MISSING
                                                            and f.default_factory is MISSING)}
    if typing.get_origin(hint) is tuple:  # tuple[X, ...]: an array
        item = args[0]
        return Entry(toml=(list,), path=item is Path,
                     table=typing.cast(type, item) if is_dataclass(item) else None, **common)
    if is_dataclass(hint):
        return Entry(toml=(dict,), table=typing.cast(type, hint), **common)
    if typing.get_origin(hint) in (dict, Mapping):  # a free table of values (meta_data)
        return Entry(toml=(dict,), **common)
    if isinstance(hint, type) and issubclass(hint, enum.StrEnum):
        return Entry(toml=meta.toml or (str,), choices=hint, **common)
    plain: dict[Any, tuple[type, ...]] = {
        bool: (bool,), int: (int,), float: (int, float), str: (str,),
        Path: (str,), uuidlib.UUID: (str,)}
    return Entry(toml=meta.toml or plain[hint], path=hint is Path, **common)
