"""A launch's channels to its guest, as one object: console, control, pty.

:func:`console_output` says where the console's output goes (the caller's
sink, the spec's log file, the terminal, or a pty); :class:`GuestChannels`
holds both ends of the console and the control channel: the hypervisor's,
passed to the child at fixed fd numbers and closed here once it has them, and
the launcher's, closed on a failed launch or handed to the supervisor and the
:class:`~svirt.launcher.launch.Guest`.  A detached guest's channels are FIFOs
and a listening socket in its run directory (:mod:`svirt.launcher.channels`),
which a later supervisor opens again.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from svirt.backends.base import AGENT_FD, CONSOLE_FD, CONTROL_FD, FIRST_EXTRA_FD, Backend
from svirt.launcher.channels import console_fifos, listen_agent, listen_control
from svirt.launcher.console import file_sink, terminal_sink
from svirt.security.base import Label
from svirt.security.stack import SecurityStack
from svirt.spec import ConsoleMode, GuestSpec


@dataclass(frozen=True)
class ConsoleOutput:
    """Where the console's output goes, and the pty (mode "pty") it is
    written to: the launcher's master end and the slave's path."""

    sink: Callable[[bytes], None] | None
    pty_master: int | None = None
    pty_path: str | None = None


def console_output(spec: GuestSpec, roots: tuple[Path, ...],
                   sink: Callable[[bytes], None] | None, cleanup: ExitStack) -> ConsoleOutput:
    """The caller's ``sink``, else the spec's console log (opened now: the
    launch then holds that very inode), else the terminal; a pty console
    writes to its pty whatever else was asked."""
    if sink is None and spec.console.log is not None:
        sink, close_log = file_sink(spec.console.log, roots)
        cleanup.callback(close_log)
    elif sink is None and spec.console.mode is ConsoleMode.STDIO:
        sink = terminal_sink()  # filtered when stdout is a terminal
    if spec.console.mode is not ConsoleMode.PTY:
        return ConsoleOutput(sink)
    pty_master, pty_slave = os.openpty()
    path = os.ttyname(pty_slave)
    cleanup.callback(os.close, pty_slave)  # kept open: no EIO while detached
    return ConsoleOutput(_pty_sink(pty_master), pty_master, path)


def _pty_sink(master: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        try:
            os.write(master, data)
        except BlockingIOError:
            pass  # nobody reads the pty: drop, never stall the guest

    os.set_blocking(master, False)
    return write


class GuestChannels:
    """Both ends of a guest's console and control channel for one launch."""

    def __init__(self) -> None:
        self.console_io: socket.socket | tuple[int, int] | None = None
        self.hyp_in = self.hyp_out = -1  # the hypervisor's console: stdin-ish, stdout-ish
        self.control_parent: socket.socket | None = None
        self.control_child: socket.socket | None = None
        self.control_path: Path | None = None  # a detached QEMU's QMP listener
        self.agent_child: socket.socket | None = None  # the agent port's listener
        self.agent_path: Path | None = None
        self._parents = ExitStack()  # the launcher's ends, until the supervisor owns them
        self._hyp_ends = ExitStack()  # the hypervisor's ends, closed once it has them

    @classmethod
    def open(cls, backend: Backend, stack: SecurityStack, labels: Mapping[str, Label],
             run_root: Path, *, detached: bool, pty_master: int | None,
             cleanup: ExitStack, agent: bool = False) -> GuestChannels:
        """Sockets made with the guest's labels (SELinux MCS would deny the
        guest a reply to a socket at the launcher's level); everything is
        closed by ``cleanup`` unless :meth:`hand_over` was called.  ``agent``:
        a listening socket for the guest agent's port too (both kinds)."""
        self = cls()
        cleanup.enter_context(self._hyp_ends)
        control = backend.uses_control_socket()
        with stack.creating_sockets(labels):
            if not detached:
                console_parent, console_child = socket.socketpair()
                self.console_io = console_parent
                self._parents.callback(console_parent.close)
                self._hyp_ends.callback(console_child.close)
                self.hyp_in = self.hyp_out = console_child.fileno()
                if control:
                    self.control_parent, self.control_child = socket.socketpair()
            elif control:
                self.control_child, self.control_path = listen_control(run_root)
            if agent:
                self.agent_child, self.agent_path = listen_agent(run_root)
                cleanup.callback(self.agent_child.close)
        if detached:
            self.hyp_in, self.hyp_out, sup_read, sup_write = console_fifos(run_root, create=True)
            self.console_io = (sup_read, sup_write)
            self._parents.callback(os.close, sup_read)
            self._parents.callback(os.close, sup_write)
            self._hyp_ends.callback(os.close, self.hyp_in)
            self._hyp_ends.callback(os.close, self.hyp_out)
        if self.control_parent is not None:
            self._parents.callback(self.control_parent.close)
        if pty_master is not None:
            self._parents.callback(os.close, pty_master)
        cleanup.enter_context(self._parents)
        if self.control_child is not None:
            cleanup.callback(self.control_child.close)
        return self

    @property
    def console(self) -> socket.socket | tuple[int, int]:
        """The launcher's end of the console: a socket, or a detached
        guest's FIFOs (read, write)."""
        if self.console_io is None:
            raise RuntimeError("the channels are not open")
        return self.console_io

    def child_fds(self, tap_fds: tuple[int, ...]) -> dict[int, int]:
        """Child fd number -> the launcher's fd, for the spawn."""
        fds = {CONSOLE_FD: self.hyp_in}
        if self.control_child is not None:
            fds[CONTROL_FD] = self.control_child.fileno()
        for i, fd in enumerate(tap_fds):
            fds[FIRST_EXTRA_FD + i] = fd
        if self.agent_child is not None:
            fds[AGENT_FD] = self.agent_child.fileno()
        return fds

    def hypervisor_has_them(self) -> None:
        """The hypervisor runs: the launcher's copies of its ends are closed."""
        self._hyp_ends.close()
        if self.control_child is not None:
            self.control_child.close()
        if self.agent_child is not None:
            self.agent_child.close()

    def hand_over(self) -> None:
        """The supervisor and the Guest own the launcher's ends from now on."""
        self._parents.pop_all()
