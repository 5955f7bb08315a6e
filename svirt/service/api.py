"""The Python face of detached guests: ``svirt.start(spec)``, ``svirt.attach(name)``.

A :class:`GuestHandle` names a guest the registry's supervisor runs; it does
not own it (dropping the handle leaves the guest running, as ``svirt start``
does).  Its ``console`` is the same :class:`~svirt.launcher.supervisor.Console`
as a launched guest's (``expect``, ``send``, ``shell``), fed over an attached
console connection from the moment it is first used.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from svirt.agent import EXEC_SECONDS, ExecResult
from svirt.errors import SvirtError
from svirt.launcher.channels import AGENT_SOCKET, run_in_guest
from svirt.launcher.console import Console
from svirt.launcher.registry import Registry
from svirt.service.client import ask, open_console, orphaned
from svirt.spec import GuestSpec, read_spec_data, spec_from_mapping, spec_to_mapping


class GuestHandle:
    def __init__(self, name: str, registry: Registry | None = None,
                 info: dict[str, Any] | None = None) -> None:
        self.name = name
        self.registry = registry or Registry()
        self.info = info or {}
        self._console: Console | None = None
        self._sock: socket.socket | None = None

    def __repr__(self) -> str:
        return f"GuestHandle({self.name!r})"

    @property
    def pid(self) -> int | None:
        pid = self.info.get("pid")
        return int(pid) if pid is not None else None

    def status(self) -> dict[str, Any]:
        """state (running, backoff, stopped, failed), pid, uptime, labels,
        restarts, last outcome, usage."""
        self.info = ask(self.registry, {"op": "status", "name": self.name},
                        start=bool(orphaned(self.registry)))
        return self.info

    def stop(self, timeout: float | None = None) -> str:
        """The shutdown ladder; returns the outcome, e.g. "poweroff: ..."."""
        self._detach()
        answer = ask(self.registry, {"op": "stop", "name": self.name, "timeout": timeout},
                     start=False)
        return str(answer["outcome"])

    def kill(self) -> str:
        self._detach()
        return str(ask(self.registry, {"op": "kill", "name": self.name}, start=False)["outcome"])

    @property
    def console(self) -> Console:
        """Attached (for typing) on first use; output from then on (and the
        last 2 KB before it)."""
        if self._console is None:
            sock = open_console(self.registry, self.name)
            console = Console(self.name)

            def write(data: bytes, timeout: float) -> None:
                sock.settimeout(timeout)
                sock.sendall(data)

            console._writer = write
            threading.Thread(target=_pump, args=(sock, console), daemon=True,
                             name=f"svirt-attach-{self.name}").start()
            self._sock, self._console = sock, console
        return self._console

    def shell(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        return self.console.shell(command, timeout)

    def exec(self, argv: Sequence[str], *, input: bytes | None = None,
             timeout: float = EXEC_SECONDS) -> ExecResult:
        """As :meth:`svirt.launcher.launch.Guest.exec`: through the agent
        socket in the guest's run directory (root only)."""
        return run_in_guest(self.registry.run_dir(self.name) / AGENT_SOCKET, self.name, argv,
                            input=input, timeout=timeout)

    def _detach(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def detach(self) -> None:
        """Close the console connection (the guest runs on)."""
        self._detach()


def _pump(sock: socket.socket, console: Console) -> None:
    try:
        while data := sock.recv(65536):
            console.feed(data)
    except OSError:
        pass
    finally:
        console.close()
        sock.close()


def start(spec: GuestSpec | Mapping[str, Any] | str | Path, *, registry: Registry | None = None,
          wait_for: str | None = None, timeout: float = 60.0) -> GuestHandle:
    """Hand a guest to the registry's supervisor (started if needed); return
    once it runs (or ``wait_for`` appeared on its console)."""
    base: Path | None = None
    if isinstance(spec, GuestSpec):
        data = spec_to_mapping(spec)
    elif isinstance(spec, Mapping):
        data = dict(spec)
        spec_from_mapping(data)  # its errors here, not in the supervisor
    else:
        data, base, _shown = read_spec_data(spec)
        spec_from_mapping(data, base)
    registry = registry or Registry()
    answer = ask(registry, {"op": "start", "spec": data, "base": str(base) if base else None,
                            "wait_for": wait_for, "timeout": timeout})
    return GuestHandle(str(answer["name"]), registry, answer)


def attach(name: str, *, registry: Registry | None = None) -> GuestHandle:
    """A handle on a running detached guest (SvirtError if there is none)."""
    handle = GuestHandle(name, registry)
    handle.status()
    if handle.info.get("state") in ("stopped", "failed"):
        raise SvirtError(f"guest {name} is not running ({handle.info.get('state')})")
    return handle
