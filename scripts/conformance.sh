#!/usr/bin/env bash
# Conformance: run two external file-system suites on a keybound mount and on
# a gocryptfs mount (the peer) in the same run, and print them side by side:
#
#   pjdfstest  POSIX semantics (crates.io pjdfstest, the Rust port):
#              passed / failed / skipped, and which tests failed
#   fsx        random read/write/mmap/truncate/fallocate/copy_file_range with
#              every read verified (crates.io fsx): N operations, one seed
#
# Exit status: 0 when keybound's fsx passed (or keybound was not asked for),
# 1 when keybound's fsx failed, 2 when keybound could not be set up (no
# `keybound create/mount` yet, a build error, a failed mount...), 64 for a
# bad command line. pjdfstest failures are reported, not fatal.
#
# Everything started here (pcscd, a software card, the mounts) is stopped
# and unmounted on exit, failure or Ctrl-C. Logs: target/conformance/<time>/.
set -Eeuo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<'EOF'
usage: scripts/conformance.sh [--ops N] [--seed N] [--only keybound|gocryptfs]
                              [--kdf-time T] [--no-setup] [-h|--help]

Runs pjdfstest and fsx on a keybound mount and on a gocryptfs mount, prints
a side-by-side table. Must run as root (pjdfstest switches users; the
mounts use allow_other).

  --ops N        fsx operations per file system (default 1000000; about
                 13 min on gocryptfs on 2 vCPUs, 100000 takes ~80 s)
  --seed N       fsx seed (default 1); the same seed gives the same
                 operations on both file systems
  --only WHICH   run only keybound or only gocryptfs
  --kdf-time T   keybound create --kdf-time (default 100ms: unlock speed
                 does not matter here)
  --no-setup     skip scripts/setup.sh (also KB_SKIP_SETUP=1)
  -h, --help     this text

Environment: KB_KEEP_TMP=1 keeps the temp and work dirs;
KB_CARGO_PROFILE (default dev) is the profile keybound is built with.
Exit status: 0 ok, 1 keybound's fsx failed, 2 keybound could not be set
up, 64 usage error.
EOF
}

OPS=1000000
SEED=1
ONLY=""
KDF_TIME=100ms
SETUP=1
[ "${KB_SKIP_SETUP:-0}" = 1 ] && SETUP=0

while [ $# -gt 0 ]; do
    case $1 in
    --ops) OPS=${2:?--ops needs a number}; shift 2 ;;
    --ops=*) OPS=${1#*=}; shift ;;
    --seed) SEED=${2:?--seed needs a number}; shift 2 ;;
    --seed=*) SEED=${1#*=}; shift ;;
    --only) ONLY=${2:?--only needs keybound or gocryptfs}; shift 2 ;;
    --only=*) ONLY=${1#*=}; shift ;;
    --kdf-time) KDF_TIME=${2:?--kdf-time needs a duration}; shift 2 ;;
    --kdf-time=*) KDF_TIME=${1#*=}; shift ;;
    --no-setup) SETUP=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'conformance: unknown argument: %s\n\n' "$1" >&2; usage >&2; exit 64 ;;
    esac
done
OPS=${OPS//,/}
OPS=${OPS//_/}
if ! [[ $OPS =~ ^[0-9]+$ ]] || [ "$OPS" -eq 0 ]; then
    echo "conformance: --ops must be a positive number" >&2
    exit 64
fi
[[ $SEED =~ ^[0-9]+$ ]] || { echo "conformance: --seed must be a number" >&2; exit 64; }
case $ONLY in
"") TARGETS=(keybound gocryptfs) ;;
keybound | gocryptfs) TARGETS=("$ONLY") ;;
*) echo "conformance: --only takes keybound or gocryptfs" >&2; exit 64 ;;
esac

kb_init conformance
kb_fs_track
kb_require_root "conformance.sh"
cd "$KB_ROOT"

if [ "$SETUP" = 1 ]; then
    bash "$KB_ROOT/scripts/setup.sh" </dev/null 9>&-
    kb_path_setup
fi
for tool in pjdfstest fsx gocryptfs fusermount3; do
    command -v "$tool" >/dev/null 2>&1 || kb_die "$tool not found; run scripts/setup.sh"
done

LOGDIR=${CARGO_TARGET_DIR:-$KB_ROOT/target}/conformance/$(date +%Y%m%d-%H%M%S)
mkdir -p "$LOGDIR"
# The mounts live in a 0755 dir under /tmp: pjdfstest's unprivileged users
# must be able to reach them (KB_TMP is 0700).
kb_fs_make_workdir "${TMPDIR:-/tmp}" keybound-conformance
WORK=$KB_FS_WORKDIR
mkdir -p "$WORK/secondary"   # pjdfstest's EXDEV target: a dir off the mounts

