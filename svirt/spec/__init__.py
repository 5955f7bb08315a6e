"""GuestSpec: what a guest is, as frozen data validated once.

A spec is built in Python (``GuestSpec(name=..., ...)``) or loaded from TOML
(:func:`load_spec`); both give the same object.  Every later step trusts it.
Errors name the source file (when there is one), the key and what is wrong.

Validation is pure: it looks at the values, never at the host (relative
paths are made absolute, nothing is opened or stat'ed), so a spec can be
built and checked for another host.  Whether the files it names exist and
the host has the memory it asks for is :mod:`svirt.preflight`'s job, done
by ``svirt check`` and before every launch.

The package: :mod:`~svirt.spec.values` (enums, limits, the checks of one
value), :mod:`~svirt.spec.keys` (the one declaration of a key),
:mod:`~svirt.spec.model` (the dataclasses; ``[cloud_init]`` in
:mod:`~svirt.spec.guest_services`), :mod:`~svirt.spec.schema` (the
TOML reader, its inverse, absolute paths and the JSON Schema, all derived
from the declaration), :mod:`~svirt.spec.files` (reading a spec file) and
:mod:`~svirt.spec.boot` (a kernel or firmware, cdroms, the NVRAM store).
"""

from svirt.spec.boot import MAX_CDROMS, BootFrom, Cdrom, Firmware, firmware_of
from svirt.spec.files import _read_spec_file, in_file, load_spec, read_spec_data
from svirt.spec.guest_services import CloudInit
from svirt.spec.model import (
    Backing,
    Console,
    Disk,
    GuestSpec,
    Limits,
    Nic,
    Security,
)
from svirt.spec.schema import (
    absolute_paths,
    json_schema,
    schema_text,
    spec_from_mapping,
    spec_to_mapping,
)
from svirt.spec.values import (
    APPARMOR_GENERATED_PREFIX,
    BRIDGE_RE,
    CPUS_RE,
    MAC_RE,
    MAX_CPUS,
    MAX_PIDS,
    MAX_SPEC_BYTES,
    MIN_MEMORY_MIB,
    MIN_PIDS,
    NAME_RE,
    NETNS_RE,
    Accel,
    Backend,
    ConsoleMode,
    DiskFormat,
    Restart,
    SecurityModel,
    apparmor_profile_problem,
    os_reason,
    parse_cpus,
    parse_memory,
    show_path,
    show_value,
    smack_label_valid,
)

__all__ = [
    "APPARMOR_GENERATED_PREFIX", "BRIDGE_RE", "CPUS_RE", "MAC_RE", "MAX_CPUS", "MAX_PIDS",
    "MAX_SPEC_BYTES", "MIN_MEMORY_MIB", "MIN_PIDS", "NAME_RE", "NETNS_RE",
    "Accel", "Backend", "Backing", "CloudInit", "Console", "ConsoleMode", "Disk", "DiskFormat",
    "MAX_CDROMS", "BootFrom", "Cdrom", "Firmware", "firmware_of",
    "GuestSpec", "Limits", "Nic", "Restart", "Security", "SecurityModel",
    "_read_spec_file", "absolute_paths", "apparmor_profile_problem", "in_file",
    "json_schema", "load_spec", "os_reason", "parse_cpus", "parse_memory",
    "read_spec_data", "schema_text", "show_path", "show_value", "smack_label_valid",
    "spec_from_mapping", "spec_to_mapping",
]
