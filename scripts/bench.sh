#!/usr/bin/env bash
# Benchmarks, side by side in one run: the same workloads on
#   keybound   a keybound vault (software card, Argon2id at its default cost)
#   gocryptfs  a gocryptfs mount (its default scrypt cost), the peer
#   plain      a plain directory on the same disk
#   dir        any existing directory or mount (--dir), e.g. another FUSE fs
# and one table with absolute figures and each one's speed relative to
# gocryptfs. Learned from gocryptfs's tests/canonical-benchmarks.bash (dd
# write/read, untar, ls -lR, rm -rf of a Linux tree), extended with cold vs
# warm reads, small files with fsync, and unlock time.
#
# Timing only: no thresholds, no pass/fail. Single runs: on a shared or busy
# machine, run twice and compare (the load average is printed). The targets
# take turns at every round and workload, so drifts of the machine's speed
# meet them all alike.
#
# Everything started here (pcscd, a software card, the mounts) is stopped
# and unmounted on exit, failure or Ctrl-C; the work dir is removed.
set -Eeuo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<'EOF'
usage: scripts/bench.sh [--size SIZE] [--files N] [--only LIST] [--dir DIR]
                        [--dir-label NAME] [--quick] [--workdir DIR]
                        [--kdf-time T] [--vault-size SIZE] [--profile P]
                        [--no-setup] [-h|--help]

Sets up keybound, gocryptfs and a plain directory, runs each workload on
each of them in turn (the one that goes first moves one place every time),
and prints one table. Before every measured step it syncs and waits until
the keybound daemon is idle. Must run as root (drop_caches, mounts).

  --size SIZE       the big file for sequential write/read (default 1G;
                    K, M, G suffixes, powers of 1024)
  --files N         small files to create, write (4 KiB) and fsync
                    one by one (default 10000)
  --only LIST       comma-separated subset of keybound,gocryptfs,plain
  --dir DIR         also benchmark inside DIR (any mounted file system;
                    a temp subdirectory is used and removed). Its cold
                    read only drops caches: it cannot be remounted
  --dir-label NAME  the column name for --dir (default: DIR's fs type)
  --quick           small sizes, to check the script: 64M, 500 files,
                    only the fs/ subtree (2.2k entries) of the tarball
  --workdir DIR     where the vault, cipher dir and plain dir live; all
                    on the same disk (default target/bench-work in the
                    repository; tmpfs is refused)
  --kdf-time T      keybound create --kdf-time (default: keybound's
                    default, as its users get it)
  --vault-size SIZE keybound create --size (default: none, the container
                    grows as needed)
  --profile P       cargo profile keybound is built with (default release)
  --no-setup        skip scripts/setup.sh (also KB_SKIP_SETUP=1)
  -h, --help        this text

Workloads, in this order, each on every target in turn:
  unlock      wall time of the mount command (FUSE targets)
  seq write   dd 1 MiB blocks of zeros, conv=fsync, median   MiB/s
              of 5 rounds (ROUNDS), each into a new file,
              after 1 round not counted (WARMUP; printed);
              each round on every target before the next
  cold read   remount (FUSE), drop caches, dd to /dev/null,  MiB/s
              median of 5 rounds (ROUNDS), likewise
  warm read   the same file again, right away                MiB/s
  small files N files of 4 KiB in dirs of 100, fsync each    files/s
  untar       tar -x of the Linux source tarball (already    s
              decompressed and cached, so xz is not timed)
  sync        sync right after the untar                     s
  ls -lR      of that tree                                   s
  rm -rf      of that tree                                   s
  unmount     wall time of the unmount/lock command          s
The tarball comes from Debian's linux-source package (setup.sh installs
it), decompressed once into target/bench-cache/ (1.3 GB, kept).
EOF
}

SIZE=1G
FILES=10000
ONLY=""
DIR=""
DIR_LABEL=""
QUICK=0
WORKDIR_PARENT=""
KDF_TIME=""
VAULT_SIZE=""
PROFILE=release
SETUP=1
[ "${KB_SKIP_SETUP:-0}" = 1 ] && SETUP=0
size_given=0 files_given=0

