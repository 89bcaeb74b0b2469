#!/usr/bin/env bash
# The README's first command, as a new user runs it:
#   ./install.sh && banger vm run -- uname -a
# with the installed binaries, into a scratch PREFIX and BANGER_HOME, the VM
# inside a network namespace of its own. The default image the test suite
# built (target/tmp/default-image, keyed by its inputs) is registered instead
# of built a second time. Run as root, after the test suite (scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

image=$(cat target/tmp/default-image/*/image-dir 2>/dev/null | head -n1 || true)
if [[ -z "$image" || ! -f "$image/rootfs.ext4" ]]; then
  echo "install-check: no cached default image under target/tmp/default-image: run the guest tests first" >&2
  exit 1
fi

scratch=$(mktemp -d /tmp/bgi.XXXXXX)
ns=bgi-$$
export PREFIX=$scratch/prefix BANGER_HOME=$scratch/home NO_COLOR=1
banger=$PREFIX/bin/banger
cleanup() {
  "$banger" daemon stop >/dev/null 2>&1 || true
  ip netns exec "$ns" "$banger" daemon stop >/dev/null 2>&1 || true
  # The root helpers those daemons started outlive them (as a service would).
  pkill -f -- "--socket $BANGER_HOME/run/helper.sock" 2>/dev/null || true
  ip netns delete "$ns" 2>/dev/null || true
  rm -rf "$scratch"
}
trap cleanup EXIT

./install.sh
"$banger" daemon stop >/dev/null

"$banger" image register debian-12 --vmlinux "$image/vmlinux" --initrd "$image/initrd.img" \
  --rootfs "$image/rootfs.ext4" --work-seed "$image/work-seed.ext4" >/dev/null
"$banger" image promote debian-12 >/dev/null
"$banger" daemon stop >/dev/null

ip netns add "$ns"
ip -n "$ns" link set lo up
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
leaks=$(ip netns exec "$ns" "$banger" gc --dry-run)
if [[ "$leaks" != "nothing leaked" ]]; then
  echo "install-check: vm run leaked: $leaks" >&2
  exit 1
fi
echo "install-check: ok"
