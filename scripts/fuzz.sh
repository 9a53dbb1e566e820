#!/usr/bin/env bash
# Runs vmfarm's fuzz targets (fuzz/, cargo-fuzz with libFuzzer on nightly) for a given time each,
# one after the other, and prints per target the executions, their rate, the coverage and any
# crash. Installs the nightly toolchain and cargo-fuzz when they are missing.
#
# Usage: scripts/fuzz.sh TARGET|all SECONDS [LIBFUZZER_FLAG...]
#   TARGET: manifest guest_cmdline ready_line virtio_blk vsock qcow2 tunnel_frames
#   FUZZ_DEV=1: build the targets unoptimized (cargo fuzz --dev): a clean build takes under half
#   the CPU time of the optimized one, the targets run several times slower. For smoke runs.
#
# Each target starts from its seed corpus in fuzz/corpus/TARGET (read only) and what earlier
# runs found in fuzz/corpus-new/TARGET (not committed); logs go to fuzz/logs/TARGET.log and
# crashing inputs to fuzz/artifacts/TARGET/. A crash makes the script exit non-zero after the
# other targets ran. To replay one: cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...
# (from fuzz/). A fixed crash's input belongs in fuzz/corpus/TARGET/ as a regression seed.
set -euo pipefail
cd "$(dirname "$0")/.."

all_targets=(manifest guest_cmdline ready_line virtio_blk vsock qcow2 tunnel_frames)
if [ $# -lt 2 ] || ! [[ $2 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 TARGET|all SECONDS [LIBFUZZER_FLAG...]  (targets: ${all_targets[*]})" >&2
  exit 2
fi
what=$1 seconds=$2
shift 2
if [ "$what" = all ]; then
  targets=("${all_targets[@]}")
elif [[ " ${all_targets[*]} " == *" $what "* ]]; then
  targets=("$what")
else
  echo "unknown target $what (targets: ${all_targets[*]})" >&2
  exit 2
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo +nightly install cargo-fuzz --locked
fi

cd fuzz
mkdir -p logs
start=$(date +%s)
# `cargo fuzz build` builds one target, or all of them when none is named.
single=
[ ${#targets[@]} -eq 1 ] && single=${targets[0]}
# -a: with debug assertions and overflow checks, so that arithmetic that would wrap in a
# release build is a finding too (the dev profile has them anyway).
profile=-a
[ "${FUZZ_DEV:-0}" = 1 ] && profile=--dev
if ! cargo +nightly fuzz build $profile ${single:+"$single"} >logs/build.log 2>&1; then
  tail -n 40 logs/build.log >&2
  exit 1
fi
echo "fuzz: build took $(($(date +%s) - start)) s" >&2

failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus-new/$t" "artifacts/$t"
  log=logs/$t.log
  # -timeout: one input running longer than that is a finding (a hang), as is one above
  # -rss_limit_mb. Inputs that add coverage go to corpus-new; the seeds stay as committed.
  set +e
  cargo +nightly fuzz run $profile "$t" "corpus-new/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    "$@" >"$log" 2>&1
  status=$?
  set -e
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -n 1)
  last=$(grep -aE '^#[0-9]+' "$log" | tail -n 1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9a-zA-Z]*\).*/\1/p' <<<"$last")
  line="fuzz: $t: ${runs:-?} executions in ${seconds} s (${rate:-?}/s), cov ${cov:-?} edges, ft ${ft:-?} features, corpus ${corp:-?}, peak RSS ${rss:-?} MB"
  if [ $status -ne 0 ]; then
    crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    echo "$line: FAILED (exit $status)" >&2
    grep -a -m 5 -E 'panicked at|ERROR: (libFuzzer|AddressSanitizer)|SUMMARY' "$log" >&2 || true
    echo "fuzz: $t: input: fuzz/${crash:-?}, log: fuzz/$log" >&2
    failed+=("$t")
  else
    echo "$line: no crash" >&2
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]}" >&2
  exit 1
fi
