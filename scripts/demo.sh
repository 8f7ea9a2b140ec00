#!/usr/bin/env bash
# keybound demo, on a fresh Debian 12 machine: install what is missing, build,
# plug a software PIV card into pcscd's virtual reader, provision it with
# `keybound token setup`, create a vault bound to it, mount it, write and list
# files, back it up while mounted (no key needed) and check the copy, lock it,
# show that the container reveals nothing, open it again, and pull the card
# out: the vault locks itself.
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
PASSWORD="demo password, not a secret"

STEPS=14
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
for cmd in token create mount unmount; do
    "$KEYBOUND" --help </dev/null 2>&1 | grep -qw "$cmd" ||
        fail "$KEYBOUND has no '$cmd' command"
done

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

step "provision the card: keybound token setup"
# Secrets go in files created 0600 from the start (umask in a subshell), in a 0700 dir.
PIN_FILE=$KB_TMP/pin
NEW_PIN_FILE=$KB_TMP/new-pin
PASSWORD_FILE=$KB_TMP/password
(
    umask 077
    printf '%s\n' "$FACTORY_PIN" >"$PIN_FILE"
    printf '%s\n' "$NEW_PIN" >"$NEW_PIN_FILE"
    printf '%s\n' "$PASSWORD" >"$PASSWORD_FILE"
)
kb_say "factory PIN $FACTORY_PIN, new demo PIN $NEW_PIN and the vault password are in 0600 files in $KB_TMP"
run "$KEYBOUND" token setup --serial "$SERIAL" --pin-file "$PIN_FILE" --new-pin-file "$NEW_PIN_FILE"
run "$KEYBOUND" token list

step "create a vault bound to the card and a password: keybound create"
VAULT=$KB_TMP/demo.kb
MNT=$KB_TMP/vault
mkdir "$MNT"
run "$KEYBOUND" create "$VAULT" --serial "$SERIAL" --password-file "$PASSWORD_FILE" --pin-file "$NEW_PIN_FILE"
run "$KEYBOUND" info "$VAULT"

step "mount it (password + PIN): keybound mount"
kb_track_mount "$MNT"
run "$KEYBOUND" mount "$VAULT" "$MNT" --password-file "$PASSWORD_FILE" --pin-file "$NEW_PIN_FILE"
run "$KEYBOUND" status

step "write and list files in the mounted vault"
MARKER="keybound demo plaintext $(date +%s)"
printf '$ %s\n' "echo '$MARKER' > $MNT/hello.txt; mkdir $MNT/docs; cp /etc/os-release $MNT/docs/"
printf '%s\n' "$MARKER" >"$MNT/hello.txt" || fail "cannot write into the vault"
mkdir "$MNT/docs" && cp /etc/os-release "$MNT/docs/" || fail "cannot copy into the vault"
run ls -lR "$MNT"
run cat "$MNT/hello.txt"
run df -h "$MNT"

step "back it up while mounted, without any key: keybound backup, keybound verify"
run "$KEYBOUND" backup "$VAULT" "$KB_TMP/vault-backup.kb"
run "$KEYBOUND" verify "$KB_TMP/vault-backup.kb"

step "lock it: keybound unmount"
run "$KEYBOUND" unmount "$MNT"
[ -z "$(ls -A "$MNT")" ] || fail "the mountpoint still shows files after unmount"
kb_say "$MNT is an empty directory again"

step "the container reveals nothing: no plaintext, no file names"
printf '$ %s\n' "grep -c -e '$MARKER' -e hello.txt -e os-release $VAULT"
if grep -q -a -e "$MARKER" -e hello.txt -e os-release "$VAULT"; then
    fail "the container file contains plaintext"
fi
kb_say "none found in $(stat -c %s "$VAULT") bytes of $VAULT"

step "open it again and read the file back"
run "$KEYBOUND" mount "$VAULT" "$MNT" --password-file "$PASSWORD_FILE" --pin-file "$NEW_PIN_FILE"
[ "$(cat "$MNT/hello.txt")" = "$MARKER" ] || fail "hello.txt did not survive the remount"
kb_say "hello.txt reads back: $(cat "$MNT/hello.txt")"
run "$KEYBOUND" status

step "pull the card out (stop keybound-softcard): the vault locks itself"
kb_stop_softcard "$CARD_PID" "$READER" ||
    fail "the reader still shows a card after the software card stopped"
kb_say "reader '$(kb_reader_name "$READER")' is empty"
for ((i = 0; i < 100; i++)); do
    mountpoint -q "$MNT" || break
    sleep 0.05
done
mountpoint -q "$MNT" && fail "the vault is still mounted 5 s after the card left"
[ -z "$(ls -A "$MNT")" ] || fail "the mountpoint still shows files after the lock"
run "$KEYBOUND" status
kb_say "the vault locked itself: $MNT is an empty directory, its keys are wiped"

step "clean up"
kb_stop_pcscd_if_we_started
kb_say "finished: all $STEPS steps passed"
