"""Smoke test of the SELinux lab: enforcing, the svirt module, MCS separation.

Inside the lab, from the launcher domain (unconfined_t), a tiny multiboot
guest file labelled svirt_image_t:s0:c1,c2 is booted with QEMU as
svirt_t:s0:c1,c2 (must work, without any denial) and as svirt_t:s0:c3,c4
(must fail: the MCS constraint denies reading another guest's image).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .image import LAUNCHER_CONTEXT, run_lab, skip_reason
from .tiny_guest import MARKER, multiboot_kernel

pytestmark = pytest.mark.lab

CHECK = r"""
set -u
echo "context: $(id -Z)"
echo "enforce: $(getenforce)"
semodule -l | grep -qx svirt && echo "module: svirt"
echo "execmem: $(getsebool virt_use_execmem)"
W=/var/lib/svirt-smoke
mkdir -p $W
cp /lab/guest.bin $W/guest.bin
chcon system_u:object_r:svirt_image_t:s0:c1,c2 $W/guest.bin
for lvl in c1,c2 c3,c4; do
    out=$W/out-$lvl
    : > $out
    chcon system_u:object_r:svirt_image_t:s0:$lvl $out
    runcon system_u:system_r:svirt_t:s0:$lvl qemu-system-x86_64 -accel tcg -nographic \
        -nodefaults -no-user-config -serial stdio -monitor none -no-reboot -m 32 \
        -kernel $W/guest.bin > $out 2>&1
    echo "qemu $lvl rc=$?"
    sed "s/^/  $lvl| /" $out
done
"""


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if reason := skip_reason():
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("lab-payload")
    (d / "guest.bin").write_bytes(multiboot_kernel())
    (d / "check.sh").write_text(CHECK)
    return d


def test_lab_enforces_mcs(payload: Path) -> None:
    res = run_lab(["sh", "/lab/check.sh"], payload, timeout=240)
    out = res.output
    assert res.exit_code == 0, out
    assert res.enforcing
    assert f"context: {LAUNCHER_CONTEXT}" in out
    assert "enforce: Enforcing" in out
    assert "module: svirt" in out
    assert "execmem: virt_use_execmem --> on" in out
    # The guest at the image's level boots...
    assert "qemu c1,c2 rc=0" in out, out
    assert MARKER in out.split("qemu c1,c2 rc=0")[1].split("qemu c3,c4")[0], out
    # ...the guest at another level cannot read it.
    assert "qemu c3,c4 rc=1" in out, out
    assert "c3,c4| qemu: could not open kernel file" in out, out
    assert MARKER not in out.split("qemu c3,c4")[1]
    # and the only denial is that MCS one.
    assert len(res.denials) == 1, res.denials
    denial = res.denials[0]
    assert "denied  { read }" in denial
    assert "scontext=system_u:system_r:svirt_t:s0:c3,c4" in denial
    assert "tcontext=system_u:object_r:svirt_image_t:s0:c1,c2" in denial
    assert "tclass=file" in denial
    print(f"lab pass: {res.seconds:.1f}s wall, guest uptime {res.guest_uptime:.1f}s")
