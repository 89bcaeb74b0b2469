#!/usr/bin/env bash
# Builds the static banger-agent binary that goes into guest images and
# prints its path on stdout (cargo's output goes to stderr).
#
#   scripts/build-agent.sh [--release]
#
# Uses the x86_64-unknown-linux-musl target when it is installed, else a
# static glibc build (-C target-feature=+crt-static). The explicit --target
# keeps RUSTFLAGS off build scripts and proc-macros. The agent calls no
# NSS functions (getpwnam, getaddrinfo), so static glibc is safe.
set -euo pipefail

cd "$(dirname "$0")/.."

profile=debug
cargo_args=()
case "${1:-}" in
    --release) profile=release; cargo_args+=(--release) ;;
    "") ;;
    *) echo "usage: $0 [--release]" >&2; exit 2 ;;
esac

if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
    target=x86_64-unknown-linux-musl
    flags="-C target-feature=+crt-static"
else
    target=x86_64-unknown-linux-gnu
    flags="-C target-feature=+crt-static"
fi
if [ "$profile" = release ]; then
    # Symbols and line tables are half the binary; a panic message still
    # names the source location.
    flags="$flags -C strip=symbols"
fi

RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }$flags" \
    cargo build -p banger-agent --target "$target" "${cargo_args[@]}" >&2

out="${CARGO_TARGET_DIR:-$PWD/target}/$target/$profile/banger-agent"
case "$(file -b "$out")" in
    *"statically linked"* | *"static-pie linked"*) ;;
    *) echo "$out is not statically linked: $(file -b "$out")" >&2; exit 1 ;;
esac
echo "$out"
