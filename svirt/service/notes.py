"""What the supervisor says about itself: ``svirtd.log`` (its stderr),
rotated and rate-limited, and :func:`bounded`, the one shape in which it
keeps or logs anything a guest may have shaped."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from svirt.service.logs import Fd, log_dir

#: bounds (documented in README.rst): the length of a reason or an outcome
#: kept, and svirtd.log (then svirtd.log.1)
MAX_TEXT = 2000
SUPERVISOR_LOG_MAX = 1 << 20


def bounded(text: object, limit: int = MAX_TEXT) -> str:
    """``text`` on one line, control characters escaped, at most ``limit``
    characters: what the supervisor keeps or logs of anything a guest may
    have shaped (an error carrying its reply, an outcome)."""
    from svirt.termsafe import escape_text

    out = escape_text(str(text))
    return out if len(out) <= limit else out[:limit - 3] + "..."


class SupervisorLog:
    """svirtd.log: the supervisor's own lines (its stderr), rotated to
    svirtd.log.1 past SUPERVISOR_LOG_MAX and rate-limited per subject, so
    a guest that makes it complain in a loop cannot fill the disk."""

    QUIET_SECONDS = 60.0

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.last: dict[str, tuple[float, int]] = {}  # subject -> (last printed, held back)

    @classmethod
    def of_state(cls, state: Path) -> SupervisorLog:
        """The log of the supervisor of ``state``'s registry: rotated only
        when stderr is that registry's svirtd.log (see :meth:`_rotate`)."""
        own_log = log_dir(state) / "svirtd.log"
        try:
            same = os.path.samestat(os.fstat(2), os.stat(own_log))
        except OSError:
            same = False
        return cls(own_log if same else None)

    def note(self, text: str, subject: str | None = None) -> None:
        """One line; with ``subject``, at most one line per QUIET_SECONDS for
        it (the next says how many were held back)."""
        now = time.monotonic()
        with self.lock:
            if subject is not None:
                last, held = self.last.get(subject, (-self.QUIET_SECONDS, 0))
                if now - last < self.QUIET_SECONDS:
                    self.last[subject] = (last, held + 1)
                    return
                if held:
                    text += f" (and {held} more like it)"
                self.last[subject] = (now, 0)
                if len(self.last) > 4096:  # subjects are guest names: bounded too
                    self.last.clear()
            try:
                self._rotate()
                os.write(2, f"svirtd: {bounded(text)}\n".encode())
            except OSError:
                pass  # nowhere left to say it

    def _rotate(self) -> None:
        if self.path is None:
            return
        st = os.fstat(2)
        if st.st_size <= SUPERVISOR_LOG_MAX:
            return
        try:
            here = os.stat(self.path)
        except FileNotFoundError:
            here = None
        if here is None or (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
            return  # stderr is not svirtd.log: not ours to rotate
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        with Fd(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                        | os.O_CLOEXEC, 0o600)) as fresh:
            os.dup2(fresh.fileno(), 2)
