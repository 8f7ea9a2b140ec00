# shellcheck shell=bash
# Shared helpers for keybound's scripts. Source it, do not run it:
#
#     source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#     kb_init demo          # temp dir + traps that stop what we started
#
# Sourcing has no side effects; kb_init installs the traps. Everything a
# script starts through these helpers (pcscd, software cards) is stopped when
# the script exits, fails or is interrupted. A pcscd that was already running
# is never touched.

KB_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The lock every reader test holds (tests/common/mod.rs): demos take it too, so
# a demo and a test run never share a virtual reader.
KB_READERS_LOCK=/tmp/keybound-test-readers.lock

KB_PROG=${KB_PROG:-keybound}
KB_TMP=""             # per-run temp dir (kb_init), removed on exit
KB_PCSCD_PID=""       # set only when WE started pcscd
KB_PCSCD_BEFORE=""    # pcscd pids that existed when we started ours
KB_SOFTCARD_PIDS=()   # software cards we started

# ---- messages ----------------------------------------------------------------

kb_say() { printf '%s: %s\n' "$KB_PROG" "$*"; }
kb_warn() { printf '%s: warning: %s\n' "$KB_PROG" "$*" >&2; }
kb_die() {
    printf '%s: error: %s\n' "$KB_PROG" "$*" >&2
    exit 1
}

# A banner for a visible step.
kb_banner() {
    printf '\n==== %s ====\n' "$*"
}

# Print the last lines of a log file, indented, to stderr (for error reports).
kb_show_log() {
    local file=$1 what=$2
    [ -s "$file" ] || return 0
    printf '%s: --- last lines of %s (%s) ---\n' "$KB_PROG" "$what" "$file" >&2
    tail -n 20 "$file" | sed 's/^/    /' >&2
}

# ---- privileges and environment ---------------------------------------------

kb_is_root() { [ "$(id -u)" -eq 0 ]; }

# Run a command as root: directly when root, else through sudo (non-interactive
# when there is no terminal to ask for a password on). Fails with 127 when
# neither is possible.
kb_as_root() {
    if kb_is_root; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        if [ -t 0 ]; then sudo "$@"; else sudo -n "$@"; fi
    else
        return 127
    fi
}

kb_can_be_root() { kb_is_root || command -v sudo >/dev/null 2>&1; }

# rustup installs into ~/.cargo/bin, and /usr/sbin (pcscd) is not on every
# user's PATH; make both visible to this script and its children.
kb_path_setup() {
    local dir
    for dir in "${CARGO_HOME:-$HOME/.cargo}/bin" /usr/sbin /sbin; do
        if [ -d "$dir" ] && [[ ":$PATH:" != *":$dir:"* ]]; then
            PATH="$PATH:$dir"
        fi
    done
    export PATH
}

# Where cargo puts binaries of the dev profile (the scripts build debug, like
# the tests, so a demo and a test run share one build).
kb_bin_dir() {
    printf '%s/debug\n' "${CARGO_TARGET_DIR:-$KB_ROOT/target}"
}

# ---- lifecycle ---------------------------------------------------------------

