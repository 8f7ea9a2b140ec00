#!/usr/bin/env bash
# Does `keybound rekey` survive kill -9 at any point? Creates a vault on a
# software card, writes a tree of files (about 20 MiB), records their
# SHA-256s, then, N times (default 20):
#
#   starts `keybound rekey` (throttled with --max-rate so a pass takes a few
#   seconds), sends it SIGKILL after a random delay, reads where the rotation
#   stood (`keybound info --json`: sectors done of the extent, or finished),
#   checks that mount refuses an unfinished rotation (exit 46) and, every run,
#   runs `keybound rekey` again to completion (a resume when the kill landed
#   mid-rotation), mounts and compares every file.
#
# Prints one line per run (delay, progress at the kill, outcome) and a
# summary. Exits non-zero at the first run whose files do not match. Needs
# root (FUSE). The card is a TEST DEVICE.
#
#   scripts/rekey-crash.sh [--runs N] [--mib M] [--rate RATE] [--profile dev|release] [--no-setup]
set -Eeuo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUNS=20
MIB=20
RATE=8M
PROFILE=release
SETUP=1
while [ $# -gt 0 ]; do
    case $1 in
    --runs) RUNS=$2; shift 2 ;;
    --mib) MIB=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --profile) PROFILE=$2; shift 2 ;;
    --no-setup) SETUP=0; shift ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "rekey-crash: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "rekey-crash: --runs needs a positive number" >&2; exit 2; }
[[ $MIB =~ ^[1-9][0-9]*$ ]] || { echo "rekey-crash: --mib needs a positive number" >&2; exit 2; }

kb_init rekey-crash
kb_fs_track
kb_require_root "rekey-crash.sh"
cd "$KB_ROOT"
if [ "$SETUP" = 1 ]; then
    bash "$KB_ROOT/scripts/setup.sh"
    kb_path_setup
fi
kb_build_keybound "$PROFILE" || kb_die "cargo build failed"

SERIAL=10000088
kb_keybound_token_ready "$SERIAL" || kb_die "cannot set up the software card"
VAULT=$KB_TMP/crash.kb
MNT=$KB_TMP/mnt
AUTH=(--serial "$SERIAL" --password-file "$KB_KB_PASSWORD_FILE" --pin-file "$KB_KB_PIN_FILE")
export KEYBOUND_AUDIT_LOG=$KB_TMP/audit.log
kb_keybound_create "$VAULT" --kdf-time 100ms || kb_die "keybound create failed"

# A tree of files: MIB MiB in files of 64 KiB .. 1 MiB.
kb_keybound_mount "$VAULT" "$MNT" || kb_die "mount failed"
written=0
i=0
while [ "$written" -lt $((MIB * 1024 * 1024)) ]; do
    size=$(((i * 7919 % 960 + 64) * 1024))
    mkdir -p "$MNT/d$((i % 7))"
    head -c "$size" /dev/urandom >"$MNT/d$((i % 7))/f$i"
    written=$((written + size))
    i=$((i + 1))
