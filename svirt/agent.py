"""A client for the QEMU guest agent: run commands and copy files in a guest.

qemu-ga speaks QMP-style JSON, one message a line, over the virtio-serial
port ``org.qemu.guest_agent.0``; the host reaches it as a unix socket that
the launcher binds in a root-only directory and hands to QEMU as an fd.
Whatever comes back is the guest's, so every exchange here:

- has ONE :class:`~svirt.deadline.Deadline` for the whole of it (a sync,
  the command, every status poll, every chunk of a copy), and each reply in
  it also waits at most :data:`REPLY_SECONDS`: a peer that stalls mid-line,
  trickles, or never says ``exited`` is cut off in time;
- reads each reply against a size bound (:data:`SMALL_REPLY`, the output
  bound, the chunk) and an item bound (:data:`MAX_JSON_ITEMS`) before parsing
  it, and discards at most :data:`SYNC_DISCARD` bytes while it
  resynchronises; a line is scanned once, so parsing is linear;
- checks every field it uses (types, ranges, the reply's ``id``, base64
  strictly decoded and bounded before it is decoded); output is returned as
  bytes, never interpreted, and guest text in an error message is escaped
  onto one line.

Any violation is one :class:`~svirt.errors.AgentError` (one line), never a
hang, never memory beyond the bounds.  Each operation starts with
``guest-sync-delimited`` (:meth:`AgentClient.sync`): old garbage is never an
answer.  Exit statuses (:func:`exit_status`) are podman's: the command's,
128+N for signal N, 125 svirt/agent failed, 126 cannot run, 127 not found.

"""

from __future__ import annotations

import binascii
import json
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from svirt.deadline import Deadline, recv, send_all
from svirt.errors import AgentError, ControlError, GuestCommandNotExecutable, GuestCommandNotFound
from svirt.termsafe import escape_text

#: the virtio-serial port qemu-ga opens in the guest
PORT_NAME = "org.qemu.guest_agent.0"
#: default deadlines: a small exchange (sync, ping, info), a command run by
#: :meth:`AgentClient.exec` start to exit, a whole file copy
AGENT_SECONDS, EXEC_SECONDS, COPY_SECONDS = 10.0, 300.0, 600.0
#: one request and its reply in any exchange (qemu-ga answers in milliseconds)
REPLY_SECONDS = 10.0
#: a reply to a small call (ping, sync, info, exec, open, write, close);
#: qemu-ga 7.2's guest-info is under 5 KiB
SMALL_REPLY = 64 << 10
#: stdout + stderr of one command, decoded (qemu-ga itself keeps 16 MiB of
#: each and says ``out-truncated``); more is an AgentError: copy big output
#: through a file in the guest instead
MAX_OUTPUT = 16 << 20
#: stdin of one command (sent as one base64 message)
MAX_INPUT = 16 << 20
#: one guest-file-read / guest-file-write (qemu-ga 7.2 refuses reads over 48 MiB)
FILE_CHUNK = 1 << 20
#: a file copied from the guest, by default (the caller may raise it)
MAX_COPY = 1 << 30
#: bytes dropped looking for the sync sentinel (a stale reply: up to 2 x 16 MiB)
SYNC_DISCARD = 64 << 20
#: guest-file-read replies in a row with no data and no eof
MAX_EMPTY_READS = 100
#: the most ``{ [ ,`` bytes in a reply: ``[{},...]`` costs ~20x its size parsed
MAX_JSON_ITEMS = 4096  # qemu-ga's largest honest reply (guest-info) has ~400
#: guest-exec-status polls: the first wait, doubling up to the last
POLL_FIRST, POLL_MAX = 0.001, 0.1
SENTINEL = b"\xff"
_RECV = 1 << 20
_INT64 = 1 << 63


