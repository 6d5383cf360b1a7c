#!/bin/busybox sh
# agent-vm initramfs /init: load only the modules the guest needs, mount the root disk,
# hand over to agent-vm's init. Any failure powers the VM off with a message on the
# console, so the host sees a quick, explained failure instead of a hang.
B=/bin/busybox
fail() {
    echo "agent-vm initramfs: $*" >/dev/console
    $B dmesg | $B tail -n 20 >/dev/console
    $B poweroff -f
}
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
case "$($B cat /proc/cmdline)" in *agentvm.debug=1*) debug=1 ;; esac
[ -n "$debug" ] && echo "agent-vm initramfs: start $($B cut -d' ' -f1 /proc/uptime)" >/dev/console
for m in @MODULES@; do
    $B insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1)); [ $i -gt 500 ] && fail "no root disk /dev/vda after 5 s"
    $B usleep 10000
done
$B mkdir -p /newroot
$B mount -t ext4 -o rw,noatime /dev/vda /newroot || fail "cannot mount /dev/vda"
for d in proc sys dev; do $B mount --move "/$d" "/newroot/$d"; done
# The rest of the mounts and the loopback are done here rather than in Python's init:
# there they would need ctypes and socket, whose import costs ~0.1 s of boot under TCG.
R=/newroot
$B mkdir -p $R/dev/pts $R/dev/shm $R/run $R/sys/fs/cgroup
$B mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
$B mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs $R/dev/shm
$B mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs $R/run
# favordynmods (Linux >= 6.0): moving a task between cgroups no longer waits for an RCU
# grace period. The agent moves itself for every command it starts; under TCG this cut
# the round trip of `true` from 44 to 30 ms.
$B mount -t cgroup2 -o nosuid,nodev,noexec,favordynmods cgroup2 $R/sys/fs/cgroup 2>/dev/null ||
    $B mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 $R/sys/fs/cgroup
$B ip link set lo up
[ -n "$debug" ] && echo "agent-vm initramfs: root mounted $($B cut -d' ' -f1 $R/proc/uptime)" >/dev/console
# -c rather than a script path: a script is compiled from source on every boot, a module
# is loaded from the .pyc written at image build time.
exec $B switch_root /newroot /usr/bin/python3 -I -S -B -c \
    'import sys; sys.path.insert(0, "/opt/agent-vm"); from agent_vm.guest.init import run; run()'
