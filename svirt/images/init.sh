#!/bin/sh
# svirt tiny guest /init, PID 1.  Behaviour from /proc/cmdline:
#   svirt.mode=poweroff|stay|panic|chatty|shell|diskwrite  svirt.marker=TEXT
#   svirt.net=IP/PREFIX  svirt.ping=IP[,IP...]  svirt.pattern=TEXT (diskwrite)
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys

mode=poweroff
marker=@DEFAULT_MARKER@
net=
ping=
pingtries=1
pattern=svirt-diskwrite
set -f
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    svirt.mode=*) mode="${arg#svirt.mode=}" ;;
    svirt.marker=*) marker="${arg#svirt.marker=}" ;;
    svirt.net=*) net="${arg#svirt.net=}" ;;
    svirt.ping=*) ping="${arg#svirt.ping=}" ;;
    svirt.pingtries=*) pingtries="${arg#svirt.pingtries=}" ;;
    svirt.pattern=*) pattern="${arg#svirt.pattern=}" ;;
    esac
done
set +f

# Modules shipped for this very kernel (QEMU: button, evdev, virtio-net),
# listed dependencies first.
kver=$(uname -r)
if [ -f "/lib/modules/$kver/@ORDER_FILE@" ]; then
    while read -r mod; do
        insmod "/lib/modules/$kver/$mod" || echo "svirt-init: insmod $mod failed"
    done <"/lib/modules/$kver/@ORDER_FILE@"
fi

power_off() {
    sync
    poweroff -f
    sleep 5
    echo "svirt-init: poweroff failed"
    exit 1
}

say_marker() {
    echo
    echo "$marker"
}

do_pings() {
    [ -n "$ping" ] || return 0
    oldifs=$IFS
    IFS=,
    set -- $ping
    IFS=$oldifs
    # svirt.pingtries=N: up to N one-second tries each (peers may boot later)
    for ip in "$@"; do
        result=fail
        try=0
        while [ $try -lt "$pingtries" ]; do
            if ping -c 1 -W 1 "$ip" >/dev/null 2>&1; then
                result=ok
                break
            fi
            try=$((try + 1))
        done
        echo "@PING_PREFIX@ $ip $result"
    done
}

ip link set lo up
if [ -n "$net" ]; then
    # eth0 (virtio-net, UML's legacy eth<N>=), else the first other
    # interface (UML's vector driver names it vec0).
    iface=
    n=0
    while [ -z "$iface" ] && [ $n -lt 20 ]; do
        if [ -e /sys/class/net/eth0 ]; then
            iface=eth0
        else
            for dev in /sys/class/net/*; do
                case "${dev##*/}" in
                lo | '*') ;;
                *) iface=${dev##*/}; break ;;
                esac
            done
        fi
        [ -n "$iface" ] || sleep 0.1
        n=$((n + 1))
    done
    if [ -z "$iface" ]; then
        echo "svirt-init: no network interface for svirt.net=$net"
    elif ! { ip addr add "$net" dev "$iface" && ip link set "$iface" up; }; then
        echo "svirt-init: cannot configure $iface with $net"
    fi
fi

case "$mode" in
poweroff)
    say_marker
    do_pings
    power_off
    ;;
stay|shell)
    stop=0
    trap 'stop=1' INT TERM HUP USR1 USR2 PWR
    # ctrl-alt-del (UML mconsole "cad") sends SIGINT to PID 1, no reboot.
    echo 0 >/proc/sys/kernel/ctrl-alt-del
    # ACPI power button (QEMU system_powerdown): acpid runs
    # /etc/acpi/PWRF/00000080, which signals PID 1.
    # It writes its pid file once it listens: wait for that, so a power
    # button pressed right after the marker is not lost.
    if [ -e /dev/input/event0 ]; then
        acpid -f -c /etc/acpi -l /dev/null -p /tmp/acpid.pid &
        n=0
        while [ ! -s /tmp/acpid.pid ] && [ $n -lt 50 ]; do
            sleep 0.1
            n=$((n + 1))
        done
    fi
    shpid=
    if [ "$mode" = shell ]; then
        # the console is the shell's alone: no echo of what is typed, no
        # kernel messages in the middle of a command's output
        echo 1 >/proc/sys/kernel/printk
        stty -echo </dev/console
        PS1= PS2= sh </dev/console >/dev/console 2>&1 &
        shpid=$!
    fi
    say_marker
    do_pings
    # A trapped signal interrupts "wait"; one that lands between two
    # commands has run its trap by the time of the test.
    while [ "$stop" = 0 ]; do
        sleep 1 &
        [ "$stop" = 0 ] && wait $!
        if [ -n "$shpid" ] && [ "$stop" = 0 ] && ! kill -0 "$shpid" 2>/dev/null; then
            PS1= PS2= sh </dev/console >/dev/console 2>&1 &
            shpid=$!
        fi
    done
    [ -n "$shpid" ] && kill "$shpid" 2>/dev/null
    echo @POWEROFF_MARKER@
    power_off
    ;;
panic)
    say_marker
    do_pings
    echo "svirt-init: exiting PID 1 to panic the kernel"
    exit 1
    ;;
chatty)
    filler=ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789
    filler=$filler$filler
    filler=${filler%????????????????}
    i=0
    while [ $i -lt @CHATTY_LINES@ ]; do
        printf 'svirt-chatty %05d %s\n' $i "$filler"
        i=$((i + 1))
    done
    say_marker
    do_pings
    # poweroff -f does not wait for the tty to drain: give the UART time to
    # send what is still queued, or the tail (the marker) is lost
    sleep 1
    power_off
    ;;
diskwrite)
    dev=
    n=0
    while [ -z "$dev" ] && [ $n -lt 50 ]; do
        for d in /dev/ubda /dev/vda; do
            if [ -b "$d" ]; then dev=$d; break; fi
        done
        [ -n "$dev" ] || sleep 0.1
        n=$((n + 1))
    done
    if [ -z "$dev" ]; then
        echo "svirt-init: no disk (/dev/ubda, /dev/vda) for svirt.mode=diskwrite"
        power_off
    fi
    echo "@DISK_PREFIX@ before $(head -n 1 "$dev")"
    echo "$pattern" | dd of="$dev" conv=notrunc,fsync 2>/dev/null \
        || echo "svirt-init: writing $dev failed"
    sync
    # read back from the device, not from the page cache
    echo 3 >/proc/sys/vm/drop_caches
    echo "@DISK_PREFIX@ after $(head -n 1 "$dev")"
    say_marker
    power_off
    ;;
*)
    echo "svirt-init: unknown svirt.mode=$mode, powering off"
    power_off
    ;;
esac
