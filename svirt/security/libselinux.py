"""Load libselinux's Python bindings (Debian's python3-selinux).

The PyPI ``selinux`` shim is meant to find the system bindings from inside a
virtualenv, but on Debian and Ubuntu it deliberately loads nothing (it
assumes those systems do not run SELinux).  svirt needs the real bindings
whenever the SELinux driver is used, so it falls back to loading them from
the system's dist-packages directly.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

from svirt.errors import SecurityError

SYSTEM_DIRS = (Path("/usr/lib/python3/dist-packages"),
               Path(f"/usr/lib/python3.{sys.version_info.minor}/site-packages"))


@cache
def libselinux() -> ModuleType:
    import selinux

    if hasattr(selinux, "getcon"):
        return selinux  # type: ignore[no-any-return]
    for base in SYSTEM_DIRS:
        init = base / "selinux" / "__init__.py"
        if not init.exists():
            continue
        spec = importlib.util.spec_from_file_location(
            "svirt_libselinux", init, submodule_search_locations=[str(init.parent)])
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules["svirt_libselinux"] = module
        spec.loader.exec_module(module)
        if hasattr(module, "getcon"):
            return module
    raise SecurityError(
        "libselinux's Python bindings are not installed",
        hint="apt-get install python3-selinux",
    )
