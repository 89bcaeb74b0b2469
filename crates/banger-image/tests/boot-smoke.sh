#!/usr/bin/env bash
# Boot smoke test of a banger image under QEMU (TCG unless BANGER_ACCEL=kvm).
#
#   boot-smoke.sh IMAGE_DIR AGENT_BIN [MODE...]     MODE: systemd | fast (default both)
#
# For each mode: boots IMAGE_DIR/vmlinux + initrd.img on a microvm, root on a
# qcow2 overlay of rootfs.ext4 (the base stays untouched), no network to the
# outside (user-mode net with restrict=on), and watches the serial console:
#   systemd: the initramfs hands over to systemd, ssh.service starts and
#            multi-user.target is reached;
#   fast:    the initramfs execs the agent as PID 1 (a console line starting
#            with "banger-agent").
# Checks first that the image carries AGENT_BIN as its agent. Prints the time
# from QEMU launch to each milestone. Exit status 0 only if every mode passed.
#
# Environment: BOOT_TIMEOUT (s, default 240), BANGER_ACCEL (tcg|kvm), TSC_KHZ,
# QEMU (default qemu-system-x86_64), KEEP_LOGS=1 to keep consoles.

set -euo pipefail

usage() {
	echo "usage: $0 IMAGE_DIR AGENT_BIN [systemd|fast]..." >&2
	exit 2
}
[ $# -ge 2 ] || usage
image=$(cd "$1" && pwd)
agent=$2
shift 2
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(systemd fast)
timeout_s=${BOOT_TIMEOUT:-240}
accel=${BANGER_ACCEL:-tcg}
qemu=${QEMU:-qemu-system-x86_64}

for tool in "$qemu" qemu-img debugfs sha256sum; do
	command -v "$tool" >/dev/null || {
		echo "boot-smoke: $tool is not installed (apt install qemu-system-x86 qemu-utils e2fsprogs)" >&2
		exit 2
	}
done
for f in vmlinux initrd.img rootfs.ext4 manifest.json; do
	[ -f "$image/$f" ] || {
		echo "boot-smoke: $image/$f missing" >&2
		exit 2
	}
done

tmp=$(mktemp -d /tmp/banger-boot-smoke.XXXXXX)
qemu_pid=
cleanup() {
	if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
		kill "$qemu_pid" 2>/dev/null || true
		wait "$qemu_pid" 2>/dev/null || true
	fi
	if [ -n "${KEEP_LOGS:-}" ]; then
		echo "boot-smoke: consoles kept in $tmp"
	else
		rm -rf "$tmp"
	fi
}
trap cleanup EXIT

# The image must carry this agent.
want=$(sha256sum <"$agent" | cut -d' ' -f1)
have=$(debugfs -R "cat /usr/local/bin/banger-agent" "$image/rootfs.ext4" 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "$want" != "$have" ]; then
	echo "boot-smoke: FAIL: $image/rootfs.ext4 does not carry $agent as /usr/local/bin/banger-agent" >&2
	exit 1
fi
base_stamp=$(stat -c '%s %Y' "$image/rootfs.ext4")

# microvm can hang calibrating the TSC against the PIT under TCG: give the
# kernel the host's TSC frequency (cpu MHz of /proc/cpuinfo) instead.
tsc_khz=${TSC_KHZ:-$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)}
[ -n "$tsc_khz" ] || tsc_khz=2000000

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# boot MODE: runs one VM; prints milestones; returns non-zero on failure.
boot() {
	local mode=$1 log="$tmp/console-$1.log" overlay="$tmp/root-$1.qcow2"
	qemu-img create -q -f qcow2 -b "$image/rootfs.ext4" -F raw "$overlay"
	: >"$log"
	local append="console=ttyS0 root=/dev/vda rw tsc_early_khz=$tsc_khz banger.init=$mode"
	append+=" ip=10.0.2.15::10.0.2.2:255.255.255.0:banger:eth0:off banger.dns=10.0.2.3"
	# Once the serial getty owns the console systemd stops printing status
	# there: have journald copy the journal to the kernel log instead.
	[ "$mode" != systemd ] ||
		append+=" systemd.journald.forward_to_kmsg=1 systemd.journald.max_level_kmsg=info"
	local start
	start=$(now)
	"$qemu" -machine microvm -accel "$accel" -cpu max -m 1024 -smp 1 \
		-nodefaults -no-user-config -display none -no-reboot \
		-chardev "file,id=console,path=$log" -serial chardev:console \
		-kernel "$image/vmlinux" -initrd "$image/initrd.img" -append "$append" \
		-drive "id=root,file=$overlay,format=qcow2,if=none" -device virtio-blk-device,drive=root \
		-object rng-random,filename=/dev/urandom,id=rng0 -device virtio-rng-device,rng=rng0 \
		-netdev user,id=net0,restrict=on -device virtio-net-device,netdev=net0 \
		-device virtio-serial-device \
		-chardev "socket,id=agent,path=$tmp/agent-$mode.sock,server=on,wait=off" \
		-device virtserialport,chardev=agent,name=org.banger.agent \
		</dev/null >"$tmp/qemu-$mode.out" 2>&1 &
	qemu_pid=$!

	local -A seen=()
	local -a names patterns
	names=("kernel ran /init")
	patterns=("Run /init as init process")
	if [ "$mode" = systemd ]; then
		names+=("systemd started" "ssh.service started" "multi-user.target reached" "startup finished")
		patterns+=("Welcome to .*Debian" "Started ssh\.service" "Reached target multi-user\.target" "Startup finished in")
	else
		names+=("agent running as PID 1")
		patterns+=("^banger-agent")
	fi
	local failed= i done_all
	while :; do
		for i in "${!patterns[@]}"; do
			if [ -z "${seen[$i]:-}" ] && grep -aEq "${patterns[$i]}" "$log"; then
				seen[$i]=$(since "$start")
				printf '  %-6s %-28s %6s s\n' "$mode" "${names[$i]}" "${seen[$i]}"
			fi
		done
		done_all=1
		for i in "${!patterns[@]}"; do [ -n "${seen[$i]:-}" ] || done_all=; done
		[ -z "$done_all" ] || break
		if grep -aEq "banger-initramfs: FATAL|Kernel panic" "$log"; then
			failed="the guest reported a fatal error"
			break
		fi
		if ! kill -0 "$qemu_pid" 2>/dev/null; then
			failed="QEMU exited early"
			break
		fi
		if [ "$(since "$start" | cut -d. -f1)" -ge "$timeout_s" ]; then
			failed="timed out after ${timeout_s}s"
			break
		fi
		sleep 0.1
	done

	if [ -z "$failed" ] && [ "$mode" = fast ]; then
		# The placeholder powers off; a real agent waits for the host. Either is fine.
		for _ in $(seq 50); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 0.1; done
		if kill -0 "$qemu_pid" 2>/dev/null; then
			echo "  fast   (agent still running: stopped by the test)"
		else
			printf '  %-6s %-28s %6s s\n' fast "VM powered off" "$(since "$start")"
		fi
	fi
	kill "$qemu_pid" 2>/dev/null || true
	wait "$qemu_pid" 2>/dev/null || true
	qemu_pid=
	if [ -n "$failed" ]; then
		echo "boot-smoke: FAIL ($mode): $failed; last console lines:" >&2
		tail -n 40 "$log" >&2
		cat "$tmp/qemu-$mode.out" >&2
		return 1
	fi
	grep -aE "banger-agent|banger-initramfs|Startup finished" "$log" | sed "s/^/  $mode console: /" | head -n 8
	echo "boot-smoke: PASS ($mode)"
}

echo "boot-smoke: $image (accel $accel)"
status=0
passed=0
failed=0
for mode in "${modes[@]}"; do
	case "$mode" in
	systemd | fast) ;;
	*) usage ;;
	esac
	if boot "$mode"; then passed=$((passed + 1)); else failed=$((failed + 1)); status=1; fi
done
if [ "$(stat -c '%s %Y' "$image/rootfs.ext4")" != "$base_stamp" ]; then
	echo "boot-smoke: FAIL: the base rootfs.ext4 changed" >&2
	status=1
fi
echo "boot-smoke: $passed passed, $failed failed"
exit $status