# kb_init NAME: set the message prefix, make a private temp dir, install traps.
kb_init() {
    KB_PROG=$1
    kb_path_setup
    KB_TMP=$(mktemp -d "${TMPDIR:-/tmp}/keybound-$KB_PROG.XXXXXX")
    chmod 700 "$KB_TMP"
    trap kb_cleanup EXIT
    trap 'exit 129' HUP
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# EXIT trap: stop our software cards, then our pcscd, then remove the temp dir.
# Keeps the script's exit status.
kb_cleanup() {
    local rc=$? pid
    set +e
    trap - EXIT HUP INT TERM
    for pid in "${KB_SOFTCARD_PIDS[@]}"; do
        kb_kill_and_wait "$pid"
    done
    KB_SOFTCARD_PIDS=()
    kb_stop_pcscd_if_we_started
    if [ -n "$KB_TMP" ] && [ -d "$KB_TMP" ]; then
        if [ "${KB_KEEP_TMP:-0}" = 1 ]; then
            kb_say "kept temp dir $KB_TMP (KB_KEEP_TMP=1)"
        else
            rm -rf "$KB_TMP"
        fi
    fi
    exit "$rc"
}

# Stop a process we started: SIGTERM, up to 5 s, then SIGKILL; reap it.
kb_kill_and_wait() {
    local pid=$1 i
    # `|| true` on every wait: it returns the child's status (143 after
    # SIGTERM), which would end a `set -e` script.
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || kb_as_root kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kb_warn "process $pid ignored SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || kb_as_root kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    return 0
}

# ---- pcscd -------------------------------------------------------------------

kb_pcscd_pids() { pgrep -x pcscd 2>/dev/null || true; }

# Start pcscd unless one is running; remember that we started it. Then wait
# until it lists the vsmartcard virtual readers. Call from the script's main
# shell (not in $(...)), so the pid stays ours to stop.
start_pcscd_if_needed() {
    local running
    running=$(kb_pcscd_pids | tr '\n' ' ')
    if [ -n "$running" ]; then
        kb_say "pcscd already running (pid ${running% }); using it, will not stop it"
    else
        command -v pcscd >/dev/null 2>&1 ||
            kb_die "pcscd is not installed; run scripts/setup.sh"
        kb_can_be_root ||
            kb_die "pcscd must run as root and sudo is not available; start it as root: pcscd"
        local log="${KB_TMP:-/tmp}/pcscd.log"
        KB_PCSCD_BEFORE=" $running "
        # --foreground: $! is pcscd itself (or sudo, which relays signals to
        # it), so stopping it is a plain kill. Not through a shell function: a
        # function run with & is a subshell, and $! would be that subshell.
        if kb_is_root; then
            pcscd --foreground >"$log" 2>&1 </dev/null 9>&- &
        else
            if [ -t 0 ]; then sudo -v; fi # ask for a password now, not in the background
            # shellcheck disable=SC2024 # the log belongs to us, not to root
            sudo -n pcscd --foreground >"$log" 2>&1 </dev/null 9>&- &
        fi
        KB_PCSCD_PID=$!
        kb_say "started pcscd (pid $KB_PCSCD_PID, log $log); it is stopped on exit"
    fi
    kb_wait_for_virtual_readers "${KB_PCSCD_TIMEOUT:-20}"
}

# Stop the pcscd we started. Some tests restart pcscd (tests/token.rs stops it
# and starts a daemonised one); a pcscd that appeared while we ran stands in
# for ours and is stopped too. A pcscd that was running before we started one
# is never touched, and nothing is stopped if we started nothing.
stop_pcscd_if_we_started() { kb_stop_pcscd_if_we_started; }
kb_stop_pcscd_if_we_started() {
    [ -n "$KB_PCSCD_PID" ] || return 0
    local pid=$KB_PCSCD_PID other
    KB_PCSCD_PID=""
    if kill -0 "$pid" 2>/dev/null; then
        kb_kill_and_wait "$pid"
        kb_say "stopped pcscd (pid $pid), which this script had started"
    else
        wait "$pid" 2>/dev/null || true
    fi
    for other in $(kb_pcscd_pids); do
        [[ "$KB_PCSCD_BEFORE" == *" $other "* ]] && continue
        kb_kill_and_wait "$other"
        kb_say "stopped pcscd (pid $other), started during this run in place of ours"
    done
}

# Wait until pcscd lists a "Virtual PCD" reader; clear error after TIMEOUT s.
kb_wait_for_virtual_readers() {
    local timeout=${1:-20} deadline out
    deadline=$((SECONDS + timeout))
    while :; do
        out=$(timeout 5 pcsc_scan -r 2>&1) || true
        if grep -q 'Virtual PCD' <<<"$out"; then
            return 0
        fi
        if [ -n "$KB_PCSCD_PID" ] && ! kill -0 "$KB_PCSCD_PID" 2>/dev/null; then
            kb_show_log "${KB_TMP:-/tmp}/pcscd.log" "pcscd"
            KB_PCSCD_PID=""
            kb_die "pcscd exited right after starting (see its log above)"
        fi
        if ((SECONDS >= deadline)); then
            printf '%s\n' "$out" | sed 's/^/    pcsc_scan -r: /' >&2
            if [ -n "$KB_PCSCD_PID" ]; then
                kb_die "pcscd (pid $KB_PCSCD_PID, started here) shows no 'Virtual PCD' reader after ${timeout}s; is vsmartcard-vpcd installed (scripts/setup.sh)?"
            else
                kb_die "the running pcscd shows no 'Virtual PCD' reader after ${timeout}s. It was probably started before vsmartcard-vpcd was installed: stop it (kill $(kb_pcscd_pids | tr '\n' ' ')) and rerun; the scripts start pcscd themselves"
            fi
        fi
        sleep 0.2
    done
}

# ---- virtual readers and software cards ---------------------------------------

# pcsc-lite's name for vpcd reader N.
kb_reader_name() { printf 'Virtual PCD 00 %02d\n' "$1"; }

# Take the readers lock (shared with the tests), waiting up to TIMEOUT s.
# Take it after start_pcscd_if_needed, so pcscd never inherits it.
kb_lock_readers() {
    local timeout=${1:-300}
    # fd 9 holds the lock. Every child is started with 9>&- so that no daemon
    # can inherit it. (flock works on a read-only fd: the file may be root's.)
    if [ -e "$KB_READERS_LOCK" ]; then
        exec 9<"$KB_READERS_LOCK"
    else
        exec 9>"$KB_READERS_LOCK"
    fi
    if ! flock -n 9; then
        kb_say "virtual readers busy (tests running?); waiting up to ${timeout}s for $KB_READERS_LOCK"
        flock -w "$timeout" 9 ||
            kb_die "the virtual readers stayed busy for ${timeout}s (lock $KB_READERS_LOCK)"
    fi
}

# Serial number of the card in reader N as an independent PIV client
# (yubico-piv-tool) reads it through pcscd; fails if no card answers.
kb_card_serial() {
    local out
    out=$(yubico-piv-tool -r "$(kb_reader_name "$1")" -a status 2>/dev/null 9>&- </dev/null) || return 1
    sed -n 's/^Serial Number:[[:space:]]*//p' <<<"$out"
}

# kb_wait_for_card READER present|absent [SERIAL] [TIMEOUT]
kb_wait_for_card() {
    local reader=$1 want=$2 serial=${3:-} timeout=${4:-15} deadline got
    deadline=$((SECONDS + timeout))
    while :; do
        if got=$(kb_card_serial "$reader"); then
            if [ "$want" = present ] && { [ -z "$serial" ] || [ "$got" = "$serial" ]; }; then
                return 0
            fi
        elif [ "$want" = absent ]; then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            kb_warn "reader '$(kb_reader_name "$reader")' did not become $want${serial:+ (card $serial)} within ${timeout}s${got:+; it holds card $got}"
            return 1
        fi
        sleep 0.2
    done
}

# kb_start_softcard BIN STATE SERIAL READER: plug a software card in, wait for
# its "inserted" line and until pcscd serves it. Sets KB_SOFTCARD_PID.
KB_SOFTCARD_PID=""
kb_start_softcard() {
    local bin=$1 state=$2 serial=$3 reader=$4 out err pid deadline
    out="$KB_TMP/softcard-$reader.out"
    err="$KB_TMP/softcard-$reader.err"
    [ -x "$bin" ] || kb_die "no software card binary at $bin (cargo build failed?)"
    "$bin" --state "$state" --serial "$serial" --reader "$reader" \
        >"$out" 2>"$err" </dev/null 9>&- &
    pid=$!
    KB_SOFTCARD_PIDS+=("$pid")
    # shellcheck disable=SC2034 # read by the calling script
    KB_SOFTCARD_PID=$pid
    deadline=$((SECONDS + ${KB_SOFTCARD_TIMEOUT:-15}))
    until grep -q "^keybound-softcard: card $serial inserted in reader $reader " "$out"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            kb_show_log "$err" "keybound-softcard stderr"
            kb_die "keybound-softcard exited before the card was inserted"
        fi
        if ((SECONDS >= deadline)); then
            kb_show_log "$err" "keybound-softcard stderr"
            kb_die "software card $serial not inserted in reader $reader within ${KB_SOFTCARD_TIMEOUT:-15}s (is another card using port $((35963 + reader))?)"
        fi
        sleep 0.1
    done
    sed 's/^/    /' "$out"
    # The card is connected to vpcd; pcscd polls the reader (400 ms), so wait
    # until a PIV client really sees this card.
    kb_wait_for_card "$reader" present "$serial" ||
        kb_die "software card $serial is connected but pcscd does not serve it in reader $reader"
}

# kb_stop_softcard PID READER: pull the card out and wait until the reader is empty.
kb_stop_softcard() {
    local pid=$1 reader=$2 p keep=()
    kb_kill_and_wait "$pid"
    for p in "${KB_SOFTCARD_PIDS[@]}"; do
        [ "$p" = "$pid" ] || keep+=("$p")
    done
    KB_SOFTCARD_PIDS=("${keep[@]}")
    kb_wait_for_card "$reader" absent
}
