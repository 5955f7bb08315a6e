"""One module per hypervisor: pure argv builders plus a control channel."""

from __future__ import annotations

from svirt.backends.base import Backend
from svirt.spec import Backend as BackendName


def get_backend(name: BackendName) -> Backend:
    if name is BackendName.QEMU:
        from svirt.backends.qemu import QemuBackend

        return QemuBackend()
    if name is BackendName.UML:
        from svirt.backends.uml import UmlBackend

        return UmlBackend()
    from svirt.backends.lguest import LguestBackend

    return LguestBackend()
