#!/bin/sh
# banger initramfs /init: load the virtio, ext4 and vsock modules, mount the
# root disk and hand over to the real init. Runs under busybox sh.
#
# Kernel command line:
#   root=DEV            root device: /dev/vda (default), LABEL=x or UUID=x
#   rootfstype=TYPE     default ext4
#   ro | rw             mount the root read-only or read-write (default rw)
#   banger.init=MODE    systemd (default): exec /sbin/init
#                       fast: exec /usr/local/bin/banger-agent --init
#   banger.rootwait=S   seconds to wait for the root device (default 10)
#   init=PATH           overrides the systemd-mode init
#   banger.work=DEV     the VM's work disk, mounted on /root before the real
#                       init runs: LABEL=work (default), UUID=x, a device, or
#                       none

export PATH=/usr/sbin:/usr/bin:/sbin:/bin

/bin/busybox --install -s

fail() {
	echo "banger-initramfs: FATAL: $*"
	echo "banger-initramfs: dropping to a shell (exit it to power off)"
	setsid cttyhack sh || sh
	echo "banger-initramfs: shell exited, powering off"
	poweroff -f
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount devtmpfs on /dev"

root=/dev/vda
rootfstype=ext4
rootmode=rw
mode=systemd
rootwait=10
init=
work=LABEL=work
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	root=*) root="${arg#root=}" ;;
	rootfstype=*) rootfstype="${arg#rootfstype=}" ;;
	ro) rootmode=ro ;;
	rw) rootmode=rw ;;
	banger.init=*) mode="${arg#banger.init=}" ;;
	banger.rootwait=*) rootwait="${arg#banger.rootwait=}" ;;
	banger.work=*) work="${arg#banger.work=}" ;;
	init=*) init="${arg#init=}" ;;
	esac
done

while read -r module; do
	[ -n "$module" ] || continue
	# A module already loaded or not matching this CPU is not fatal; a
	# missing disk driver shows up below as a missing root device.
	insmod "/lib/modules/$(uname -r)/$module" 2>/dev/null ||
		echo "banger-initramfs: warning: insmod $module failed"
done </etc/banger-modules

resolve() {
	case "$1" in
	LABEL=* | UUID=*) findfs "$1" 2>/dev/null ;;
	*) echo "$1" ;;
	esac
}

# wait_dev WHAT SPEC: sets $found to the block device SPEC names, once it
# appears (not in a subshell: fail must run in this shell).
wait_dev() {
	tries=$((rootwait * 20))
	found=$(resolve "$2")
	while [ -z "$found" ] || [ ! -b "$found" ]; do
		tries=$((tries - 1))
		[ "$tries" -gt 0 ] || fail "$1 device $2 did not appear within ${rootwait}s"
		sleep 0.05
		found=$(resolve "$2")
	done
}

wait_dev root "$root"
dev=$found

mkdir -p /newroot
mount -t "$rootfstype" -o "$rootmode" "$dev" /newroot ||
	fail "cannot mount $dev ($rootfstype, $rootmode) on /newroot"

# The work disk holds /root: the user's files live there and survive the
# root disk. The agent grows its filesystem online to the disk's size.
if [ "$work" != none ]; then
	wait_dev work "$work"
	workdev=$found
	mkdir -p /newroot/root
	mount -t ext4 -o rw "$workdev" /newroot/root ||
		fail "cannot mount the work disk $workdev on /root"
	# mkfs leaves lost+found; /root is root's alone.
	if rmdir /newroot/root/lost+found 2>/dev/null; then
		chmod 0700 /newroot/root
	fi
fi

case "$mode" in
fast) set -- /usr/local/bin/banger-agent --init ;;
systemd) set -- "${init:-/sbin/init}" ;;
*) fail "unknown banger.init=$mode (expected systemd or fast)" ;;
esac
[ -x "/newroot$1" ] || [ -L "/newroot$1" ] || fail "$1 is missing on the root filesystem"

for fs in dev proc sys; do
	mount --move "/$fs" "/newroot/$fs" || fail "cannot move /$fs into the root filesystem"
done

# bangerd times the "kernel boot" stage up to this line on the console.
echo "banger-initramfs: switching root to $1"
exec switch_root /newroot "$@"