# The pjdfstest configuration (the same as tests/common/suites.rs's
# PjdConfig::default): features of a FUSE file system on Linux; the dummy
# users must exist and be in their groups (nobody/nogroup, daemon/daemon on
# Debian; pjdfstest's default "tests" user does not exist).
PJD_CONF=$WORK/pjdfstest.toml
cat >"$PJD_CONF" <<EOF
# written by scripts/conformance.sh
[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}
rename_ctime = {}
secondary_fs = "$WORK/secondary"

[settings]
naptime = 0.01
allow_remount = false
expected_failures = []

[dummy_auth]
entries = [["nobody", "nogroup"], ["daemon", "daemon"]]
EOF

# The fsx configuration (the same as tests/common/suites.rs's
# FsxConfig::default): every operation but hole punching, mmap included.
FSX_CONF=$WORK/fsx.toml
cat >"$FSX_CONF" <<'EOF'
# written by scripts/conformance.sh
flen = 262144

[opsize]
max = 65536
min = 0
align = 1

[weights]
read = 10.0
write = 10.0
mapread = 10.0
mapwrite = 10.0
truncate = 5.0
close_open = 1.0
invalidate = 1.0
fsync = 1.0
fdatasync = 1.0
posix_fallocate = 1.0
punch_hole = 0.0
sendfile = 1.0
posix_fadvise = 1.0
copy_file_range = 1.0
EOF

# ---- results ------------------------------------------------------------------
declare -A R      # R[target.key]
for t in "${TARGETS[@]}"; do
    R[$t.status]="not run"
done

fmt_duration() { # seconds (float) -> 1m23.4s / 4.2s
    awk -v s="$1" 'BEGIN { if (s >= 60) printf "%dm%04.1fs", s / 60, s - 60 * int(s / 60); else printf "%.1fs", s }'
}

# ---- pjdfstest ----------------------------------------------------------------

# run_pjdfstest TARGET MOUNTPOINT
run_pjdfstest() {
    local t=$1 mnt=$2 out=$LOGDIR/pjdfstest-$1.log rc=0 summary
    kb_say "[$t] pjdfstest -c $PJD_CONF -p $mnt"
    kb_timed env RUST_BACKTRACE=0 NO_COLOR=1 timeout 1800 \
        pjdfstest -c "$PJD_CONF" -p "$mnt" >"$out" 2>&1 || rc=$?
    R[$t.pjd_time]=$KB_LAST_SECONDS
    summary=$(grep -E '^Summary: ' "$out" | tail -n 1 || true)
    if [ -z "$summary" ]; then
        R[$t.pjd]="no summary (exit $rc)"
        kb_show_log "$out" "pjdfstest on $t"
        return 0
    fi
    # Summary: 2 failed, 14 skipped, 382 passed, 0 expected failures, 398 total
    R[$t.pjd_failed]=$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$summary")
    R[$t.pjd_skipped]=$(sed -E 's/.* ([0-9]+) skipped.*/\1/' <<<"$summary")
    R[$t.pjd_passed]=$(sed -E 's/.* ([0-9]+) passed.*/\1/' <<<"$summary")
    R[$t.pjd]=ok
    R[$t.pjd_failures]=$(awk '/^[^ \t].* (FAILED|PASSED UNEXPECTEDLY)$/ { print $1 }' "$out" | tr '\n' ' ')
    kb_say "[$t] pjdfstest: ${R[$t.pjd_passed]} passed, ${R[$t.pjd_failed]} failed, ${R[$t.pjd_skipped]} skipped ($(fmt_duration "$KB_LAST_SECONDS")); log $out"
}

# ---- fsx ----------------------------------------------------------------------

