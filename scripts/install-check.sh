#!/usr/bin/env bash
# The README's first command, as a new user runs it:
#   ./install.sh && banger vm run -- uname -a
# with the installed binaries, into a scratch PREFIX and BANGER_HOME, the VM
# inside a network namespace of its own. The default image the test suite
# built (<target dir>/tmp/default-image, keyed by its inputs) is registered
# instead of built a second time. Run as root, after the test suite
# (scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${CARGO_TARGET_DIR:-target}/tmp/default-image
image=$(cat "$cache"/*/image-dir 2>/dev/null | head -n1 || true)
if [[ -z "$image" || ! -f "$image/rootfs.ext4" ]]; then
  echo "install-check: no cached default image under $cache: run the guest tests first" >&2
  exit 1
fi

scratch=$(mktemp -d /tmp/bgi.XXXXXX)
ns=bgi-$$
export PREFIX=$scratch/prefix BANGER_HOME=$scratch/home NO_COLOR=1
banger=$PREFIX/bin/banger
# Stop this home's daemon and the root helper it started, which outlives it
# (as a service would) and would otherwise serve the next daemon from the
# host's network namespace: the bridge and taps would land there.
stop_all() {
  "$banger" daemon stop >/dev/null 2>&1 || true
  ip netns exec "$ns" "$banger" daemon stop >/dev/null 2>&1 || true
  pkill -f -- "--socket $BANGER_HOME/run/helper.sock" 2>/dev/null || true
  local i
  for i in $(seq 100); do
    pgrep -f -- "--socket $BANGER_HOME/run/helper.sock" >/dev/null || return 0
    sleep 0.1
  done
  echo "install-check: the helper of $BANGER_HOME does not exit" >&2
  return 1
}
cleanup() {
  stop_all || true
  ip netns delete "$ns" 2>/dev/null || true
  rm -rf "$scratch"
}
trap cleanup EXIT

./install.sh

"$banger" image register debian-12 --vmlinux "$image/vmlinux" --initrd "$image/initrd.img" \
  --rootfs "$image/rootfs.ext4" --work-seed "$image/work-seed.ext4" >/dev/null
"$banger" image promote debian-12 >/dev/null
stop_all

ip netns add "$ns"
ip -n "$ns" link set lo up
host_links=$(ip -br link | awk '{print $1}' | sort)
out=$(ip netns exec "$ns" "$banger" vm run -- uname -a)
echo "$out"
if [[ "$out" != Linux\ * ]]; then
  echo "install-check: 'banger vm run -- uname -a' printed no Linux uname line" >&2
  exit 1
fi
left=$(ip netns exec "$ns" "$banger" vm list --json)
if [[ "$left" != "[]" ]]; then
  echo "install-check: vm run left VMs behind: $left" >&2
  exit 1
fi
if [[ "$(ip -br link | awk '{print $1}' | sort)" != "$host_links" ]]; then
  echo "install-check: links appeared in the host's namespace: $(ip -br link | awk '{print $1}' | xargs)" >&2
  exit 1
fi
leaks=$(ip netns exec "$ns" "$banger" gc --dry-run)
if [[ "$leaks" != "nothing leaked" ]]; then
  echo "install-check: vm run leaked: $leaks" >&2
  exit 1
fi
echo "install-check: ok"