need() {
    if [ $# -lt 2 ] || [ -z "$2" ]; then
        echo "bench: $1 needs a value" >&2
        exit 64
    fi
}
while [ $# -gt 0 ]; do
    case $1 in
    --size) need "$@"; SIZE=$2; size_given=1; shift 2 ;;
    --files) need "$@"; FILES=$2; files_given=1; shift 2 ;;
    --only) need "$@"; ONLY=$2; shift 2 ;;
    --dir) need "$@"; DIR=$2; shift 2 ;;
    --dir-label) need "$@"; DIR_LABEL=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --workdir) need "$@"; WORKDIR_PARENT=$2; shift 2 ;;
    --kdf-time) need "$@"; KDF_TIME=$2; shift 2 ;;
    --vault-size) need "$@"; VAULT_SIZE=$2; shift 2 ;;
    --profile) need "$@"; PROFILE=$2; shift 2 ;;
    --no-setup) SETUP=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'bench: unknown argument: %s\n\n' "$1" >&2; usage >&2; exit 64 ;;
    esac
done
if [ "$QUICK" = 1 ]; then
    [ "$size_given" = 1 ] || SIZE=64M
    [ "$files_given" = 1 ] || FILES=500
fi
SIZE_BYTES=$(numfmt --from=iec "${SIZE%B}" 2>/dev/null) || { echo "bench: bad --size: $SIZE" >&2; exit 64; }
SIZE_MIB=$((SIZE_BYTES / 1048576))
((SIZE_MIB > 0)) || { echo "bench: --size must be at least 1M" >&2; exit 64; }
if ! [[ $FILES =~ ^[0-9]+$ ]] || ((FILES == 0)); then
    echo "bench: --files must be a positive number" >&2
    exit 64
fi

TARGETS=()
if [ -n "$ONLY" ]; then
    IFS=, read -r -a TARGETS <<<"$ONLY"
    for t in "${TARGETS[@]}"; do
        case $t in keybound | gocryptfs | plain) ;; *) echo "bench: --only takes keybound, gocryptfs, plain" >&2; exit 64 ;; esac
    done
else
    TARGETS=(plain gocryptfs keybound)
fi
if [ -n "$DIR" ]; then
    [ -d "$DIR" ] || { echo "bench: --dir $DIR is not a directory" >&2; exit 64; }
    DIR=$(cd "$DIR" && pwd)
    DIR_LABEL=${DIR_LABEL:-$(findmnt -n -o FSTYPE -T "$DIR" 2>/dev/null || echo dir)}
    TARGETS+=(dir)
fi

kb_init bench
kb_fs_track
kb_require_root "bench.sh"
cd "$KB_ROOT"

if [ "$SETUP" = 1 ]; then
    bash "$KB_ROOT/scripts/setup.sh" </dev/null 9>&-
    kb_path_setup
fi
for tool in gocryptfs fusermount3 perl tar numfmt; do
    command -v "$tool" >/dev/null 2>&1 || kb_die "$tool not found; run scripts/setup.sh"
done

TARGET_DIR=${CARGO_TARGET_DIR:-$KB_ROOT/target}
WORKDIR_PARENT=${WORKDIR_PARENT:-$TARGET_DIR/bench-work}
mkdir -p "$WORKDIR_PARENT"
if [ "$(findmnt -n -o FSTYPE -T "$WORKDIR_PARENT")" = tmpfs ]; then
    kb_die "$WORKDIR_PARENT is on tmpfs: benchmarks must run on a disk (--workdir)"
fi
kb_fs_make_workdir "$WORKDIR_PARENT" run
WORK=$KB_FS_WORKDIR

# ---- the tarball ------------------------------------------------------------------

