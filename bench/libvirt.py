"""libvirt for comparison: libvirtd + virtlogd started by hand, transient QEMU domains.

The daemons are started by the bench (never by an init system) and stopped
at the end.  No default network is defined (libvirt-daemon-config-network is
not installed).  Domains are transient (``virsh create``), type ``qemu``
(TCG), direct kernel boot with the same kernel, initrd and command line as
the svirt guest, serial console to a file the bench polls for the marker,
``<on_poweroff>destroy</on_poweroff>`` so a guest in mode poweroff ends by
itself.

Two host-specific adjustments, both inside libvirtd's own mount namespace
(nothing on the host changes):

* Where /dev/kvm exists but cannot boot a standard guest (PVM here), libvirt
  9.0 caches QEMU capabilities probed "with KVM" and then finds /dev/kvm not
  usable by its ``libvirt-qemu`` user, so it declares its cache stale and
  re-probes QEMU on every lookup: ~4 s each, about 11 times per ``virsh
  create`` (44 s).  The bench masks /dev/kvm for libvirtd (bind mount of an
  empty root-only file), so libvirt probes TCG once and keeps its cache.
* libvirt's per-domain /dev namespace cannot move that bind mount, so
  ``namespaces = []`` is set in a qemu.conf bind-mounted over /etc/libvirt.

libvirt's UML driver no longer exists (dropped in libvirt 5.0.0, 2019): UML
guests have no libvirt comparison.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from bench.procs import marker_regex
from bench.util import CLEANUP, kill_tree, make_temp_dir, now, pids_named, proc_mem

URI = "qemu:///system"
RUN = Path("/run/libvirt")
STATUS_DIR = RUN / "qemu"
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
QEMU_USER = "libvirt-qemu"
PREFIX = "bench-lv-"
POLL = 0.002  # seconds between looks at the console file and the status file


def virsh(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def missing() -> str | None:
    """Why libvirt cannot be compared here (None: it can)."""
    for exe in ("libvirtd", "virtlogd", "virsh"):
        if shutil.which(exe) is None:
            return (f"{exe} not installed (apt-get install --no-install-recommends "
                    "libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)")
    if not Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/"
                "libvirt_driver_qemu.so").exists() and not list(
                    Path("/usr/lib").glob("*/libvirt/connection-driver/libvirt_driver_qemu.so")):
        return "libvirt-daemon-driver-qemu is not installed"
    if os.geteuid() != 0:
        return "needs root to start a system libvirtd"
    for name in ("libvirtd", "virtqemud"):
        if pids_named(name):
            return f"a {name} not started by the bench is running; leaving it alone"
    return None


def uml_driver_status() -> str:
    """What libvirt says to a uml:// URI (the driver was removed in libvirt 5.0.0)."""
    try:
        out = subprocess.run(["virsh", "-c", "uml:///system", "version"], capture_output=True,
                             text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    return " ".join((out.stdout + out.stderr).split())


@dataclass
class DomainRun:
    name: str
    create_s: float | None = None  # virsh create returned
    marker_s: float | None = None
    gone_s: float | None = None
    error: str = ""
    console_tail: str = ""


@dataclass
class Libvirt:
    """libvirtd + virtlogd, started and stopped by the bench."""

    notes: list[str] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)
    libvirtd: subprocess.Popen[bytes] | None = None
    virtlogd: subprocess.Popen[bytes] | None = None
    work: Path | None = None
    _n: int = 0
    _handle: int = 0

    # ------------------------------------------------------------ daemons
    def start(self, mask_kvm: bool) -> None:
        self.work = make_temp_dir("bench-libvirt-", "/var/tmp")
        self._handle = CLEANUP.push("libvirtd and virtlogd", self.stop)
        self._ensure_user()
        for stale in ("libvirt-sock", "libvirt-sock-ro", "libvirt-admin-sock",
                      "virtlogd-sock", "virtlogd-admin-sock"):
            (RUN / stale).unlink(missing_ok=True)
        t0 = now()
        log_env = dict(os.environ, LIBVIRT_LOG_OUTPUTS="3:stderr")
        self.virtlogd = subprocess.Popen(
            ["virtlogd"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.work / "virtlogd.log", "wb"), env=log_env,  # noqa: SIM115
            start_new_session=True)
        self._wait_for(RUN / "virtlogd-sock", 20.0)
        script = "set -e\n"
        if mask_kvm and Path("/dev/kvm").exists():
            nokvm = self.work / "nokvm"
            nokvm.touch(mode=0o600)
            etc = self.work / "etc-libvirt"
            shutil.copytree("/etc/libvirt", etc)
            (etc / "qemu.conf").write_text("namespaces = [ ]\n")
            script += f"mount --bind {nokvm} /dev/kvm\nmount --bind {etc} /etc/libvirt\n"
            self.setup["kvm_masked"] = True
            self.notes.append(
                "libvirtd runs in its own mount namespace with /dev/kvm masked and "
                "qemu.conf 'namespaces = []': on this PVM host libvirt 9.0 otherwise re-probes "
                "QEMU on every lookup (its cached capabilities say KVM, but /dev/kvm is not "
                "usable by libvirt-qemu), and virsh create takes ~44 s")
        script += "exec libvirtd\n"
        self.libvirtd = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.work / "libvirtd.log", "wb"), env=log_env,  # noqa: SIM115
            start_new_session=True)
        self._wait_for(RUN / "libvirt-sock", 60.0)
        deadline = now() + 60
        while True:
            out = virsh("version")
            if out.returncode == 0:
                break
            if now() > deadline or self.libvirtd.poll() is not None:
                raise RuntimeError(f"libvirtd does not answer: {out.stderr.strip()} "
                                   f"{self.daemon_log()}")
            time.sleep(0.1)
        self.setup["daemon_start_s"] = now() - t0
        self.setup["version"] = " ".join(out.stdout.split())

    def _ensure_user(self) -> None:
        try:
            pwd.getpwnam(QEMU_USER)
            self.setup["qemu_user"] = "present"
        except KeyError:
            # what libvirt-daemon-system's postinst does; without it the QEMU driver
            # refuses to start ("Failed to parse user 'libvirt-qemu'")
            subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir",
                            "/var/lib/libvirt", "--shell", "/usr/sbin/nologin",
                            "--user-group", QEMU_USER], check=True)
            self.setup["qemu_user"] = "created by the bench"
            self.notes.append(f"created system user {QEMU_USER} (libvirt-daemon-system, not "
                              "installed, would have): the QEMU driver needs it")

    @staticmethod
    def _wait_for(path: Path, timeout: float) -> None:
        deadline = now() + timeout
        while not path.exists():
            if now() > deadline:
                raise RuntimeError(f"{path} did not appear within {timeout:g} s")
            time.sleep(0.01)

    def daemon_log(self) -> str:
        if self.work is None:
            return ""
        try:
            return (self.work / "libvirtd.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.libvirtd is not None and self.libvirtd.poll() is None:
            try:
                names = virsh("list", "--all", "--name", timeout=30).stdout.split()
            except (OSError, subprocess.TimeoutExpired):
                names = []
            for name in names:
                if name.startswith(PREFIX):
                    try:
                        virsh("destroy", name, timeout=30)
                        virsh("undefine", name, timeout=30)  # defined ones (services)
                    except (OSError, subprocess.TimeoutExpired):
                        pass
        for proc in (self.libvirtd, self.virtlogd):
            if proc is not None:
                kill_tree(proc, grace=15.0, sig=signal.SIGTERM)
        self.libvirtd = self.virtlogd = None
        for log in QEMU_LOG_DIR.glob(f"{PREFIX}*.log*"):
            log.unlink(missing_ok=True)
        CLEANUP.done(self._handle)

    def memory(self) -> dict[str, Any]:
        """RSS/PSS/peak RSS of libvirtd and virtlogd, and their sum."""
        out: dict[str, Any] = {}
        total = {"rss_kb": 0, "pss_kb": 0, "hwm_kb": 0}
        for name, proc in (("libvirtd", self.libvirtd), ("virtlogd", self.virtlogd)):
            sample = proc_mem(proc.pid) if proc is not None else None
            out[name] = sample.to_json() if sample else None
            if sample:
                total["rss_kb"] += sample.rss_kb
                total["pss_kb"] += sample.pss_kb
                total["hwm_kb"] += sample.hwm_kb
        out["total"] = total
        return out

    # ------------------------------------------------------------ domains
    def domain_xml(self, name: str, kernel: Path, initrd: Path, cmdline: str, memory: int,
                   console: Path) -> str:
        return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{shutil.which('qemu-system-x86_64') or '/usr/bin/qemu-system-x86_64'}</emulator>
    <serial type='file'><source path='{escape(str(console))}'/><target port='0'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""

    def prepare(self, kernel: Path, initrd: Path, cmdline: str,
                memory: int) -> tuple[str, Path, Path]:
        """A fresh domain name, its XML file and its console file path."""
        assert self.work is not None
        self._n += 1
        name = f"{PREFIX}{os.getpid()}-{self._n}"
        console = self.work / f"{name}.console"
        console.unlink(missing_ok=True)
        xml = self.work / f"{name}.xml"
        xml.write_text(self.domain_xml(name, kernel, initrd, cmdline, memory, console))
        return name, xml, console

    def run_timed(self, kernel: Path, initrd: Path, cmdline: str, memory: int, marker: str,
                  timeout: float = 180.0) -> DomainRun:
        """virsh create; time to virsh returning, to the marker, and until the domain is gone."""
        name, xml, console = self.prepare(kernel, initrd, cmdline, memory)
        run = DomainRun(name)
        regex = marker_regex(marker)
        buf = bytearray()
        fd = -1
        t0 = now()
        proc = subprocess.Popen(["virsh", "-q", "-c", URI, "create", str(xml)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        status = STATUS_DIR / f"{name}.xml"
        seen_status = False
        try:
            while True:
                t = now()
                if run.create_s is None and proc.poll() is not None:
                    run.create_s = t - t0
                    if proc.returncode != 0:
                        assert proc.stderr is not None
                        run.error = proc.stderr.read().decode(errors="replace").strip()
                        return run
                if fd < 0:
                    try:
                        fd = os.open(console, os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        pass
                if fd >= 0 and run.marker_s is None:
                    start = buf.rfind(b"\n") + 1
                    while chunk := os.read(fd, 65536):
                        buf += chunk
                    if regex.search(buf, start):
                        run.marker_s = now() - t0
                if status.exists():
                    seen_status = True
                elif run.create_s is not None and (seen_status or run.marker_s is not None):
                    run.gone_s = now() - t0
                    return run
                if t - t0 > timeout:
                    run.error = f"timed out after {timeout:g} s"
                    virsh("destroy", name)
                    return run
                time.sleep(POLL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            if proc.stderr is not None:
                proc.stderr.close()
            if fd >= 0:
                os.close(fd)
            run.console_tail = bytes(buf[-1500:]).decode(errors="replace")
            for path in (xml, console):
                path.unlink(missing_ok=True)

    def start_domain(self, kernel: Path, initrd: Path, cmdline: str, memory: int
                     ) -> tuple[str, Path]:
        """Create a domain and return at once (name, console file)."""
        name, xml, console = self.prepare(kernel, initrd, cmdline, memory)
        out = virsh("create", str(xml))
        if out.returncode != 0:
            raise RuntimeError(f"virsh create {name}: {out.stderr.strip()}")
        return name, console

    def define_domain(self, kernel: Path, initrd: Path, cmdline: str, memory: int
                      ) -> tuple[str, Path]:
        """``virsh define`` a persistent domain (not started): name, console file."""
        name, xml, console = self.prepare(kernel, initrd, cmdline, memory)
        out = virsh("define", str(xml))
        if out.returncode != 0:
            raise RuntimeError(f"virsh define {name}: {out.stderr.strip()}")
        return name, console

    def undefine(self, name: str) -> None:
        if self.domain_exists(name):
            self.destroy(name)
        virsh("undefine", name)

    def qemu_pid(self, name: str) -> int | None:
        try:
            return int((STATUS_DIR / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def domain_exists(self, name: str) -> bool:
        return (STATUS_DIR / f"{name}.xml").exists()

    def destroy(self, name: str) -> None:
        virsh("destroy", name)
        deadline = now() + 30
        while (STATUS_DIR / f"{name}.xml").exists() and now() < deadline:
            time.sleep(0.01)


def console_has(console: Path, marker: str) -> bool:
    try:
        data = console.read_bytes()
    except OSError:
        return False
    return marker_regex(marker).search(data) is not None
