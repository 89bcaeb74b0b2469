#!/usr/bin/env bash
# Install the host packages banger needs (Debian/Ubuntu). Idempotent: apt runs
# only when something is missing. Used by install.sh and scripts/test.sh.
#   scripts/deps.sh          runtime packages
#   scripts/deps.sh --test   runtime + what the test suite uses
set -euo pipefail

runtime=(
  qemu-system-x86   # the QEMU backend (TCG where KVM is unusable)
  qemu-utils        # qemu-img: qcow2 copy-on-write root disks
  e2fsprogs         # mkfs.ext4 -d, resize2fs: image and work disks
  mmdebstrap        # builds the default Debian image
  openssh-client    # banger vm ssh
  nftables          # NAT for guest egress (banger-helper)
  iproute2          # ip netns in tests; debugging
  xz-utils
  ca-certificates
)
test_only=(
  docker-registry   # a real OCI registry on 127.0.0.1 for image pull tests
  skopeo            # pushes the OCI images tests/oci.rs assembles
  zstd              # zstd-compressed layers in tests/oci.rs
  busybox-static    # the static shell of the test OCI image
  file
  python3           # network tests: the outside world's HTTP server (http.server) and DNS resolver
  curl              # network tests: requests through port forwards
)

want=("${runtime[@]}")
if [[ "${1:-}" == "--test" ]]; then
  want+=("${test_only[@]}")
fi

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
echo "deps: installing ${missing[*]}" >&2
SUDO=()
if [[ $(id -u) -ne 0 ]]; then SUDO=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