def _ascii_b64_len(size: int) -> int:
    return 4 * ((size + 2) // 3)


def _reply_deadline(deadline: Deadline, what: str) -> Deadline:
    """One reply's deadline: :data:`REPLY_SECONDS`, but never past the
    exchange's (and then named after it: "no answer within 2 s")."""
    sub = Deadline(REPLY_SECONDS, what)
    if sub.end > deadline.end:
        sub.end, sub.seconds = deadline.end, deadline.seconds
    return sub


def _guest_text(value: object, limit: int = 200) -> str:
    """Something the agent said, for a one-line message (escaped, cut)."""
    text = value if isinstance(value, str) else repr(value)
    return escape_text(text[:limit]) + ("..." if len(text) > limit else "")


def _int(value: object, low: int, high: int, what: str) -> int:
    """``value`` when it is a JSON integer in [low, high] (bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise AgentError(f"guest agent: {what} is not an integer in [{low}, {high}]: "
                         f"{_guest_text(value, 40)}")
    return value


def _b64(value: object, limit: int, what: str) -> bytes:
    """``value`` decoded from strict base64, refused before decoding when its
    text already says it holds more than ``limit`` bytes."""
    if not isinstance(value, str):
        raise AgentError(f"guest agent: {what} is not a base64 string")
    if len(value) > _ascii_b64_len(max(0, limit)):
        raise AgentError(f"guest agent: {what} over {limit} bytes")
    try:
        data = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError) as err:
        raise AgentError(f"guest agent: {what} is not valid base64") from err
    if len(data) > limit:  # the padding allows 2 more
        raise AgentError(f"guest agent: {what} over {limit} bytes")
    return data


def _c_string(value: object, what: str) -> str:
    """``value`` when qemu-ga can take it whole: a str of UTF-8 without NUL."""
    if not isinstance(value, str) or "\0" in value:
        raise AgentError(f"guest agent: {what} must be a string without NUL bytes",
                         hint="qemu-ga passes C strings: a NUL would cut the value short")
    try:
        value.encode()
    except UnicodeEncodeError as err:
        raise AgentError(f"guest agent: {what} is not valid UTF-8") from err
    return value


class AgentRefused(AgentError):
    """The agent answered a request with an error reply (``desc``: its words,
    raw; the message has them escaped).  The channel is still in sync."""

    def __init__(self, message: str, desc: str) -> None:
        super().__init__(message)
        self.desc = desc


class ExecResult(subprocess.CompletedProcess[bytes]):
    """A command's end: ``returncode`` (``-N`` when signal N ended it, as
    subprocess does), ``stdout`` and ``stderr`` as bytes, apart, and whether
    qemu-ga cut either (it keeps 16 MiB of each)."""

    def __init__(self, args: list[str], returncode: int, stdout: bytes, stderr: bytes,
                 *, stdout_truncated: bool = False, stderr_truncated: bool = False) -> None:
        super().__init__(args, returncode, stdout, stderr)
        self.stdout_truncated = stdout_truncated
        self.stderr_truncated = stderr_truncated


@dataclass(frozen=True)
class AgentInfo:
    """``guest-info``: the agent's version and the commands it has enabled."""

    version: str
    commands: frozenset[str]


def exit_status(outcome: subprocess.CompletedProcess[bytes] | BaseException) -> int:
    """What ``svirt exec`` exits with (podman's convention): the command's
    status, 128+N for signal N, 126/127 when it could not run / was not
    found, 125 for any other failure of svirt or the agent."""
    if isinstance(outcome, subprocess.CompletedProcess):
        code = outcome.returncode
        return code if code >= 0 else 128 + min(-code, 127)
    if isinstance(outcome, AgentError):
        return outcome.exit_status
    return 125


def spawn_error(refused: AgentRefused, argv: Sequence[str]) -> AgentError:
    """The error for qemu-ga's refusal to start ``argv``.  qemu-ga 7.2 wraps
    GLib's (untranslated) message: ``... error was 'Failed to execute child
    process "nosuch" (No such file or directory)'``; ENOENT is 127, any
    other spawn failure (EACCES, ENOEXEC, EISDIR) 126; any other refusal
    (guest-exec disabled, a bad argument) stays 125."""
    desc = refused.desc
    if "Failed to execute child process" not in desc:
        return refused
    shown = f"guest agent: cannot run {_guest_text(argv[0], 100)}: {_guest_text(desc)}"
    if "(No such file or directory)" in desc:
        return GuestCommandNotFound(shown)
    return GuestCommandNotExecutable(shown)


