"""Guests as services: ``svirt start`` / ``stop`` / ``kill`` / ``status`` / ``logs``.

A detached guest outlives the command that started it.  One supervisor per
registry (``python -m svirt.service.daemon``) owns every detached guest of
that registry: it is started on demand by the first command that needs it,
drains every console into a rotated log, answers on a root-only socket
(``RUN_DIR/svirtd.sock``), and exits as soon as no detached guest runs, so
no svirt process is left when no guest is.

Killing it (SIGKILL included) never stops a guest: hypervisors run without
PDEATHSIG, their consoles are FIFOs they hold open themselves (output waits
in a 1 MiB pipe) and QEMU's QMP is a listening socket, all in the guest's
root-owned run directory (:mod:`svirt.launcher.channels`).  Their records
say ``detached``, so reconcile keeps them while their hypervisor lives, and
the next svirt command starts a new supervisor, which adopts them: the same
pidfd, console, control channel and labels; stop, status and logs work as
before.  It also carries on their supervision from ``STATE/supervised``: a
guest in its restart backoff is restarted when its delay is up (with its
restart history: max_restarts still holds), one that ended unseen counts as
a failed run.  Upgrading svirt while guests run is the same path: install the new
version, ``kill`` the old supervisor (``svirt service --restart`` does it),
and the next command's supervisor is the new code.

- :mod:`svirt.service.logs`: rotated console logs (2 MiB x 3 by default).
- :mod:`svirt.service.adopt`: a Guest again from a detached record.
- :mod:`svirt.service.daemon`: the supervisor (its requests, and ``main``), over
  :mod:`~svirt.service.server` (the socket), :mod:`~svirt.service.supervision`
  (restarts and backoff), :mod:`~svirt.service.fanout` (consoles),
  :mod:`~svirt.service.entry` (a guest across runs) and
  :mod:`~svirt.service.notes` (svirtd.log).
- :mod:`svirt.service.client`: start it when needed, ask it, map its errors.
- :mod:`svirt.service.enabled`: guests enabled at boot (``svirt enable``).
- :mod:`svirt.service.units`: the boot unit, init script and per-guest unit.
"""