TARBALL_XZ=$(find /usr/src -maxdepth 1 -name 'linux-source-*.tar.xz' 2>/dev/null | sort -V | tail -n 1)
[ -n "$TARBALL_XZ" ] || kb_die "no /usr/src/linux-source-*.tar.xz; install Debian's linux-source (scripts/setup.sh)"
TREE=$(basename "$TARBALL_XZ" .tar.xz)   # linux-source-6.1, the tarball's top dir
CACHE=$TARGET_DIR/bench-cache
TAR=$CACHE/$TREE.tar
if [ ! -s "$TAR" ] || [ "$TARBALL_XZ" -nt "$TAR" ]; then
    mkdir -p "$CACHE"
    kb_say "decompressing $TARBALL_XZ into $TAR once (about 10 s; kept for later runs)"
    xz -dc -T0 "$TARBALL_XZ" >"$TAR.part"
    mv "$TAR.part" "$TAR"
fi
UNTAR_MEMBERS=()
if [ "$QUICK" = 1 ]; then
    UNTAR_MEMBERS=("$TREE/fs")
fi
TAR_ENTRIES=$(tar -tf "$TAR" "${UNTAR_MEMBERS[@]}" | wc -l)

# ---- measurements -------------------------------------------------------------------

declare -A M        # M[target.key] = number
declare -A NOTE     # NOTE[target] = remark for the table
declare -A DATA     # DATA[target] = the directory the workloads run in
declare -A MNT      # MNT[target] = mount point (FUSE targets)
ROWS=(unlock seqwrite coldread warmread small untar sync lsr rmrf unmount)
declare -A LABEL=(
    [unlock]="unlock (mount)"
    [seqwrite]="seq write $SIZE +fsync"
    [coldread]="seq read, cold"
    [warmread]="seq read, warm"
    [small]="$FILES files +fsync"
    [untar]="untar ($TAR_ENTRIES entries)"
    [sync]="sync after untar"
    [lsr]="ls -lR"
    [rmrf]="rm -rf"
    [unmount]="unmount / lock"
)
declare -A UNIT=(
    [unlock]=s [seqwrite]=MiB/s [coldread]=MiB/s [warmread]=MiB/s [small]=files/s
    [untar]=s [sync]=s [lsr]=s [rmrf]=s [unmount]=s
)

# rate BYTES_OR_COUNT SECONDS DIVISOR -> value with 1 decimal
rate() { awk -v n="$1" -v s="$2" -v d="$3" 'BEGIN { if (s <= 0) s = 0.001; printf "%.1f", n / d / s }'; }

# Rounds of the big-file workloads (sequential write, cold read): one 1 GiB
# write or cold read on this VM (Firecracker, free page reporting on) varies
# by up to 2x between runs of the same code, for every target (even the plain
# disk's writes: 393, 1453 and 407 MiB/s in one run); five rounds, their
# median and their spread say more.
ROUNDS=${ROUNDS:-5}
# Unmeasured rounds first (WARMUP, for the sequential write only): whichever
# target was measured first wrote its first GiB at 35-85 % of its later
# rounds, keybound or gocryptfs alike (docs/benchmarks.md, runs 23 and 24):
# the first writes after a pause re-fault memory the VM gave back to the host.
WARMUP=${WARMUP:-1}

# Every target is set up first; then each workload runs on every target
# before the next workload starts, and each round of a big-file workload runs
# on every target before the next round. The target that goes first moves one
# place at every round and workload (plain gocryptfs keybound, then gocryptfs
# keybound plain, ...). Run one target after the other, as before run 29, a
# target's figures met the VM in one state and the next target's in another:
# the plain disk's writes went from 1,410 to 433 MiB/s between two rounds a
# few seconds apart (run 28). In turn, every target meets the same drift.
ACTIVE=()   # the targets that were set up
TURN=0      # rotation of the next round or workload