class AgentClient:
    """qemu-ga on a connected stream socket; one operation at a time.

    ``timeout`` is the default deadline of the small exchanges; exec and the
    copies take their own.  The socket stays the caller's (close it after)."""

    def __init__(self, sock: socket.socket, *, timeout: float = AGENT_SECONDS) -> None:
        self._sock = sock
        self._timeout = timeout
        self._buf, self._scanned = bytearray(), 0  # _scanned: searched for a newline
        self._next_id = secrets.randbelow(1 << 30)
        self._in_sync = False  # the last request's reply was read whole

    def _recv(self, size: int, deadline: Deadline) -> bytes:
        try:
            return recv(self._sock, size, deadline)
        except ControlError as err:
            raise AgentError(err.message) from err

    def _send(self, data: bytes, deadline: Deadline) -> None:
        try:
            send_all(self._sock, data, deadline)
        except ControlError as err:
            raise AgentError(err.message) from err

    def _fill(self, size: int, deadline: Deadline, what: str) -> None:
        chunk = self._recv(size, deadline)
        if not chunk:
            middle = " mid-reply" if self._buf else ""
            raise AgentError(f"{what}: the agent closed the channel{middle}")
        self._buf += chunk

    def _read_line(self, deadline: Deadline, limit: int, what: str) -> bytearray:
        """One line (without its newline) of at most ``limit`` bytes; the
        buffer is searched only where it was not searched before."""
        while True:
            end = self._buf.find(b"\n", self._scanned)
            if end >= 0:
                if end > limit:
                    raise AgentError(f"{what}: a reply over {limit} bytes")
                if end + 1 == len(self._buf):  # the usual case: no copy
                    line, self._buf = self._buf, bytearray()
                    del line[end:]
                else:
                    line = self._buf[:end]
                    del self._buf[:end + 1]
                self._scanned = 0
                return line
            self._scanned = len(self._buf)
            if self._scanned > limit:
                raise AgentError(f"{what}: a reply over {limit} bytes")
            self._fill(min(_RECV, limit + 1 - self._scanned), deadline, what)

    @staticmethod
    def _parse(line: bytearray, what: str) -> dict[str, Any]:
        items = line.count(b"{") + line.count(b"[") + line.count(b",")
        if items > MAX_JSON_ITEMS:
            raise AgentError(f"{what}: not JSON to parse: {items} items (at most "
                             f"{MAX_JSON_ITEMS})")
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
            raise AgentError(f"{what}: not JSON: {_guest_text(bytes(line[:60]))}") from err
        if not isinstance(msg, dict):
            raise AgentError(f"{what}: not a JSON object: {_guest_text(str(msg)[:60])}")
        return msg

    def _call(self, command: str, arguments: dict[str, Any] | None, deadline: Deadline,
              limit: int = SMALL_REPLY) -> Any:
        """Send one request and return its ``return`` value; an ``error``
        reply is an AgentError (the channel stays in sync)."""
        rid = self._next_id = self._next_id + 1
        what = f"guest agent {command}"
        sub = _reply_deadline(deadline, what)
        request: dict[str, Any] = {"execute": command, "id": rid}
        if arguments:
            request["arguments"] = arguments
        self._in_sync = False
        self._send(json.dumps(request).encode() + b"\n", sub)
        reply = self._parse(self._read_line(sub, limit, what), what)
        if reply.get("id") != rid:
            raise AgentError(f"{what}: a reply to another request "
                             f"(id {_guest_text(reply.get('id'), 40)})")
        self._in_sync = not self._buf
        if "error" in reply:
            error = reply["error"]
            desc = error.get("desc", error) if isinstance(error, dict) else error
            text = desc[:1000] if isinstance(desc, str) else repr(desc)[:1000]
            raise AgentRefused(f"{what}: {_guest_text(desc)}", text)
        if "return" not in reply:
            raise AgentError(f"{what}: a reply without a return value")
        return reply["return"]

    def _discard_to_sentinel(self, deadline: Deadline, budget: int) -> int:
        """Drop everything up to and with the next 0xFF; the budget left."""
        while True:
            at = self._buf.find(SENTINEL)
            if at >= 0:
                del self._buf[:at + 1]
                return budget - at - 1
            budget -= len(self._buf)
            self._buf.clear()
            if budget <= 0:
                raise AgentError(f"guest agent: no sync sentinel in {SYNC_DISCARD} bytes")
            self._fill(min(_RECV, budget), deadline, "guest agent sync")

    def sync(self, deadline: Deadline | None = None) -> None:
        """``guest-sync-delimited``: afterwards the next line is ours.

        0xFF goes first (qemu-ga's parser drops a half-read request, and
        answers the stray byte with an error that is discarded).  Replies
        are skipped up to the agent's 0xFF; the line after it must echo our
        random token, else the search goes on, within the deadline and
        :data:`SYNC_DISCARD` bytes."""
        deadline = deadline or Deadline(self._timeout, "guest agent sync")
        sub = _reply_deadline(deadline, "guest agent sync")
        token = secrets.randbelow(_INT64 - 1) + 1
        self._buf, self._scanned, self._in_sync = bytearray(), 0, False
        request = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
        self._send(SENTINEL + json.dumps(request).encode() + b"\n", sub)
        budget = SYNC_DISCARD
        while True:
            if budget <= 0:
                raise AgentError(f"guest agent: not in sync after {SYNC_DISCARD} bytes")
            budget = self._discard_to_sentinel(sub, budget)
            line = self._read_line(sub, SMALL_REPLY, "guest agent sync")
            budget -= len(line) + 1
            cut = line.rfind(SENTINEL)  # a sentinel inside the line: start again there
            if cut >= 0:
                del line[:cut + 1]
            try:
                reply = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(reply, dict) and reply.get("return") == token:
                self._in_sync = not self._buf
                return

    def _begin(self, timeout: float | None, what: str) -> Deadline:
        """The operation's one deadline, and the sync that starts it."""
        deadline = Deadline(self._timeout if timeout is None else timeout, what)
        self.sync(deadline)
        return deadline

    def ping(self, timeout: float | None = None) -> None:
        """``guest-ping``: the agent is there and answers."""
        deadline = self._begin(timeout, "guest agent ping")
        self._call("guest-ping", None, deadline)

    def info(self, timeout: float | None = None) -> AgentInfo:
        """``guest-info``: version and enabled commands (bounded, checked)."""
        deadline = self._begin(timeout, "guest agent info")
        ret = self._call("guest-info", None, deadline)
        if not isinstance(ret, dict) or not isinstance(ret.get("version"), str):
            raise AgentError("guest agent guest-info: no version")
        listed = ret.get("supported_commands")
        if not isinstance(listed, list):
            raise AgentError("guest agent guest-info: no command list")
        names = {c["name"] for c in listed
                 if isinstance(c, dict) and c.get("enabled") is True
                 and isinstance(c.get("name"), str) and len(c["name"]) <= 128}
        return AgentInfo(_guest_text(ret["version"], 64), frozenset(names))

    def exec(self, argv: Sequence[str], *, input: bytes | None = None,
             timeout: float = EXEC_SECONDS, max_output: int = MAX_OUTPUT) -> ExecResult:
        """Run ``argv`` in the guest (a path or a name qemu-ga looks up in its
        PATH, then the arguments: a list, never a shell string) with
        ``input`` on its stdin (else /dev/null), wait for it within
        ``timeout`` (sync, start and every poll), and return its status and
        its stdout and stderr apart.  At the deadline the command is left
        running in the guest: qemu-ga 7.2 has no call to kill it."""
        args = [_c_string(a, f"argv[{i}]") for i, a in enumerate(argv)]
        if not args:
            raise AgentError("guest agent: an empty command")
        if input is not None and len(input) > MAX_INPUT:
            raise AgentError(f"guest agent: stdin over {MAX_INPUT} bytes",
                             hint="copy the data into the guest first (svirt cp)")
        deadline = self._begin(timeout, f"guest agent: {_guest_text(args[0], 60)}")
        request: dict[str, Any] = {"path": args[0], "arg": args[1:], "capture-output": True}
        if input is not None:
            request["input-data"] = binascii.b2a_base64(input, newline=False).decode()
        try:
            ret = self._call("guest-exec", request, deadline)
        except AgentRefused as err:
            raise spawn_error(err, args) from err
        if not isinstance(ret, dict):
            raise AgentError("guest agent guest-exec: no pid")
        pid = _int(ret.get("pid"), 1, _INT64 - 1, "guest-exec's pid")
        return self._wait(args, pid, deadline, max_output)

    def _wait(self, args: list[str], pid: int, deadline: Deadline,
              max_output: int) -> ExecResult:
        """Poll ``guest-exec-status`` with a growing pause until it exited."""
        limit = _ascii_b64_len(max_output) + 8 + SMALL_REPLY  # both streams, padded
        pause = POLL_FIRST
        while True:
            status = self._call("guest-exec-status", {"pid": pid}, deadline, limit)
            if not isinstance(status, dict) or not isinstance(status.get("exited"), bool):
                raise AgentError("guest agent guest-exec-status: no 'exited'")
            if status["exited"]:
                return _result(args, status, max_output)
            time.sleep(min(pause, deadline.left()))
            if deadline.expired:
                raise AgentError(f"guest agent: {_guest_text(args[0], 60)} (pid {pid}) did "
                                 f"not exit within {deadline.seconds:g} s")
            pause = min(pause * 2, POLL_MAX)

    def _open(self, path: str, mode: str, deadline: Deadline) -> int:
        ret = self._call("guest-file-open",
                         {"path": _c_string(path, "the guest path"), "mode": mode}, deadline)
        return _int(ret, 0, _INT64 - 1, "guest-file-open's handle")

    def _close(self, handle: int, deadline: Deadline, failed: bool) -> None:
        """Close ``handle``; after a failure only when the channel is in sync
        and time is left (the error that got us here is the one to report)."""
        if failed and (not self._in_sync or deadline.expired):
            return
        try:
            self._call("guest-file-close", {"handle": handle}, deadline)
        except AgentError:
            if not failed:
                raise

    def copy_from_guest(self, path: str, out: BinaryIO, *, timeout: float = COPY_SECONDS,
                        max_bytes: int = MAX_COPY, chunk: int = FILE_CHUNK) -> int:
        """Copy the guest's file ``path`` into ``out`` (written as it comes),
        at most ``max_bytes``, within ``timeout``; the number of bytes."""
        deadline = self._begin(timeout, f"guest agent: copy from {_guest_text(path, 60)}")
        handle = self._open(path, "r", deadline)
        total, empty, failed = 0, 0, True
        try:
            while True:
                ret = self._call("guest-file-read", {"handle": handle, "count": chunk},
                                 deadline, _ascii_b64_len(chunk) + SMALL_REPLY)
                data, eof = _read_reply(ret, chunk)
                total += len(data)
                if total > max_bytes:
                    raise AgentError(f"guest agent: {_guest_text(path, 60)} is over "
                                     f"{max_bytes} bytes")
                _host_io(out.write, data)
                empty = 0 if data else empty + 1
                if eof:
                    break
                if empty > MAX_EMPTY_READS:
                    raise AgentError(f"guest agent: {_guest_text(path, 60)}: "
                                     f"{MAX_EMPTY_READS} reads without data or end")
            failed = False
        finally:
            self._close(handle, deadline, failed)
        return total

    def copy_to_guest(self, source: BinaryIO, path: str, *, timeout: float = COPY_SECONDS,
                      chunk: int = FILE_CHUNK) -> int:
        """Copy ``source`` (read to its end) into the guest's file ``path``
        (made or emptied: qemu-ga 7.2 makes a new file 0666), within
        ``timeout``; the number of bytes."""
        deadline = self._begin(timeout, f"guest agent: copy to {_guest_text(path, 60)}")
        handle = self._open(path, "w", deadline)
        total, failed = 0, True
        try:
            while data := _host_io(source.read, chunk):
                ret = self._call("guest-file-write", {
                    "handle": handle,
                    "buf-b64": binascii.b2a_base64(data, newline=False).decode(),
                }, deadline)
                written = _int(ret.get("count") if isinstance(ret, dict) else None,
                               0, len(data), "guest-file-write's count")
                if written != len(data):
                    raise AgentError(f"guest agent: {_guest_text(path, 60)}: short write "
                                     f"({written} of {len(data)} bytes)")
                total += written
            failed = False
        finally:
            self._close(handle, deadline, failed)
        return total


