"""Units for an init system: guests at boot, and one guest run by systemd.

The texts are package data (``svirt/data/``) with ``@WORD@`` placeholders:

- ``svirt-guests.service`` (``svirt unit --boot``): a oneshot that runs
  ``svirt start --enabled`` at boot and ``svirt stop --all`` at shutdown.
  ``RemainAfterExit=yes`` keeps it active once the start command has exited,
  so systemd leaves the supervisor (started with ``setsid -f``, still in the
  unit's cgroup) and its guests alone until the unit stops; ``ExecStart=-``
  keeps it active when a guest failed to start, because a unit that fails
  to start is killed (cgroup and all) and its ``ExecStop=`` never runs.
- ``svirt-guests.init`` (``svirt unit --boot --sysv``): the same two
  commands as an LSB init script.
- ``svirt-guest.service`` (``svirt unit NAME``): ``svirt run`` of one
  enabled guest, in the foreground; ``KillMode=mixed`` so that SIGTERM goes
  to svirt alone, which runs the shutdown ladder.

Placeholders: ``@SVIRT@`` the svirt command (an absolute path), ``@ENVIRONMENT@``
svirt's ``SVIRT_*`` variables that are set where the unit is generated (a
private registry, another host config), ``@NAME@``, ``@SPEC@``,
``@TIMEOUT_STOP@``.

Limits: there is no running systemd here, so the units are checked with
``systemd-analyze verify`` only (tests/integration/test_autostart.py), and
the cgroup behaviour above is systemd's documented one, not observed.  A
supervisor is started by whichever svirt command first needs it: after the
boot one has gone idle, a ``svirt start`` from a login shell starts one in
that session's scope, and where its guests stay in that cgroup (cgroup v1's
name=systemd tree) the scope's stop at shutdown SIGTERMs them, racing ``ExecStop=``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from importlib import resources
from pathlib import Path

from svirt.errors import HostError
from svirt.service.enabled import enabled_spec

#: the variables that choose svirt's registry, config and enabled guests
ENVIRONMENT = ("SVIRT_CONFIG", "SVIRT_RUN_DIR", "SVIRT_STATE_DIR", "SVIRT_CLAIMS_DIR",
               "SVIRT_ENABLED_DIR", "SVIRT_UID_BASE")
#: the shutdown ladder after the graceful step (hard 5 s, SIGTERM 5 s, SIGKILL
#: up to 30 s), rounded up
LADDER_SECONDS = 60


def template(name: str) -> str:
    return resources.files("svirt").joinpath("data", name).read_text(encoding="utf-8")


def svirt_command() -> str:
    """The absolute path of the svirt command that runs now (else the one on PATH)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    candidates = [argv0 if argv0 is not None and argv0.name == "svirt" else None,
                  Path(sys.executable).with_name("svirt")]
    found = shutil.which("svirt")
    candidates.append(Path(found) if found else None)
    for path in candidates:
        if path is not None and path.is_file() and os.access(path, os.X_OK):
            return os.path.abspath(path)
    raise HostError("cannot find the svirt command to put in the unit",
                    hint="install svirt (pip install .), or put its bin directory on PATH")


def _settings() -> list[tuple[str, str]]:
    out = []
    for key in ENVIRONMENT:
        value = os.environ.get(key)
        if value:
            _check_value(key, value)
            out.append((key, value))
    return out


def _check_value(what: str, value: str) -> None:
    if not value.isprintable():
        raise HostError(f"{what}: {value!r} has control characters; a unit cannot hold it")


def systemd_word(value: str, *, command: bool = True) -> str:
    """One word of a systemd command line (or with ``command=False`` of an
    ``Environment=`` line): quoted when it must be, ``%`` (specifiers)
    escaped, and on a command line ``$`` (variables) too."""
    _check_value("unit", value)
    escaped = value.replace("%", "%%")
    if command:
        escaped = escaped.replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./$-]+", escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _environment_lines() -> str:
    return "".join(f"Environment={systemd_word(f'{k}={v}', command=False)}\n"
                   for k, v in _settings())


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    leftover = re.search(r"@[A-Z_]+@", text)
    if leftover:  # a template and this module disagree: a bug
        raise HostError(f"unit template: {leftover.group()} has no value")
    return text


def boot_unit() -> str:
    """``svirt-guests.service``."""
    env = _environment_lines()
    return _fill(template("svirt-guests.service"),
                 {"SVIRT": systemd_word(svirt_command()), "ENVIRONMENT": env})


def boot_script() -> str:
    """``/etc/init.d/svirt-guests``."""
    env = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in _settings())
    return _fill(template("svirt-guests.init"),
                 {"SVIRT": shlex.quote(svirt_command()), "ENVIRONMENT": env})


def guest_unit(name: str) -> str:
    """A unit that runs enabled guest ``name`` with ``svirt run``."""
    path, spec = enabled_spec(name)
    env = _environment_lines()
    timeout = int(spec.shutdown_timeout + 0.999) + LADDER_SECONDS
    return _fill(template("svirt-guest.service"),
                 {"SVIRT": systemd_word(svirt_command()), "ENVIRONMENT": env, "NAME": name,
                  "SPEC": systemd_word(str(path)), "TIMEOUT_STOP": str(timeout)})
