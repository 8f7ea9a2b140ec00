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
KB_MOUNTS=()          # mountpoints to unmount on exit (kb_track_mount)

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
    local rc=$? pid mnt
    set +e
    trap - EXIT HUP INT TERM
    for mnt in "${KB_MOUNTS[@]}"; do
        kb_unmount_quietly "$mnt"
    done
    KB_MOUNTS=()
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

# kb_track_mount DIR: unmount DIR when the script exits (if still mounted).
kb_track_mount() { KB_MOUNTS+=("$1"); }

# Unmount DIR if it is a mount point: cleanly (the vault commits), else lazily.
kb_unmount_quietly() {
    local dir=$1
    mountpoint -q "$dir" 2>/dev/null || return 0
    umount "$dir" 2>/dev/null || fusermount3 -u "$dir" 2>/dev/null ||
        umount -l "$dir" 2>/dev/null || true
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

# ==============================================================================
# ---- file systems under test: mounts, work dirs, gocryptfs, keybound vaults ----
# Added for scripts/conformance.sh and scripts/bench.sh. Call kb_fs_track
# right after kb_init: on exit, failure or Ctrl-C every mount registered here
# is unmounted (newest first) and every registered work dir removed, before
# kb_cleanup stops the software cards and pcscd.
# ==============================================================================

KB_FS_MOUNTS=()          # "kind:dir", newest last; kind is keybound, gocryptfs or fuse
KB_FS_WORKDIRS=()        # dirs to remove on exit (after the unmounts)
KB_FS_WORKDIR=""         # set by kb_fs_make_workdir
KB_KEYBOUND=""        # the keybound binary (kb_build_keybound)
KB_SOFTCARD=""        # the keybound-softcard binary
KB_KB_PASSWORD_FILE="" # vault password file (kb_keybound_token_ready)
KB_KB_PIN_FILE=""     # the card's PIN file
KB_KB_SERIAL=""       # the software card's serial number
KB_LAST_SECONDS=""    # wall time of the last kb_timed command, seconds (x.xxx)

kb_fs_track() {
    trap kb_fs_cleanup EXIT
}

KB_FS_EXIT_HOOK=""    # a function to run first on exit, with the exit status (e.g. print partial results)

# EXIT trap (kb_fs_track): run KB_FS_EXIT_HOOK, unmount, remove work dirs,
# then kb_cleanup (which keeps the script's exit status and exits).
kb_fs_cleanup() {
    local rc=$? i dir hook=$KB_FS_EXIT_HOOK
    set +e
    trap 'kb_warn "interrupted during cleanup"' INT TERM HUP
    KB_FS_EXIT_HOOK=""
    if [ -n "$hook" ]; then
        "$hook" "$rc"
    fi
    # kb_fs_unmount unregisters (every entry for that dir): the list shrinks.
    for ((i = ${#KB_FS_MOUNTS[@]} - 1; i >= 0; i--)); do
        [ -n "${KB_FS_MOUNTS[i]:-}" ] || continue
        kb_fs_unmount "${KB_FS_MOUNTS[i]#*:}"
    done
    for dir in "${KB_FS_WORKDIRS[@]}"; do
        kb_fs_remove_workdir "$dir"
    done
    KB_FS_WORKDIRS=()
    (exit "$rc")
    kb_cleanup
}

kb_require_root() {
    kb_is_root || kb_die "$1 must run as root (try: sudo $0 $*)"
}

# kb_now: seconds since the epoch, with nanoseconds.
kb_now() { date +%s.%N; }

# kb_timed CMD...: run CMD (stdin closed, readers lock not inherited), set
# KB_LAST_SECONDS to its wall time. Returns CMD's status.
kb_timed() {
    local t0 t1 rc=0
    t0=$(kb_now)
    "$@" </dev/null 9>&- || rc=$?
    t1=$(kb_now)
    # shellcheck disable=SC2034 # read by the calling script
    KB_LAST_SECONDS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    return "$rc"
}

# Write back dirty pages and drop the page, dentry and inode caches.
kb_drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches || kb_die "cannot drop caches (need root)"
}

# kb_fs_make_workdir PARENT PREFIX: make a 0755 dir (other users must reach
# mounts inside it: pjdfstest switches to nobody), removed on exit. Sets
# KB_FS_WORKDIR. Not in $(...): the registration must happen in this shell.
kb_fs_make_workdir() {
    local parent=$1 prefix=$2
    mkdir -p "$parent"
    KB_FS_WORKDIR=$(mktemp -d "$parent/$prefix.XXXXXX")
    chmod 755 "$KB_FS_WORKDIR"
    KB_FS_WORKDIRS+=("$KB_FS_WORKDIR")
}

# Remove a work dir, unless something is still mounted inside it.
kb_fs_remove_workdir() {
    local dir=$1 m
    [ -d "$dir" ] || return 0
    if [ "${KB_KEEP_TMP:-0}" = 1 ]; then
        kb_say "kept work dir $dir (KB_KEEP_TMP=1)"
        return 0
    fi
    m=$(findmnt -rn -o TARGET | awk -v d="$dir" 'index($0, d "/") == 1 || $0 == d' | head -n 1)
    if [ -n "$m" ]; then
        kb_warn "not removing $dir: $m is still mounted"
        return 0
    fi
    rm -rf "$dir"
}

kb_fs_is_mounted() { mountpoint -q "$1" 2>/dev/null; }

# kb_fs_register KIND DIR: unmount DIR on exit.
kb_fs_register() { KB_FS_MOUNTS+=("$1:$2"); }

kb_fs_unregister() {
    local e keep=()
    for e in "${KB_FS_MOUNTS[@]}"; do
        [ "${e#*:}" = "$1" ] || keep+=("$e")
    done
    KB_FS_MOUNTS=("${keep[@]}")
}

kb_fs_kind() {
    local e
    for e in "${KB_FS_MOUNTS[@]}"; do
        if [ "${e#*:}" = "$1" ]; then
            printf '%s\n' "${e%%:*}"
            return 0
        fi
    done
    printf 'fuse\n'
}

# kb_fs_wait_unmounted DIR [TIMEOUT]
kb_fs_wait_unmounted() {
    local dir=$1 timeout=${2:-10} deadline
    deadline=$((SECONDS + timeout))
    while kb_fs_is_mounted "$dir"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# kb_fs_unmount DIR: unmount one of our mounts (keybound: `keybound unmount`,
# which commits and waits for its daemon; others: fusermount3 -u), falling
# back to a lazy unmount. Never fails; warns.
kb_fs_unmount() {
    local dir=$1 kind
    kind=$(kb_fs_kind "$dir")
    kb_fs_unregister "$dir"
    kb_fs_is_mounted "$dir" || return 0
    if [ "$kind" = keybound ] && [ -n "$KB_KEYBOUND" ] && [ -x "$KB_KEYBOUND" ]; then
        timeout 120 "$KB_KEYBOUND" unmount "$dir" </dev/null 9>&- >/dev/null 2>&1 ||
            kb_warn "keybound unmount $dir failed; unmounting with fusermount3"
    fi
    if kb_fs_is_mounted "$dir"; then
        fusermount3 -u "$dir" </dev/null 9>&- 2>/dev/null || umount "$dir" 2>/dev/null || true
    fi
    if ! kb_fs_wait_unmounted "$dir" 10; then
        kb_warn "$dir is busy; lazy unmount"
        fusermount3 -u -z "$dir" 2>/dev/null || umount -l "$dir" 2>/dev/null || true
        kb_fs_wait_unmounted "$dir" 5 || kb_warn "$dir is still mounted"
    fi
}

# kb_secret_file PATH VALUE: write a secret into a 0600 file.
kb_secret_file() {
    (
        umask 077
        printf '%s\n' "$2" >"$1"
    )
}

# ---- gocryptfs ----

# kb_gocryptfs_init CIPHERDIR PASSFILE [GOCRYPTFS OPTIONS...] (e.g. -scryptn 10)
kb_gocryptfs_init() {
    local cipher=$1 pass=$2 log
    shift 2
    log=${KB_TMP:-/tmp}/gocryptfs-init.log
    mkdir -p "$cipher"
    gocryptfs -q -init -passfile "$pass" "$@" "$cipher" </dev/null 9>&- >"$log" 2>&1 || {
        kb_show_log "$log" "gocryptfs -init"
        return 1
    }
}

# kb_gocryptfs_mount CIPHERDIR MOUNTPOINT PASSFILE [GOCRYPTFS OPTIONS...]
# (e.g. -allow_other, which also turns on default_permissions). The daemon's
# messages go to $KB_TMP/gocryptfs.log (-nosyslog: there may be no syslog).
kb_gocryptfs_mount() {
    local cipher=$1 mnt=$2 pass=$3 log
    shift 3
    log=${KB_TMP:-/tmp}/gocryptfs.log
    mkdir -p "$mnt"
    gocryptfs -q -nosyslog -passfile "$pass" "$@" "$cipher" "$mnt" </dev/null 9>&- >>"$log" 2>&1 || {
        kb_show_log "$log" "gocryptfs"
        return 1
    }
    kb_fs_register gocryptfs "$mnt"
    kb_fs_is_mounted "$mnt" || {
        kb_show_log "$log" "gocryptfs"
        kb_warn "gocryptfs returned but $mnt is not a mount point"
        return 1
    }
}

kb_gocryptfs_version() {
    gocryptfs -version 2>/dev/null | head -n 1 | awk '{ sub(/;$/, "", $2); print $1 " " $2 }'
}

# ---- keybound ----

# kb_build_keybound PROFILE: cargo build the binaries (dev or release); sets
# KB_KEYBOUND and KB_SOFTCARD.
kb_build_keybound() {
    local profile=${1:-dev} dir
    dir=${CARGO_TARGET_DIR:-$KB_ROOT/target}
    kb_say "building keybound ($profile profile): cargo build --bins${profile:+ --profile $profile}"
    (cd "$KB_ROOT" && cargo build --quiet --bins --profile "$profile" </dev/null 9>&-) || return 1
    [ "$profile" = dev ] && profile=debug
    KB_KEYBOUND=$dir/$profile/keybound
    KB_SOFTCARD=$dir/$profile/keybound-softcard
    [ -x "$KB_KEYBOUND" ] && [ -x "$KB_SOFTCARD" ]
}

# Whether this keybound has the vault commands (create, mount, unmount);
# says which one is missing.
kb_keybound_has_vault_commands() {
    local c
    for c in create mount unmount; do
        if ! "$KB_KEYBOUND" "$c" --help </dev/null 9>&- >/dev/null 2>&1; then
            kb_warn "this keybound has no working '$c' command yet ($KB_KEYBOUND $c --help fails)"
            return 1
        fi
    done
}

# kb_keybound_token_ready SERIAL: pcscd, the readers lock, a fresh software
# card in the first empty virtual reader, provisioned with `keybound token
# setup` (factory PIN 123456 replaced by a test PIN), a vault password. Sets
# KB_KB_SERIAL, KB_KB_READER, KB_KB_PIN_FILE, KB_KB_PASSWORD_FILE. The card is
# a TEST DEVICE. Commands get --serial, so other cards may be plugged in.
KB_KB_READER=""
kb_keybound_token_ready() {
    local serial=$1 reader log held
    start_pcscd_if_needed
    kb_lock_readers 300
    for reader in 0 1 none; do
        [ "$reader" = none ] && break
        held=$(kb_card_serial "$reader") || break
        kb_warn "reader '$(kb_reader_name "$reader")' already holds card ${held:-?} (not ours); trying the next one"
    done
    if [ "$reader" = none ]; then
        kb_warn "both virtual readers hold a card; pull one out (stop its keybound-softcard)"
        return 1
    fi
    kb_start_softcard "$KB_SOFTCARD" "$KB_TMP/softcard-$serial.json" "$serial" "$reader"
    kb_secret_file "$KB_TMP/factory-pin" 123456
    kb_secret_file "$KB_TMP/pin" 246810
    kb_secret_file "$KB_TMP/vault-password" "keybound-test-password-$RANDOM$RANDOM"
    log=$KB_TMP/token-setup.log
    "$KB_KEYBOUND" token setup --serial "$serial" --pin-file "$KB_TMP/factory-pin" \
        --new-pin-file "$KB_TMP/pin" </dev/null 9>&- >"$log" 2>&1 || {
        kb_show_log "$log" "keybound token setup"
        return 1
    }
    KB_KB_SERIAL=$serial
    # shellcheck disable=SC2034 # read by the calling script
    KB_KB_READER=$reader
    KB_KB_PIN_FILE=$KB_TMP/pin
    KB_KB_PASSWORD_FILE=$KB_TMP/vault-password
}

# kb_keybound_create VAULT [keybound create OPTIONS...] (--size, --kdf-time...)
kb_keybound_create() {
    local vault=$1 log=$KB_TMP/keybound-create.log
    shift
    "$KB_KEYBOUND" create "$vault" --serial "$KB_KB_SERIAL" \
        --password-file "$KB_KB_PASSWORD_FILE" --pin-file "$KB_KB_PIN_FILE" "$@" \
        </dev/null 9>&- >"$log" 2>&1 || {
        kb_show_log "$log" "keybound create"
        return 1
    }
}

# kb_keybound_mount VAULT DIR [keybound mount OPTIONS...]: returns once the
# mount is ready (keybound mount detaches only then).
kb_keybound_mount() {
    local vault=$1 mnt=$2 log=$KB_TMP/keybound-mount.log
    shift 2
    mkdir -p "$mnt"
    "$KB_KEYBOUND" mount "$vault" "$mnt" --serial "$KB_KB_SERIAL" \
        --password-file "$KB_KB_PASSWORD_FILE" --pin-file "$KB_KB_PIN_FILE" "$@" \
        </dev/null 9>&- >>"$log" 2>&1 || {
        kb_show_log "$log" "keybound mount"
        return 1
    }
    kb_fs_register keybound "$mnt"
    kb_fs_is_mounted "$mnt" || {
        kb_warn "keybound mount returned 0 but $mnt is not a mount point"
        return 1
    }
}

# ---- the machine ----

# Print cores, CPU, memory, kernel and the file system holding DIR.
kb_machine_info() {
    local dir=${1:-.} cpu flags
    cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
    flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -x -E 'aes|vaes|avx2|avx512f|sha_ni' | tr '\n' ' ')
    printf 'machine:  %s cores, %s (%s), %s MiB RAM\n' "$(nproc)" "${cpu:-unknown CPU}" "${flags% }" \
        "$(awk '/^MemTotal/ { printf "%d", $2 / 1024 }' /proc/meminfo)"
    printf 'kernel:   %s %s\n' "$(uname -sr)" "$(. /etc/os-release 2>/dev/null && printf '(%s)' "$PRETTY_NAME")"
    printf 'disk:     %s\n' "$(findmnt -n -o SOURCE,FSTYPE,OPTIONS -T "$dir" | awk '{ print $1 ", " $2 ", " $3 }')"
    printf 'load:     %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
}