done
(cd "$MNT" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$KB_TMP/expected.sha256"
FILES=$(wc -l <"$KB_TMP/expected.sha256")
"$KB_KEYBOUND" unmount "$MNT" </dev/null 9>&- >/dev/null || kb_die "unmount failed"
kb_fs_unregister "$MNT"

info_json() { "$KB_KEYBOUND" info "$VAULT" --json </dev/null 9>&-; }
EXTENT=$(info_json | sed -n 's/.*"extent_sectors": \([0-9]*\).*/\1/p')
kb_say "vault: $FILES files, $EXTENT sectors ($((EXTENT * 4096 / 1048576)) MiB); rekey throttled to $RATE/s"

epoch_now() { info_json | sed -n 's/.*"key_epoch": \([0-9]*\).*/\1/p'; }

# One unthrottled rotation first, for the speed figure and the start-up time
# (unlock: PIN, card ECDH, Argon2id twice) before the first sector.
t0=$(kb_now)
out=$("$KB_KEYBOUND" rekey "$VAULT" "${AUTH[@]}" --json </dev/null 9>&- 2>"$KB_TMP/rekey.err") || kb_die "rekey failed"
t1=$(kb_now)
speed=$(printf '%s\n' "$out" | sed -n 's/.*"mib_per_s": \([0-9.]*\).*/\1/p')
secs=$(printf '%s\n' "$out" | sed -n 's/.*"seconds": \([0-9.]*\).*/\1/p')
startup=$(awk -v a="$t0" -v b="$t1" -v s="$secs" 'BEGIN { printf "%.2f", b - a - s }')
kb_say "unthrottled rekey: $(printf '%.0f' "$speed") MiB/s over $((EXTENT * 4096 / 1048576)) MiB ($PROFILE build); start-up $startup s"

# Seconds a throttled pass takes (to spread the kills over it).
pass=$(awk -v e="$EXTENT" -v r="$RATE" 'BEGIN {
    m = r + 0; u = substr(r, length(m "") + 1, 1)
    if (u == "K" || u == "k") m *= 1024; else if (u == "M" || u == "m") m *= 1048576; else if (u == "G" || u == "g") m *= 1073741824
    printf "%.2f", e * 4096 / m }')

mid=0
after=0
before=0
for ((run = 1; run <= RUNS; run++)); do
    # Start-up, then a random point from -5% to 105% of a throttled pass.
    delay=$(awk -v s="$startup" -v p="$pass" -v r="$RANDOM" \
        'BEGIN { d = s + p * (-0.05 + 1.10 * r / 32767); if (d < 0.05) d = 0.05; printf "%.2f", d }')
    epoch_before=$(epoch_now)
    "$KB_KEYBOUND" rekey "$VAULT" "${AUTH[@]}" --max-rate "$RATE" --json </dev/null 9>&- >/dev/null 2>"$KB_TMP/rekey.err" &
    pid=$!
    sleep "$delay"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    state=$(info_json | tr -d '\n ' | sed -n 's/.*"rekey_in_progress":\({[^}]*}\|null\).*/\1/p')
    if [ "$state" = null ] && [ "$(epoch_now)" = "$epoch_before" ]; then
        at="killed before the rotation began"
        before=$((before + 1))
    elif [ "$state" = null ]; then
        at="finished before the kill"
        after=$((after + 1))
    else
        done_s=$(printf '%s' "$state" | sed -n 's/.*"done_sectors":\([0-9]*\).*/\1/p')
        at="killed at sector $done_s/$EXTENT ($((done_s * 100 / EXTENT))%)"
        mid=$((mid + 1))
        code=0
        "$KB_KEYBOUND" mount "$VAULT" "$MNT" "${AUTH[@]}" </dev/null 9>&- >/dev/null 2>&1 || code=$?
        [ "$code" = 46 ] || kb_die "run $run: mount of an unfinished rotation gave exit $code, not 46"
    fi
    # Resume (or rotate once more) to the end, unthrottled.
    out=$("$KB_KEYBOUND" rekey "$VAULT" "${AUTH[@]}" --json </dev/null 9>&- 2>"$KB_TMP/rekey.err") || {
        kb_show_log "$KB_TMP/rekey.err" "keybound rekey"
        kb_die "run $run: the resume failed"
    }
    resumed=$(printf '%s\n' "$out" | sed -n 's/.*"resumed_from_sector": \([0-9a-z]*\).*/\1/p')
    journal=$(printf '%s\n' "$out" | sed -n 's/.*"from_journal": \([0-9]*\).*/\1/p')
    epoch=$(printf '%s\n' "$out" | sed -n 's/.*"new_epoch": \([0-9]*\).*/\1/p')
    kb_keybound_mount "$VAULT" "$MNT" || kb_die "run $run: mount after the resume failed"
    if (cd "$MNT" && sha256sum --quiet -c "$KB_TMP/expected.sha256" >"$KB_TMP/check.out" 2>&1); then
        verdict="all $FILES files match"
    else
        kb_show_log "$KB_TMP/check.out" "sha256sum -c"
        kb_die "run $run: files differ after the resume"
    fi
    "$KB_KEYBOUND" unmount "$MNT" </dev/null 9>&- >/dev/null || kb_die "run $run: unmount failed"
    kb_fs_unregister "$MNT"
    printf '  run %2d: kill after %5.2f s, %-38s resume from %-5s journal %s, epoch %s: %s\n' \
        "$run" "$delay" "$at," "$resumed," "$journal" "$epoch" "$verdict"
done

echo
kb_say "$RUNS kill -9 runs: $mid mid-rotation, $before before it began, $after after it had finished; every run ended with all $FILES files matching"
