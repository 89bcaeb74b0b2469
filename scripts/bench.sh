#!/usr/bin/env bash
# Benchmarks (print figures, assert nothing): banger's overhead over a bare
# QEMU boot, per-stage create timings, snapshot and restore against a cold
# boot, and daemon-side create overhead
# against the Firecracker stand-in, pulled layers to ext4, workspaces.
# Needs root (network namespace). Arguments pick sections: scripts/bench.sh workspace
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh --test   # the web section drives chromium
cargo build --release --locked --workspace --bins
scripts/build-agent.sh --release >/dev/null
exec "${CARGO_TARGET_DIR:-target}/release/banger-bench" "$@"
