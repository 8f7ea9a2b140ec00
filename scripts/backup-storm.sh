#!/usr/bin/env bash
# Does every `keybound backup` of a busy mounted vault open, pass
# `verify --deep` and hold everything fsynced before it began?
#
# Mounts a vault on a software card, then ROUNDS times (default 100): starts
# a writer that creates files in a fresh directory and fsyncs each one
# (`sync FILE`), noting each name once its fsync returned; lets it run for a
# moment; takes `keybound backup VAULT COPY` while it writes; stops it. Then
# checks the copy: `keybound verify --deep`, and mounted (read-write: a copy
# of a mounted vault is a crash state, which one read-write mount settles),
# every file noted before the backup began is there with its content, and
# every earlier round's directory is complete.
#
# Prints one line per round and a summary; exits non-zero at the first copy
# that fails. Needs root (FUSE). The card is a TEST DEVICE.
#
#   scripts/backup-storm.sh [--rounds N] [--profile dev|release] [--no-setup]
set -Eeuo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=100
PROFILE=release
SETUP=1
while [ $# -gt 0 ]; do
    case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --profile) PROFILE=$2; shift 2 ;;
    --no-setup) SETUP=0; shift ;;
    -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "backup-storm: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "backup-storm: --rounds needs a positive number" >&2; exit 2; }

kb_init backup-storm
kb_fs_track
kb_require_root "backup-storm.sh"
cd "$KB_ROOT"
if [ "$SETUP" = 1 ]; then
    bash "$KB_ROOT/scripts/setup.sh"
    kb_path_setup
fi
kb_build_keybound "$PROFILE" || kb_die "cargo build failed"

SERIAL=10000066
kb_keybound_token_ready "$SERIAL" || kb_die "cannot set up the software card"
export KEYBOUND_AUDIT_LOG=$KB_TMP/audit.log
VAULT=$KB_TMP/vault.kb
MNT=$KB_TMP/mnt
COPY=$KB_TMP/copy.kb
CMNT=$KB_TMP/copy-mnt
AUTH=(--serial "$KB_KB_SERIAL" --password-file "$KB_KB_PASSWORD_FILE" --pin-file "$KB_KB_PIN_FILE")
kb_keybound_create "$VAULT" --kdf-time 100ms || kb_die "keybound create failed"
kb_keybound_mount "$VAULT" "$MNT" || kb_die "mount failed"

# File i of round r: 24 KiB of a line naming it, so a check needs no record of
# the content.
content() {
    awk -v l="round $1 file $2" 'BEGIN { s = ""; while (length(s) < 24576) s = s l "\n"; printf "%s", substr(s, 1, 24576) }'
}

# The writer: files r$1/f0, f1, ... each fsynced, its number appended to the
# list only after the fsync returned. Stops when the stop file appears.
writer() {
    local r=$1 i=0
    mkdir -p "$MNT/r$r"
    while [ ! -e "$KB_TMP/stop" ]; do
        content "$r" "$i" >"$MNT/r$r/f$i"
        sync "$MNT/r$r/f$i"
        echo "$i" >>"$KB_TMP/synced-$r"
        i=$((i + 1))
    done
}

# check_copy ROUND BEFORE: the copy is mounted on $CMNT. Every one of the
# first BEFORE files of this round must be there with its content; of each
# earlier round (checked in full by its own copy) every file must be there,
# and its last one intact.
check_copy() {
    local r=$1 before=$2 k n i have
    for ((i = 0; i < before; i++)); do
        cmp -s <(content "$r" "$i") "$CMNT/r$r/f$i" || {
            kb_warn "round $r: r$r/f$i (fsynced before the backup) is missing or differs in the copy"
            return 1
        }
    done
    for ((k = 1; k < r; k++)); do
        n=$(wc -l <"$KB_TMP/synced-$k")
        have=$(find "$CMNT/r$k" -type f | wc -l)
        [ "$have" -ge "$n" ] || { kb_warn "round $r: r$k has $have files in the copy, $n were fsynced"; return 1; }
        [ "$n" -eq 0 ] || cmp -s <(content "$k" $((n - 1))) "$CMNT/r$k/f$((n - 1))" || {
            kb_warn "round $r: r$k/f$((n - 1)) differs in the copy"
            return 1
        }
    done
}

held_total=0
files_total=0
t0=$(kb_now)
for ((r = 1; r <= ROUNDS; r++)); do
    rm -f "$KB_TMP/stop" "$COPY"
    : >"$KB_TMP/synced-$r"
    writer "$r" &
    wpid=$!
    sleep 0.$((RANDOM % 5 + 2))
    before=$(wc -l <"$KB_TMP/synced-$r")
    json=$("$KB_KEYBOUND" backup "$VAULT" "$COPY" --json </dev/null 9>&- 2>"$KB_TMP/backup.err") || {
        kb_show_log "$KB_TMP/backup.err" "keybound backup"
        kb_die "round $r: the backup failed"
    }
    sleep 0.2
    touch "$KB_TMP/stop"
    wait "$wpid"
    during=$(wc -l <"$KB_TMP/synced-$r")
    held=$(printf '%s\n' "$json" | sed -n 's/.*"held_ms": \([0-9]*\).*/\1/p')
    "$KB_KEYBOUND" verify --deep "$COPY" "${AUTH[@]}" </dev/null 9>&- >"$KB_TMP/verify.out" 2>&1 || {
        kb_show_log "$KB_TMP/verify.out" "keybound verify --deep"
        kb_die "round $r: the copy failed verify --deep"
    }
    kb_keybound_mount "$COPY" "$CMNT" || kb_die "round $r: the copy does not mount"
    check_copy "$r" "$before" || kb_die "round $r: the copy lost fsynced data"
    "$KB_KEYBOUND" unmount "$CMNT" </dev/null 9>&- >/dev/null || kb_die "round $r: unmounting the copy failed"
    kb_fs_unregister "$CMNT"
    held_total=$((held_total + held))
    files_total=$((files_total + during))
    printf '  round %3d: %3d files fsynced before the backup, %3d by the end; held %4d ms; verify --deep ok; all fsynced files there\n' \
        "$r" "$before" "$during" "$held"
done
t1=$(kb_now)

echo
kb_say "$ROUNDS backups of a vault being written and fsynced: every copy passed verify --deep, mounted, and held every file fsynced before its backup began ($files_total files written in all; the vault was held still for $((held_total / ROUNDS)) ms per backup on average; $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", b - a }') s)"