# in_turn: print the active targets, the first one moved TURN places on.
# (Called in a subshell, so the caller moves TURN on.)
in_turn() {
    local n=${#ACTIVE[@]} i
    for ((i = 0; i < n; i++)); do
        printf '%s\n' "${ACTIVE[(i + TURN) % n]}"
    done
}

# settle: write dirty pages back, then wait until the keybound daemon, if one
# is mounted, has been idle for 1.5 s. It seals the sectors it left unsealed
# in its idle time (FORMAT.md 4.2), which must not run into the next
# target's measurement (nor into keybound's own). How long that took is
# printed when it was more than the quiet window itself.
settle() {
    local pid c0 c1 t0 waited i
    sync
    pid=$(pgrep -f "^$KB_KEYBOUND mount $WORK/keybound/vault.kbd" | head -n 1) || return 0
    [ -n "$pid" ] || return 0
    t0=$(kb_now)
    c0=$(daemon_ticks "$pid") || return 0
    for ((i = 0; i < 40; i++)); do
        sleep 1.5
        c1=$(daemon_ticks "$pid") || return 0
        # One tick (10 ms) in 1.5 s is its timers, not work.
        ((c1 - c0 <= 1)) && break
        c0=$c1
    done
    waited=$(awk -v a="$t0" -v b="$(kb_now)" 'BEGIN { printf "%.1f", b - a - 1.5 }')
    awk -v w="$waited" 'BEGIN { exit !(w >= 0.5) }' &&
        kb_say "[keybound] waited ${waited} s for the daemon's idle-time sealing before the next step"
    return 0
}

# daemon_ticks PID: the CPU time PID used so far, in clock ticks.
daemon_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null; }