def _host_io(op: Callable[[Any], Any], arg: object) -> Any:
    """A read or write of the host side of a copy; its OSError an AgentError."""
    try:
        return op(arg)
    except OSError as err:
        raise AgentError(f"guest agent: copy: the host file: {err.strerror or err}") from err


def _read_reply(ret: object, chunk: int) -> tuple[bytes, bool]:
    """A ``guest-file-read`` return: the data (no more than asked, exactly
    ``count`` bytes) and whether the file ended."""
    if not isinstance(ret, dict) or not isinstance(ret.get("eof"), bool):
        raise AgentError("guest agent guest-file-read: no 'eof'")
    count = _int(ret.get("count"), 0, chunk, "guest-file-read's count")
    data = _b64(ret.get("buf-b64", ""), chunk, "guest-file-read's data")
    if len(data) != count:
        raise AgentError(f"guest agent guest-file-read: {len(data)} bytes, said {count}")
    return data, ret["eof"]


def _result(args: list[str], status: dict[str, Any], max_output: int) -> ExecResult:
    """An ``exited`` guest-exec-status as an ExecResult: exactly one of an
    exit code (0-255) or a signal (1-127); output bounded before decoding."""
    code, signal = status.get("exitcode"), status.get("signal")
    if (code is None) == (signal is None):
        raise AgentError("guest agent guest-exec-status: need one of exitcode and signal")
    returncode = (_int(code, 0, 255, "exitcode") if code is not None
                  else -_int(signal, 1, 127, "signal"))
    stdout = _b64(status.get("out-data", ""), max_output, "stdout")
    stderr = _b64(status.get("err-data", ""), max_output - len(stdout), "stderr")
    flags = [status.get(k, False) for k in ("out-truncated", "err-truncated")]
    if not all(isinstance(f, bool) for f in flags):
        raise AgentError("guest agent guest-exec-status: a truncation flag is not a bool")
    return ExecResult(args, returncode, stdout, stderr,
                      stdout_truncated=flags[0], stderr_truncated=flags[1])
