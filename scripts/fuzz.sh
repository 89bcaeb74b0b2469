#!/usr/bin/env bash
# Builds the fuzz targets (fuzz/) with libFuzzer's coverage instrumentation
# and runs each for SECONDS (default 20) from its committed seed corpus
# (fuzz/corpus/<target>, made by fuzz/make_corpus.py). A crash fails the
# script and leaves the input in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS]
#
# Stable rustc: the flags are cargo-fuzz's without a sanitizer (sanitizers
# need nightly, which a fresh machine does not have). The explicit --target
# keeps the flags off build scripts and proc-macros, as cargo-fuzz does.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
target=x86_64-unknown-linux-gnu
flags="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
flags+=" -Cllvm-args=-sanitizer-coverage-pc-table"
flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
RUSTFLAGS="$flags" cargo build --locked --release --manifest-path fuzz/Cargo.toml \
  --target "$target" --bins
# Where cargo put them (CI keeps its target dir outside the clone).
out=${CARGO_TARGET_DIR:-fuzz/target}/$target/release
for t in frame_decode dispatch layer_apply; do
  work=$(mktemp -d)
  # What a target leaves in TMPDIR at exit (dispatch's banger home: libFuzzer
  # exits without dropping it) goes with $work.
  mkdir "$work/tmp" "$work/corpus"
  artifacts=fuzz/artifacts/$t/
  mkdir -p "$artifacts"
  seeds=()
  if [[ -d fuzz/corpus/$t ]]; then seeds=("fuzz/corpus/$t"); fi
  if ! TMPDIR=$work/tmp "$out/$t" -max_total_time="$secs" \
    -print_final_stats=1 -artifact_prefix="$artifacts" "$work/corpus" "${seeds[@]}" \
    >"$work.log" 2>&1; then
    tail -n 40 "$work.log" >&2
    echo "fuzz: $t crashed; the input is in $artifacts" >&2
    exit 1
  fi
  runs=$(awk '/stat::number_of_executed_units/ { print $2 }' "$work.log")
  echo "fuzz: $t: $runs runs in ${secs}s, no crash"
  rm -rf "$work" "$work.log"
done