# median VALUE...: the middle value (the upper of the two middle ones).
median() {
    printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

# run_rounds KEY ROUND WARMUP [AFTER]: WARMUP uncounted rounds, then ROUNDS
# counted ones; in each round the function ROUND measures KEY (seconds, over
# the big file) on every target in turn. A target's figure is the median
# rate of its counted rounds. AFTER, if given, runs on each target right
# after its last round.
run_rounds() {
    local key=$1 round=$2 warmup=$3 after=${4:-} r t v kind
    local -a order
    local -A warm=() counted=()
    for ((r = 1; r <= warmup + ROUNDS; r++)); do
        mapfile -t order < <(in_turn)
        TURN=$((TURN + 1))
        for t in "${order[@]}"; do
            settle
            "$round" "$t"
            v=$(rate "$SIZE_MIB" "${M[$t.$key]}" 1)
            if ((r <= warmup)); then
                kind="warm-up $r (not counted)"
                warm[$t]+="${warm[$t]:+ }$v"
            else
                kind="round $((r - warmup))/$ROUNDS"
                counted[$t]+="${counted[$t]:+ }$v"
            fi
            kb_say "[$t] ${LABEL[$key]} $kind: $v ${UNIT[$key]}"
            if ((r == warmup + ROUNDS)) && [ -n "$after" ]; then
                "$after" "$t"
            fi
        done
    done
    for t in "${ACTIVE[@]}"; do
        [ "$warmup" -eq 0 ] || kb_say "[$t] ${LABEL[$key]} warm-up (not counted): ${warm[$t]} ${UNIT[$key]}"
        kb_say "[$t] ${LABEL[$key]} rounds: ${counted[$t]} ${UNIT[$key]}"
        # shellcheck disable=SC2086 # one word per round
        M[$t.$key]=$(median ${counted[$t]})
        show "$t" "$key"
    done
}

# each_in_turn FN: settle, then FN TARGET, on every active target in turn.
each_in_turn() {
    local t
    local -a order
    mapfile -t order < <(in_turn)
    TURN=$((TURN + 1))
    for t in "${order[@]}"; do
        settle
        "$1" "$t"
    done
}

# A sequential-write round: a new big file (the one before deleted and synced).
seq_write_round() {
    rm -f "${DATA[$1]}/big"
    sync
    measure "$1" seqwrite dd if=/dev/zero of="${DATA[$1]}/big" bs=1M count="$SIZE_MIB" conv=fsync status=none
}

# A cold-read round: remount (FUSE targets), drop caches, read the big file.
cold_read_round() {
    "remount_$1"
    kb_drop_caches
    measure "$1" coldread dd if="${DATA[$1]}/big" of=/dev/null bs=1M status=none
}

# measure TARGET KEY CMD...: time CMD (stdout discarded), store seconds.
measure() {
    local t=$1 key=$2
    shift 2
    kb_timed "$@" >/dev/null || kb_die "[$t] ${LABEL[$key]}: command failed: $*"
    M[$t.$key]=$KB_LAST_SECONDS
}

show() { # TARGET KEY: print the figure just measured
    local t=$1 key=$2 v=${M[$1.$2]}
    printf 'bench: [%s] %-26s %10s %s\n' "$t" "${LABEL[$key]}" "$v" "${UNIT[$key]}"
}

# shellcheck disable=SC2016 # Perl, not shell
SMALL_FILES_PL='
use strict; use warnings; use IO::Handle;
my ($dir, $n) = @ARGV;
my $buf = "k" x 4096;
mkdir $dir or die "mkdir $dir: $!";
for my $i (0 .. $n - 1) {
    my $d = sprintf("%s/d%03d", $dir, int($i / 100));
    if ($i % 100 == 0) { mkdir $d or die "mkdir $d: $!"; }
    my $f = sprintf("%s/f%05d", $d, $i);
    open(my $fh, ">", $f) or die "create $f: $!";
    my $w = syswrite($fh, $buf);
    defined $w && $w == 4096 or die "write $f: $!";
    $fh->sync or die "fsync $f: $!";
    close($fh) or die "close $f: $!";
}
'

# ---- targets: set up, remount, tear down ---------------------------------------------

setup_plain() {
    DATA[plain]=$WORK/plain
    mkdir -p "${DATA[plain]}"
}
remount_plain() { :; }
teardown_plain() { :; }

setup_dir() {
    DATA[dir]=$(mktemp -d "$DIR/keybound-bench.XXXXXX")
    NOTE[dir]="cold read: caches dropped, not remounted"
}
remount_dir() { :; }
teardown_dir() { rm -rf "${DATA[dir]}"; }

setup_gocryptfs() {
    local base=$WORK/gocryptfs
    mkdir -p "$base"
    kb_secret_file "$KB_TMP/gocryptfs-pass" "bench-$RANDOM$RANDOM"
    # Default scrypt cost (N=2^16), as gocryptfs's users get it.
    kb_gocryptfs_init "$base/cipher" "$KB_TMP/gocryptfs-pass" || kb_die "gocryptfs -init failed"
    MNT[gocryptfs]=$base/mnt
    kb_timed kb_gocryptfs_mount "$base/cipher" "$base/mnt" "$KB_TMP/gocryptfs-pass" ||
        kb_die "gocryptfs mount failed"
    M[gocryptfs.unlock]=$KB_LAST_SECONDS
    show gocryptfs unlock
    DATA[gocryptfs]=$base/mnt/bench
    mkdir -p "${DATA[gocryptfs]}"
}
remount_gocryptfs() {
    local base=$WORK/gocryptfs
    kb_fs_unmount "$base/mnt"
    kb_gocryptfs_mount "$base/cipher" "$base/mnt" "$KB_TMP/gocryptfs-pass" || kb_die "gocryptfs remount failed"
}
teardown_gocryptfs() {
    kb_timed kb_fs_unmount "${MNT[gocryptfs]}"
    M[gocryptfs.unmount]=$KB_LAST_SECONDS
    show gocryptfs unmount
    rm -rf "$WORK/gocryptfs"
}

KEYBOUND_READY=0
setup_keybound() {
    local base=$WORK/keybound create_opts=()
    mkdir -p "$base"
    if [ "$KEYBOUND_READY" = 0 ]; then
        kb_build_keybound "$PROFILE" || { NOTE[keybound]="not run: cargo build failed"; return 1; }
        kb_keybound_has_vault_commands || { NOTE[keybound]="not run: no keybound create/mount/unmount yet"; return 1; }
        kb_keybound_token_ready 10000088 || { NOTE[keybound]="not run: software card / token setup failed"; return 1; }
        KEYBOUND_READY=1
    fi
    [ -z "$KDF_TIME" ] || create_opts+=(--kdf-time "$KDF_TIME")
    [ -z "$VAULT_SIZE" ] || create_opts+=(--size "$VAULT_SIZE")
    kb_say "[keybound] keybound create $base/vault.kbd${create_opts[*]:+ ${create_opts[*]}} (card $KB_KB_SERIAL, reader $KB_KB_READER)"
    kb_keybound_create "$base/vault.kbd" --label bench "${create_opts[@]}" ||
        { NOTE[keybound]="not run: keybound create failed"; return 1; }
    MNT[keybound]=$base/mnt
    kb_timed kb_keybound_mount "$base/vault.kbd" "$base/mnt" ||
        { NOTE[keybound]="not run: keybound mount failed"; return 1; }
    M[keybound.unlock]=$KB_LAST_SECONDS
    show keybound unlock
    DATA[keybound]=$base/mnt/bench
    mkdir -p "${DATA[keybound]}"
}
remount_keybound() {
    local base=$WORK/keybound
    kb_fs_unmount "$base/mnt"
    kb_keybound_mount "$base/vault.kbd" "$base/mnt" || kb_die "keybound remount failed"
}
teardown_keybound() {
    kb_timed kb_fs_unmount "${MNT[keybound]}"
    M[keybound.unmount]=$KB_LAST_SECONDS
    show keybound unmount
    rm -rf "$WORK/keybound"
}

# ---- the workloads, on one target each --------------------------------------------------

set_up() {
    local t=$1
    kb_banner "set up: $(column_name "$t")"
    if "setup_$t"; then
        ACTIVE+=("$t")
        kb_say "[$t] working in ${DATA[$t]}"
    else
        kb_warn "[$t] ${NOTE[$t]}"
    fi
}

warm_read() {
    measure "$1" warmread dd if="${DATA[$1]}/big" of=/dev/null bs=1M status=none
    M[$1.warmread]=$(rate "$SIZE_MIB" "${M[$1.warmread]}" 1)
    show "$1" warmread
}

remove_big() { rm -f "${DATA[$1]}/big"; }

small_files() {
    measure "$1" small perl -e "$SMALL_FILES_PL" "${DATA[$1]}/small" "$FILES"
    M[$1.small]=$(rate "$FILES" "${M[$1.small]}" 1)
    show "$1" small
    rm -rf "${DATA[$1]}/small"
}

untar() {
    # The tarball is read from the page cache, so only the target's writes count.
    cat "$TAR" >/dev/null
    measure "$1" untar tar -xf "$TAR" -C "${DATA[$1]}" "${UNTAR_MEMBERS[@]}"
    show "$1" untar
    measure "$1" sync sync
    show "$1" sync
}

list_tree() {
    measure "$1" lsr ls -lR "${DATA[$1]}/$TREE"
    show "$1" lsr
}

remove_tree() {
    measure "$1" rmrf rm -rf "${DATA[$1]}/$TREE"
    show "$1" rmrf
}

tear_down() { "teardown_$1"; }

column_name() {
    case $1 in
    gocryptfs) kb_gocryptfs_version ;;
    keybound)
        if [ -x "$KB_KEYBOUND" ]; then
            "$KB_KEYBOUND" --version 2>/dev/null | awk '{ print $1 " " $2 }'
        else
            printf 'keybound'
        fi
        ;;
    plain) printf 'plain %s' "$(findmnt -n -o FSTYPE -T "$WORK")" ;;
    dir) printf '%s' "$DIR_LABEL" ;;
    esac
}

