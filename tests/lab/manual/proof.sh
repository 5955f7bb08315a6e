#!/bin/sh
# Manual sVirt proof, without svirt: run inside the lab from the launcher
# domain (unconfined_t), enforcing:
#   LAB_PAYLOAD=tests/lab python3 tests/lab/image.py sh /lab/manual/proof.sh [qemu|uml|mcs|all]
# 1. QEMU boots the lab's Debian kernel + a busybox initramfs as
#    svirt_t:s0:c1,c2 from files labelled svirt_image_t:s0:c1,c2 (~50 s: TCG
#    inside TCG);
# 2. UML (linux.uml) boots the same initramfs as svirt_t:s0:c1,c2 with
#    uml_dir= a directory at the guest's level;
# 3. QEMU as svirt_t:s0:c3,c4 is denied reading the c1,c2 kernel.
# Expect the marker twice and exactly one AVC denial (the MCS one).
set -u
G1=s0:c1,c2
W=/var/lib/svirt-proof
MODE=${1:-all}
id -Z
mkdir -p $W/g1/uml $W/ir/bin $W/ir/dev
cp /bin/busybox $W/ir/bin/busybox
mknod $W/ir/dev/console c 5 1
cat > $W/ir/init <<'INIT'
#!/bin/busybox sh
/bin/busybox echo SVIRT-GUEST-MARKER
/bin/busybox poweroff -f
INIT
chmod 755 $W/ir/init
(cd $W/ir && find . | cpio -o -H newc --quiet) > $W/g1/initrd.img
cp /boot/vmlinuz-* $W/g1/vmlinuz
cp /boot/vmlinuz-* $W/secret-vmlinuz
: > $W/g1/qemu.out; : > $W/g1/uml.out; : > $W/mcs.out
chcon -R system_u:object_r:svirt_image_t:$G1 $W/g1
chcon system_u:object_r:svirt_image_t:$G1 $W/secret-vmlinuz
chcon system_u:object_r:svirt_image_t:s0:c3,c4 $W/mcs.out
ls -lZ $W $W/g1
if [ "$MODE" = all ] || [ "$MODE" = qemu ]; then
    echo "=== QEMU under svirt_t:$G1"
    T0=$(cut -d' ' -f1 /proc/uptime)
    runcon system_u:system_r:svirt_t:$G1 qemu-system-x86_64 -accel tcg -nographic -nodefaults \
        -no-user-config -serial stdio -monitor none -no-reboot -m 128 -smp 1 \
        -kernel $W/g1/vmlinuz -initrd $W/g1/initrd.img \
        -append 'console=ttyS0 quiet panic=-1 mitigations=off' > $W/g1/qemu.out 2>&1
    echo "qemu rc=$? t0=$T0 t1=$(cut -d' ' -f1 /proc/uptime)"
    tail -3 $W/g1/qemu.out
fi
if [ "$MODE" = all ] || [ "$MODE" = uml ]; then
    echo "=== UML under svirt_t:$G1"
    T0=$(cut -d' ' -f1 /proc/uptime)
    # setarch -R: without ADDR_NO_RANDOMIZE UML adds a random "exec-shield
    # gap" (up to ~1 GiB) to its memory and sometimes panics.
    setarch -R runcon system_u:system_r:svirt_t:$G1 linux mem=128M initrd=$W/g1/initrd.img \
        uml_dir=$W/g1/uml umid=g1 con=null ssl=null con0=null,fd:1 quiet > $W/g1/uml.out 2>&1
    echo "uml rc=$? t0=$T0 t1=$(cut -d' ' -f1 /proc/uptime)"
    tail -3 $W/g1/uml.out
fi
if [ "$MODE" = all ] || [ "$MODE" = mcs ]; then
    echo "=== MCS: svirt_t:s0:c3,c4 reading svirt_image_t:$G1"
    runcon system_u:system_r:svirt_t:s0:c3,c4 qemu-system-x86_64 -accel tcg -nographic \
        -nodefaults -no-user-config -monitor none -no-reboot -m 64 -kernel $W/secret-vmlinuz \
        -append panic=-1 >> $W/mcs.out 2>&1
    echo "mcs rc=$?"
    cat $W/mcs.out
fi
