#!/usr/bin/env bash
# How much of a vault's container changes when a little of its content does?
# Backup tools downstream (rsync, restic, borg) move about that much.
#
# Makes a vault of SIZE MiB (default 1024) of files on a software card, takes a
# copy, then for each change below, from the same starting copy:
#
#   overwrite 1 MiB inside a big file      (dd conv=notrunc, then unmount)
#   add a new 1 MiB file
#   touch and chmod 100 files (metadata only)
#
# and prints, for each: container bytes and 4 KiB sectors that differ from
# the copy, what `keybound backup --incremental` wrote, what rsync
# (--no-whole-file, delta transfer) sent as literal data, and what restic added
# to its repository. Needs root (FUSE). The card is a TEST DEVICE.
#
#   scripts/sync-friendliness.sh [--mib SIZE] [--profile dev|release] [--no-setup]
set -Eeuo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MIB=1024
PROFILE=release
SETUP=1
while [ $# -gt 0 ]; do
    case $1 in
    --mib) MIB=$2; shift 2 ;;
    --profile) PROFILE=$2; shift 2 ;;
    --no-setup) SETUP=0; shift ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "sync-friendliness: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if ! [[ $MIB =~ ^[1-9][0-9]*$ ]] || [ "$MIB" -lt 64 ]; then
    echo "sync-friendliness: --mib needs a number >= 64" >&2
    exit 2
fi

kb_init sync-friendliness
kb_fs_track
kb_require_root "sync-friendliness.sh"
cd "$KB_ROOT"
if [ "$SETUP" = 1 ]; then
    bash "$KB_ROOT/scripts/setup.sh"
    kb_path_setup
fi
kb_build_keybound "$PROFILE" || kb_die "cargo build failed"
for tool in rsync restic; do
    command -v "$tool" >/dev/null || kb_die "$tool is needed (scripts/setup.sh installs it)"
done

SERIAL=10000077
kb_keybound_token_ready "$SERIAL" || kb_die "cannot set up the software card"
export KEYBOUND_AUDIT_LOG=$KB_TMP/audit.log
VAULT=$KB_TMP/vault.kb
MNT=$KB_TMP/mnt
kb_keybound_create "$VAULT" --kdf-time 100ms || kb_die "keybound create failed"

kb_say "filling the vault with $MIB MiB of files"
kb_keybound_mount "$VAULT" "$MNT" || kb_die "mount failed"
mkdir -p "$MNT/big" "$MNT/small"
for ((i = 0; i < MIB / 16 - 1; i++)); do
    head -c $((16 << 20)) /dev/urandom >"$MNT/big/f$i"
done
for ((i = 0; i < 1000; i++)); do
    head -c 4000 /dev/urandom >"$MNT/small/s$i"
done
"$KB_KEYBOUND" unmount "$MNT" </dev/null 9>&- >/dev/null || kb_die "unmount failed"
kb_fs_unregister "$MNT"
BASE=$KB_TMP/base.kb
"$KB_KEYBOUND" backup "$VAULT" "$BASE" </dev/null 9>&- >/dev/null || kb_die "the first backup failed"
kb_say "container: $(($(stat -c %s "$BASE") >> 20)) MiB"

# Count differing bytes and 4 KiB sectors between two files (a length change
# counts the extra bytes as differing).
diff_figures() {
    local la lb
    la=$(stat -c %s "$1")
    lb=$(stat -c %s "$2")
    { cmp -l "$1" "$2" 2>/dev/null || true; } | awk -v la="$la" -v lb="$lb" '
        { n++; s[int(($1 - 1) / 4096)] = 1 }
        END {
            short = la < lb ? la : la > lb ? lb : -1
            if (short >= 0) {
                n += (la > lb ? la - lb : lb - la)
                for (i = int(short / 4096); i * 4096 < (la > lb ? la : lb); i++) s[i] = 1
            }
            print n + 0, length(s)
        }'
}

# restic: a repository holding the base copy, cloned per change.
REPO=$KB_TMP/restic-base
export RESTIC_PASSWORD_FILE=$KB_TMP/restic-pw RESTIC_CACHE_DIR=$KB_TMP/restic-cache
echo "sync-friendliness test repository" >"$RESTIC_PASSWORD_FILE"
restic -q -r "$REPO" init >/dev/null
mkdir -p "$KB_TMP/snap"
cp "$BASE" "$KB_TMP/snap/vault.kb"
restic -q -r "$REPO" backup "$KB_TMP/snap" >/dev/null

change_overwrite() { dd if=/dev/urandom of="$MNT/big/f3" bs=1M count=1 seek=5 conv=notrunc status=none; }
change_new_file() { head -c $((1 << 20)) /dev/urandom >"$MNT/new"; }
change_metadata() { for ((i = 0; i < 100; i++)); do touch "$MNT/small/s$i"; chmod 600 "$MNT/small/s$i"; done; }

printf '\n%-34s %14s %10s %14s %14s %14s\n' "change (vault of $MIB MiB)" "bytes differ" "sectors" "incremental" "rsync literal" "restic added"
for change in overwrite new_file metadata; do
    cp "$BASE" "$VAULT"
    kb_keybound_mount "$VAULT" "$MNT" || kb_die "mount failed"
    "change_$change"
    "$KB_KEYBOUND" unmount "$MNT" </dev/null 9>&- >/dev/null || kb_die "unmount failed"
    kb_fs_unregister "$MNT"
    read -r nbytes nsect < <(diff_figures "$BASE" "$VAULT")
    cp "$BASE" "$KB_TMP/copy.kb"
    inc=$("$KB_KEYBOUND" backup --incremental "$VAULT" "$KB_TMP/copy.kb" --json </dev/null 9>&- | sed -n 's/.*"bytes_written": \([0-9]*\).*/\1/p')
    cmp -s "$KB_TMP/copy.kb" "$VAULT" || kb_die "$change: the incremental copy differs from the vault"
    cp "$BASE" "$KB_TMP/rsync.kb"
    literal=$(rsync --no-whole-file --inplace --stats "$VAULT" "$KB_TMP/rsync.kb" | sed -n 's/^Literal data: \([0-9,]*\) bytes.*/\1/p' | tr -d ,)
    rm -rf "$KB_TMP/repo" && cp -a "$REPO" "$KB_TMP/repo"
    cp "$VAULT" "$KB_TMP/snap/vault.kb"
    added=$(restic -r "$KB_TMP/repo" backup "$KB_TMP/snap" 2>/dev/null | sed -n 's/^Added to the repository: \(.*\)$/\1/p' | sed 's/ (.*//')
    case $change in
    overwrite) what="overwrite 1 MiB inside a file" ;;
    new_file) what="add a 1 MiB file" ;;
    metadata) what="touch + chmod 100 files" ;;
    esac
    printf '%-34s %14s %10s %14s %14s %14s\n' "$what" "$nbytes" "$nsect" "$inc" "$literal" "$added"
done
echo
kb_say "bytes differ: container bytes that changed; incremental: bytes keybound backup --incremental wrote; rsync literal: bytes rsync's delta transfer sent; restic added: what restic stored for the new snapshot"