# ---- the table ----------------------------------------------------------------------------

# ratio TARGET KEY: speed relative to gocryptfs (>1 = faster)
ratio() {
    local v=${M[$1.$2]:-} g=${M[gocryptfs.$2]:-}
    if [ -z "$v" ] || [ -z "$g" ]; then
        printf '%s' '-'
        return
    fi
    if [ "${UNIT[$2]}" = s ]; then
        awk -v v="$v" -v g="$g" 'BEGIN { if (v <= 0) print "-"; else printf "%.2fx", g / v }'
    else
        awk -v v="$v" -v g="$g" 'BEGIN { if (g <= 0) print "-"; else printf "%.2fx", v / g }'
    fi
}

print_table() {
    local t key line
    local -a cols=() others=()
    for t in "${TARGETS[@]}"; do
        cols+=("$t")
        [ "$t" = gocryptfs ] || others+=("$t")
    done
    [[ " ${TARGETS[*]} " == *" gocryptfs "* ]] || others=()
    line=$(printf '%-26s %-8s' "" "unit")
    for t in "${cols[@]}"; do line+=$(printf ' %16s' "$(column_name "$t" | cut -c1-16)"); done
    for t in "${others[@]}"; do line+=$(printf ' %14s' "$t/goc"); done
    printf '%s\n' "$line"
    for key in "${ROWS[@]}"; do
        line=$(printf '%-26s %-8s' "${LABEL[$key]}" "${UNIT[$key]}")
        for t in "${cols[@]}"; do line+=$(printf ' %16s' "${M[$t.$key]:--}"); done
        for t in "${others[@]}"; do line+=$(printf ' %14s' "$(ratio "$t" "$key")"); done
        printf '%s\n' "$line"
    done
    printf '\n'
    if [ "${#others[@]}" -gt 0 ]; then
        printf 'x/goc: speed relative to gocryptfs, >1 = faster (rates: x / goc; times: goc / x).\n'
    fi
    for t in "${cols[@]}"; do
        [ -z "${NOTE[$t]:-}" ] || printf '%s: %s\n' "$t" "${NOTE[$t]}"
    done
}

