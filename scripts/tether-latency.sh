#!/usr/bin/env bash
# How fast does a mounted vault lock when its token is pulled? Mounts a vault
# on a software card, pulls the card (SIGKILL of keybound-softcard: the
# virtual reader empties, as when a YubiKey leaves the USB port), and
# measures, over N pulls (default 20):
#
#   end to end   from the pull to the mount being gone from /proc/self/mountinfo
#                (includes pcscd's poll of the virtual reader, every 400 ms)
#   keybound     from the daemon receiving pcscd's change notification to the
#                mount being gone and the keys wiped (the daemon logs it as
#                took_ms on its "locked" line)
#
# and prints min / median / max of both. Needs root (FUSE). A TEST DEVICE, not a
# security measurement.
#
#   scripts/tether-latency.sh [--pulls N] [--profile dev|release] [--no-setup]
set -Eeuo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PULLS=20
PROFILE=release
SETUP=1
while [ $# -gt 0 ]; do
    case $1 in
    --pulls) PULLS=$2; shift 2 ;;
    --profile) PROFILE=$2; shift 2 ;;
    --no-setup) SETUP=0; shift ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "tether-latency: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $PULLS =~ ^[1-9][0-9]*$ ]] || { echo "tether-latency: --pulls needs a positive number" >&2; exit 2; }

kb_init tether-latency
kb_fs_track
kb_require_root "tether-latency.sh"
cd "$KB_ROOT"
if [ "$SETUP" = 1 ]; then
    bash "$KB_ROOT/scripts/setup.sh"
    kb_path_setup
fi
kb_build_keybound "$PROFILE" || kb_die "cargo build failed"

SERIAL=10000077
kb_keybound_token_ready "$SERIAL" || kb_die "cannot set up the software card"
CARD_PID=$KB_SOFTCARD_PID
# Pulls are SIGKILLs of our own child: no "Killed" job notices in the output.
disown "$CARD_PID"
VAULT=$KB_TMP/latency.kb
MNT=$KB_TMP/mnt
# The KDF cost does not matter here; a short one keeps the 20 unlocks quick.
kb_keybound_create "$VAULT" --kdf-time 100ms || kb_die "keybound create failed"
kb_say "load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"

# Milliseconds since the epoch, with microseconds.
now_ms() {
    local t
    t=$(date +%s.%N)
    printf '%s\n' "$t" | awk '{ printf "%.3f\n", $1 * 1000 }'
}

# The took_ms of the daemon's "locked" line in LOG.
daemon_share() {
    sed -n 's/.*took_ms="\{0,1\}\([0-9.]*\).*/\1/p' "$1" | tail -n 1
}

ends=()
ours=()
for ((i = 1; i <= PULLS; i++)); do
    kb_keybound_mount "$VAULT" "$MNT" || kb_die "mount $i failed"
    log=$("$KB_KEYBOUND" status --json </dev/null 9>&- | sed -n 's/.*"log": "\(.*\)".*/\1/p' | head -n 1)
    pid=$("$KB_KEYBOUND" status --json </dev/null 9>&- | sed -n 's/.*"pid": \([0-9]*\).*/\1/p' | head -n 1)
    printf 'pull %d\n' "$i" >"$MNT/pulls.txt"
    sync -f "$MNT/pulls.txt"
    sleep 0.3

    start=$(now_ms)
    kill -KILL "$CARD_PID"
    while grep -q " $MNT " /proc/self/mountinfo; do :; done
    end=$(now_ms)
    kb_fs_unregister "$MNT"
    for ((w = 0; w < 100 && $(kill -0 "$pid" 2>/dev/null && echo 1 || echo 0) == 1; w++)); do
        sleep 0.05
    done
    share=$(daemon_share "$log")
    [ -n "$share" ] || { kb_show_log "$log" "daemon log"; kb_die "pull $i: no took_ms in the daemon log"; }
    e2e=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    printf '  pull %2d: end to end %7s ms, keybound %6s ms\n' "$i" "$e2e" "$share"
    ends+=("$e2e")
    ours+=("$share")

    # Put the card back for the next round.
    kb_start_softcard "$KB_SOFTCARD" "$KB_TMP/softcard-$SERIAL.json" "$SERIAL" "$KB_KB_READER" >/dev/null
    CARD_PID=$KB_SOFTCARD_PID
    disown "$CARD_PID"
done

# summary NAME VALUES...: min / median / max.
summary() {
    local name=$1
    shift
    printf '%s\n' "$@" | sort -g | awk -v name="$name" '
        { v[NR] = $1 }
        END {
            med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            printf "| %-46s | %8.1f | %8.1f | %8.1f |\n", name, v[1], med, v[NR]
        }'
}

echo
kb_say "$PULLS pulls, $PROFILE build, $(nproc) cores, load average now $(cut -d' ' -f1-3 /proc/loadavg)"
printf '| %-46s | %8s | %8s | %8s |\n' "removal to locked (ms)" min median max
printf '|%s|---------:|---------:|---------:|\n' "------------------------------------------------"
summary "end to end (pull -> mount gone)" "${ends[@]}"
summary "keybound (pcscd notification -> locked)" "${ours[@]}"
