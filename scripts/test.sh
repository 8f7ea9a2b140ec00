#!/usr/bin/env bash
# Run keybound's test suite against the real pcscd and vsmartcard virtual
# readers: install what is missing, start pcscd if needed, run
# `cargo nextest run --workspace --no-fail-fast` (cargo test if nextest is
# missing), stop pcscd if this script started it, exit with the tests' status.
#
#   scripts/test.sh                      all tests
#   scripts/test.sh softcard             extra arguments go to the test runner
#   KB_SKIP_SETUP=1 scripts/test.sh      skip scripts/setup.sh (CI already ran it)
set -Eeuo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kb_init test
cd "$KB_ROOT"

if [ "${KB_SKIP_SETUP:-0}" != 1 ]; then
    bash "$KB_ROOT/scripts/setup.sh"
    kb_path_setup
fi

# The tests take the readers lock themselves (tests/common/mod.rs); this
# script must not hold it.
start_pcscd_if_needed

if cargo nextest --version >/dev/null 2>&1; then
    runner=(cargo nextest run --workspace --no-fail-fast)
else
    kb_warn "cargo-nextest not found; falling back to cargo test"
    runner=(cargo test --workspace --no-fail-fast)
fi
kb_say "running: ${runner[*]} $*"
rc=0
"${runner[@]}" "$@" </dev/null || rc=$?

kb_stop_pcscd_if_we_started
if [ "$rc" -eq 0 ]; then
    kb_say "tests passed"
else
    kb_say "tests FAILED (exit status $rc)"
fi
exit "$rc"
