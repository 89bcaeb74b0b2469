#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this).
# Installs what the tests need, then: format, lints, unit + integration tests
# (which run the real binaries, and as root, real devices in test-made network
# namespaces), a short run of each fuzz target, and the README's install command
# run for real (scripts/install-check.sh). Nothing is skipped: a missing tool
# makes the tests that need it fail.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }
start=$(date +%s)

step "host packages"
scripts/deps.sh --test

step "format"
cargo fmt --all -- --check

step "web UI assets match their lockfile"
scripts/vendor-ui.sh --check

step "build"
cargo build --locked --workspace --all-targets
scripts/build-agent.sh --release >/dev/null

step "clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings

step "fuzz (each target 20 s from its seed corpus)"
scripts/fuzz.sh 20

step "tests"
cargo test --locked --workspace --no-fail-fast

step "install.sh && banger vm run -- uname -a (the README's first command)"
scripts/install-check.sh

printf '\n== all passed in %ss\n' "$(( $(date +%s) - start ))"
