"""The spec's tables for what a guest gets beside its hardware: ``[cloud_init]``.

Declared like every other table (:func:`~svirt.spec.keys.key`); the seed
itself is built at launch by :mod:`svirt.images.seed`, which checks its
contents and bounds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from svirt.spec.keys import key
from svirt.spec.values import _fail, _path, _show

#: a meta-data key cloud-init reads (svirt/images/seed.py checks the same)
_META_KEY = re.compile(r"[a-z][a-z0-9_-]{0,63}")


@dataclass(frozen=True)
class CloudInit:
    """``[cloud_init]``: the NoCloud seed svirt builds for the guest at launch
    (svirt/images/seed.py: contents, bounds; read-only, for this guest alone)."""

    user_data: str | None = key("user-data, inline (#cloud-config, a #! script, ...)", None)
    user_data_file: Path | None = key("user-data from a file (under an image root)", None)
    meta_data: Mapping[str, str | int | bool] = key(
        "meta-data keys (instance-id defaults to the uuid, local-hostname to the name)",
        factory=dict,
        schema={"additionalProperties": {"type": ["string", "integer", "boolean"]}})
    network_config: str | None = key("network-config (cloud-init v1 or v2), inline", None)
    network_config_file: Path | None = key("network-config from a file (under an image root)",
                                           None)
    ssh_authorized_keys: tuple[str, ...] = key(
        "OpenSSH public keys added to the default user's", (),
        schema={"items": {"type": "string"}, "maxItems": 256})

    def __post_init__(self) -> None:
        for text, path in (("user_data", "user_data_file"),
                           ("network_config", "network_config_file")):
            value, file = getattr(self, text), getattr(self, path)
            if value is not None and not isinstance(value, str):
                raise _fail(f"cloud_init.{text}", f"expected a string, got {_show(value)}")
            if file is not None:
                object.__setattr__(self, path, _path(f"cloud_init.{path}", file))
            if value is not None and file is not None:
                raise _fail(f"cloud_init.{text}", f"give {text} or {path}, not both")
        meta = self.meta_data
        if not isinstance(meta, Mapping) or not all(
                isinstance(k, str) and _META_KEY.fullmatch(k)
                and isinstance(v, str | int | bool) for k, v in meta.items()):
            raise _fail("cloud_init.meta_data", "expected a table of lower-case keys with "
                        "string, integer or boolean values")
        object.__setattr__(self, "meta_data", dict(meta))
        keys = self.ssh_authorized_keys
        if not isinstance(keys, tuple | list) or not all(isinstance(k, str) for k in keys) \
                or len(keys) > 256:
            raise _fail("cloud_init.ssh_authorized_keys",
                        "expected a list of at most 256 public key lines")
        object.__setattr__(self, "ssh_authorized_keys", tuple(keys))