# run_fsx TARGET FILE: fsx -v (one INFO line per operation, filtered by awk
# into progress lines; everything else goes to the log, plus the last 40
# operations when it fails).
run_fsx() {
    local t=$1 file=$2 log=$LOGDIR/fsx-$1.log art=$LOGDIR/fsx-$1-artifacts
    local every=$((OPS / 10)) rcs first last
    ((every > 0)) || every=1
    mkdir -p "$art"
    kb_say "[$t] fsx -v -f $FSX_CONF -N $OPS -S $SEED -P $art $file"
    local t0 t1
    t0=$(kb_now)
    set +e
    RUST_BACKTRACE=0 fsx -v -f "$FSX_CONF" -N "$OPS" -S "$SEED" -P "$art" "$file" </dev/null 9>&- 2>&1 |
        awk -v total="$OPS" -v every="$every" -v logf="$log" -v stepf="$log.step" -v name="$t" '
        BEGIN { start = systime(); nextmark = every; lastprint = start; tailn = 40 }
        /^\[INFO / {
            step = $3 + 0; n++; tail[n % tailn] = $0
            now = systime()
            if (step >= nextmark || now - lastprint >= 30) {
                el = now - start
                eta = (step > 0) ? el * (total - step) / step : 0
                printf "conformance: [%s] fsx %d/%d ops (%d%%), %dm%02ds elapsed, ~%dm%02ds left\n", name, step, total, 100 * step / total, el / 60, el % 60, eta / 60, eta % 60
                fflush()
                lastprint = now
                while (nextmark <= step) nextmark += every
            }
            next
        }
        { print > logf; fflush(logf) }
        END {
            print step + 0 > stepf
            if (n > 0) {
                print "--- last operations logged ---" > logf
                for (i = (n > tailn ? n - tailn + 1 : 1); i <= n; i++) print tail[i % tailn] > logf
            }
        }'
    rcs=("${PIPESTATUS[@]}")
    set -e
    t1=$(kb_now)
    R[$t.fsx_time]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    last=$(cat "$log.step" 2>/dev/null || echo 0)
    if [ "${rcs[0]}" -eq 0 ] && grep -q 'All operations completed A-OK!' "$log"; then
        R[$t.fsx]=OK
        R[$t.fsx_ops]=$OPS
        kb_say "[$t] fsx: $OPS operations OK in $(fmt_duration "${R[$t.fsx_time]}")"
        rm -rf "$art"
    else
        # The failing operation: the last one in fsx's LOG DUMP, else the
        # last one announced (a panic happens inside it).
        local dumped
        dumped=$(awk '/LOG DUMP/ { d = 1; next } d && /^\[ERROR/ && $3 ~ /^[0-9]+$/ { s = $3 } END { print s + 0 }' "$log")
        [ "$dumped" -gt 0 ] && last=$dumped
        # shellcheck disable=SC2016 # backquotes are fsx's, not a command
        first=$(grep -m1 -E '^\[ERROR fsx\] |called `Result::unwrap\(\)`|does not support|unexpectedly failed' "$log" | sed 's/^\[ERROR fsx\] //' || true)
        R[$t.fsx]="FAILED at op $last (exit ${rcs[0]})"
        R[$t.fsx_ops]=$((last > 0 ? last - 1 : 0))
        R[$t.fsx_error]=${first:-see $log}
        kb_warn "[$t] fsx FAILED at operation $last of $OPS (exit ${rcs[0]}): ${first:-?}"
        kb_show_log "$log" "fsx on $t"
        kb_say "[$t] fsx artifacts (expected file contents) in $art"
    fi
    rm -f "$log.step"
}

# ---- the two file systems -------------------------------------------------------

run_gocryptfs() {
    local base=$WORK/gocryptfs
    mkdir -p "$base"
    kb_banner "gocryptfs ($(kb_gocryptfs_version))"
    kb_secret_file "$KB_TMP/gocryptfs-pass" "conformance-$RANDOM$RANDOM"
    kb_gocryptfs_init "$base/cipher" "$KB_TMP/gocryptfs-pass" -scryptn 10 ||
        { R[gocryptfs.status]="setup failed (gocryptfs -init)"; return 0; }
    kb_gocryptfs_mount "$base/cipher" "$base/mnt" "$KB_TMP/gocryptfs-pass" -allow_other ||
        { R[gocryptfs.status]="setup failed (mount)"; return 0; }
    R[gocryptfs.status]=ran
    kb_say "[gocryptfs] mounted at $base/mnt: $(findmnt -n -o OPTIONS "$base/mnt")"
    run_pjdfstest gocryptfs "$base/mnt"
    run_fsx gocryptfs "$base/mnt/fsx.testfile"
    kb_fs_unmount "$base/mnt"
}

run_keybound() {
    local base=$WORK/keybound
    mkdir -p "$base"
    kb_banner "keybound"
    # A failure here is "keybound could not be set up", never a script crash.
    kb_build_keybound "${KB_CARGO_PROFILE:-dev}" ||
        { R[keybound.status]="setup failed (cargo build)"; return 0; }
    kb_keybound_has_vault_commands ||
        { R[keybound.status]="not run: no keybound create/mount/unmount yet"; return 0; }
    kb_keybound_token_ready 10000077 ||
        { R[keybound.status]="setup failed (software card / token setup)"; return 0; }
    kb_say "[keybound] keybound create $base/vault.kbd --kdf-time $KDF_TIME (card $KB_KB_SERIAL in reader $KB_KB_READER)"
    kb_keybound_create "$base/vault.kbd" --kdf-time "$KDF_TIME" --label conformance ||
        { R[keybound.status]="setup failed (keybound create)"; return 0; }
    kb_say "[keybound] keybound mount $base/vault.kbd $base/mnt --allow-other"
    kb_keybound_mount "$base/vault.kbd" "$base/mnt" --allow-other ||
        { R[keybound.status]="setup failed (keybound mount)"; return 0; }
    R[keybound.status]=ran
    kb_say "[keybound] mounted at $base/mnt: $(findmnt -n -o OPTIONS "$base/mnt")"
    if ! findmnt -n -o OPTIONS "$base/mnt" | grep -q default_permissions; then
        kb_warn "[keybound] the mount has no default_permissions: pjdfstest's permission tests will fail"
    fi
    run_pjdfstest keybound "$base/mnt"
    run_fsx keybound "$base/mnt/fsx.testfile"
    kb_fs_unmount "$base/mnt"
}

kb_banner "conformance: pjdfstest + fsx ($OPS ops, seed $SEED) on ${TARGETS[*]}"
kb_machine_info "$WORK"
printf 'tools:    %s, %s, %s\n' "$(pjdfstest --version 2>/dev/null)" "$(fsx --version 2>/dev/null)" "$(kb_gocryptfs_version)"
printf 'logs:     %s\n' "$LOGDIR"

# ---- the table ------------------------------------------------------------------

cell() { # TARGET KEY: a result, or "-"
    local v=${R[$1.$2]:-}
    printf '%s' "${v:--}"
}
duration_cell() { # TARGET KEY: a duration, or "-"
    local v=${R[$1.$2]:-}
    if [ -n "$v" ]; then fmt_duration "$v"; else printf '%s' -; fi
}
row() { # LABEL FUNCTION KEY: one column per target
    local label=$1 fn=$2 key=$3 t
    printf '%-26s' "$label"
    for t in "${TARGETS[@]}"; do
        printf ' %-28s' "$("$fn" "$t" "$key")"
    done
    printf '\n'
}
target_name() {
    if [ "$1" = gocryptfs ]; then kb_gocryptfs_version; else printf 'keybound'; fi
}

# shellcheck disable=SC2120 # the exit hook passes the status
print_results() { # [exit status, when called as the exit hook]
    local t
    if [ $# -gt 0 ]; then
        kb_banner "results so far (the run stopped early, status $1)"
    else
        kb_banner "results"
    fi
    row "" target_name ""
    row "setup" cell status
    row "pjdfstest passed" cell pjd_passed
    row "pjdfstest failed" cell pjd_failed
    row "pjdfstest skipped" cell pjd_skipped
    row "pjdfstest time" duration_cell pjd_time
    row "fsx ops done (of $OPS)" cell fsx_ops
    row "fsx result" cell fsx
    row "fsx wall time" duration_cell fsx_time
    printf '\n'
    for t in "${TARGETS[@]}"; do
        if [ -n "${R[$t.pjd_failures]:-}" ]; then
            printf 'pjdfstest failures on %s: %s\n' "$t" "${R[$t.pjd_failures]% }"
        fi
        if [ -n "${R[$t.fsx_error]:-}" ]; then
            printf 'fsx error on %s: %s\n' "$t" "${R[$t.fsx_error]}"
        fi
    done
    cp "$PJD_CONF" "$FSX_CONF" "$LOGDIR/" 2>/dev/null || true
    printf 'configs (pjdfstest.toml, fsx.toml; fsx seed %s) and logs in %s\n' "$SEED" "$LOGDIR"
}

# A failure or Ctrl-C from here on still prints what was measured.
KB_FS_EXIT_HOOK=print_results
for t in "${TARGETS[@]}"; do
    R[$t.status]="interrupted during setup"
    "run_$t"
done
KB_FS_EXIT_HOOK=""
print_results # (no status: the run finished)

# ---- exit status ------------------------------------------------------------------

if [[ " ${TARGETS[*]} " == *" keybound "* ]]; then
    if [ "${R[keybound.status]}" != ran ]; then
        kb_say "keybound: ${R[keybound.status]} (exit 2)"
        exit 2
    fi
    if [ "${R[keybound.fsx]:-}" != OK ]; then
        kb_say "keybound: fsx ${R[keybound.fsx]:-did not run} (exit 1)"
        exit 1
    fi
fi
if [[ " ${TARGETS[*]} " == *" gocryptfs "* ]] && [ "${R[gocryptfs.fsx]:-}" != OK ]; then
    kb_warn "the peer (gocryptfs) did not pass fsx: ${R[gocryptfs.fsx]:-${R[gocryptfs.status]}}"
fi
kb_say "done"