# shellcheck disable=SC2120 # the exit hook passes the status
print_results() {
    if [ $# -gt 0 ]; then
        kb_banner "results so far (the run stopped early, status $1)"
    else
        kb_banner "results"
    fi
    print_table
}

# ---- main -------------------------------------------------------------------------------

kb_banner "bench: ${TARGETS[*]}; $SIZE file, $FILES small files, $TAR_ENTRIES tar entries$([ "$QUICK" = 1 ] && echo ' (--quick)')"
kb_machine_info "$WORK"
printf 'work dir: %s\n' "$WORK"
printf 'versions: %s; %s; tar %s; %s\n' "$(kb_gocryptfs_version)" \
    "$(grep -m1 -o 'Linux version [^ ]*' /proc/version 2>/dev/null || uname -r)" \
    "$(tar --version | awk 'NR == 1 { print $NF }')" "$(basename "$TAR")"
if [[ " ${TARGETS[*]} " == *" gocryptfs "* ]]; then
    printf 'crypto:   gocryptfs -speed: %s\n' "$(gocryptfs -speed 2>/dev/null | awk '/^AES-GCM-256/ { printf "%s%s %s MB/s%s", sep, $1, $2, (/selected/ ? " (used)" : ""); sep = ", " }')"
fi

KB_FS_EXIT_HOOK=print_results
for t in "${TARGETS[@]}"; do
    set_up "$t"
done
[ "${#ACTIVE[@]}" -gt 0 ] || kb_die "no target could be set up"
kb_banner "sequential write and read: $ROUNDS rounds, each on every target in turn"
run_rounds seqwrite seq_write_round "$WARMUP"
run_rounds coldread cold_read_round 0 warm_read
each_in_turn remove_big
kb_banner "small files, untar, ls -lR, rm -rf, unmount: each on every target in turn"
each_in_turn small_files
each_in_turn untar
each_in_turn list_tree
each_in_turn remove_tree
each_in_turn tear_down
KB_FS_EXIT_HOOK=""
print_results # (no status: the run finished)
