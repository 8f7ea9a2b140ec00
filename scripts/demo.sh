#!/usr/bin/env bash
# keybound demo, on a fresh Debian 12 machine: install what is missing, build,
# plug a software PIV card into pcscd's virtual reader and provision it with
# `keybound token setup`, showing `keybound token list` before and after.
#
# Starts pcscd only if it is not running, and stops on exit only what it
# started. Secrets (the demo PINs) go through 0600 files in a private temp
# dir, never through argv. Exits non-zero and names the step that failed.
#
#   scripts/demo.sh            (KB_KEEP_TMP=1 keeps the temp dir for a look)
set -Eeuo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kb_init demo
cd "$KB_ROOT"

SERIAL=10000001  # the software card's serial number
READER=0         # virtual reader "Virtual PCD 00 00", vpcd TCP port 35963
FACTORY_PIN=123456
NEW_PIN=246810   # demo PIN only: the software card is a TEST DEVICE

STEPS=10
step_no=0
step_title=""

# step TITLE: announce the next step.
step() {
    step_no=$((step_no + 1))
    step_title=$1
    kb_banner "[$step_no/$STEPS] $step_title"
}

# run CMD...: show and run a command (stdin closed, readers lock not inherited);
# on failure, name the step and exit.
run() {
    printf '$ %s\n' "$*"
    local rc=0
    "$@" </dev/null 9>&- || rc=$?
    if [ "$rc" -ne 0 ]; then
        fail "command exited with status $rc: $*"
    fi
}

fail() {
    kb_die "step $step_no/$STEPS ($step_title) failed: $*"
}

# ---------------------------------------------------------------------------------

step "install what is missing (scripts/setup.sh)"
run bash "$KB_ROOT/scripts/setup.sh"
kb_path_setup

step "build keybound and keybound-softcard (cargo build, dev profile)"
run cargo build --bins
BIN=$(kb_bin_dir)
KEYBOUND=$BIN/keybound
SOFTCARD=$BIN/keybound-softcard
for exe in "$KEYBOUND" "$SOFTCARD"; do
    [ -x "$exe" ] || fail "cargo build did not produce $exe"
done
if ! "$KEYBOUND" --help </dev/null 2>&1 | grep -qw token; then
    fail "$KEYBOUND has no 'token' command yet (is the CLI implemented?)"
fi

step "start pcscd if needed and wait for the virtual readers"
start_pcscd_if_needed
timeout 5 pcsc_scan -r | sed 's/^/    /'

step "plug in a software card (serial $SERIAL, reader $READER) -- TEST DEVICE, NOT SECURE"
kb_lock_readers 300
if serial=$(kb_card_serial "$READER"); then
    fail "reader '$(kb_reader_name "$READER")' already holds card ${serial:-?}; remove it first"
fi
printf '$ %s\n' "keybound-softcard --state $KB_TMP/softcard-state.json --serial $SERIAL --reader $READER &"
kb_start_softcard "$SOFTCARD" "$KB_TMP/softcard-state.json" "$SERIAL" "$READER"
CARD_PID=$KB_SOFTCARD_PID
kb_say "card $SERIAL is in '$(kb_reader_name "$READER")' (pid $CARD_PID); yubico-piv-tool reads its serial"

step "list tokens (a factory-fresh card)"
run "$KEYBOUND" token list

step "provision the card: keybound token setup"
# The PIN files: created 0600 from the start (umask in a subshell), in a 0700 dir.
PIN_FILE=$KB_TMP/pin
NEW_PIN_FILE=$KB_TMP/new-pin
(
    umask 077
    printf '%s\n' "$FACTORY_PIN" >"$PIN_FILE"
    printf '%s\n' "$NEW_PIN" >"$NEW_PIN_FILE"
)
kb_say "current PIN (factory $FACTORY_PIN) in $PIN_FILE, new demo PIN ($NEW_PIN) in $NEW_PIN_FILE, both mode 0600"
run "$KEYBOUND" token setup --serial "$SERIAL" --pin-file "$PIN_FILE" --new-pin-file "$NEW_PIN_FILE"

step "list tokens again, and check with yubico-piv-tool (an independent PIV client)"
run "$KEYBOUND" token list
printf '$ %s\n' "yubico-piv-tool -r '$(kb_reader_name "$READER")' -a status"
status=$(yubico-piv-tool -r "$(kb_reader_name "$READER")" -a status </dev/null 9>&- 2>&1) ||
    fail "yubico-piv-tool -a status failed: $status"
printf '%s\n' "$status" | sed 's/^/    /'
grep -Eq '^Slot (8[2-9a-f]|9[0-5]):' <<<"$status" ||
    fail "yubico-piv-tool sees no key/certificate in a retired slot (82-95) after setup"

step "pull the card out (stop keybound-softcard)"
kb_stop_softcard "$CARD_PID" "$READER" ||
    fail "the reader still shows a card after the software card stopped"
kb_say "reader '$(kb_reader_name "$READER")' is empty"

step "list tokens with the card pulled"
run "$KEYBOUND" token list

step "clean up"
kb_stop_pcscd_if_we_started
kb_say "finished: all $STEPS steps passed"
