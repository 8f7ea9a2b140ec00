#!/usr/bin/env bash
# Install what keybound needs to build, test and demo on Debian 12.
# Idempotent: installs only what is missing; a second run takes a second and
# prints one line. Starts no daemon (demo.sh and test.sh start pcscd on demand).
#
# To add a Debian package: add one line to APT_PACKAGES.
# To add a tool from crates.io: add one "command:crate" line to CARGO_TOOLS.
set -Eeuo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
KB_PROG=setup
kb_path_setup

APT_PACKAGES=(
    pcscd           # PC/SC daemon: talks to smart cards, real or virtual
    vsmartcard-vpcd # pcscd driver for the virtual readers "Virtual PCD 00 00/01" (TCP 35963/35964)
    pcsc-tools      # pcsc_scan: the scripts wait for readers with it
    yubico-piv-tool # independent PIV client: tests and scripts check the software card with it
    libpcsclite-dev # the pcsc crate links libpcsclite
    pkg-config      # finds libpcsclite (and later libfuse3) for the build
    fuse3           # fusermount3, /dev/fuse: vault mounts
    libfuse3-dev    # FUSE headers
    build-essential # cc: the Rust linker and C parts of crates
    ca-certificates # HTTPS for rustup and crates.io
    curl            # rustup installer, when Rust is missing
    procps          # pgrep: the scripts find pcscd with it
    openssl         # issues a certificate for the card key in the yubico-piv-tool test
    gocryptfs       # the peer: conformance.sh and bench.sh run the same workloads on it
    linux-source    # /usr/src/linux-source-*.tar.xz, the untar workload of bench.sh
    xz-utils        # unpacks that tarball
    time            # /usr/bin/time: wall time and peak memory in the scripts
    attr            # getfattr/setfattr: xattr checks by hand
    rsync           # backup of a mounted container (later issues)
    restic          # backup of a mounted container (later issues)
    shellcheck      # lints scripts/*.sh
    libacl1-dev     # libacl.so: `cargo install pjdfstest` links it (crate exacl)
)

# Binaries from crates.io, "command:crate", installed with cargo install --locked.
CARGO_TOOLS=(
    cargo-nextest:cargo-nextest # the test runner (scripts/test.sh)
    # Pinned: tests/common/suites.rs and conformance.sh parse their output.
    pjdfstest:pjdfstest@0.2.2   # POSIX conformance suite (scripts/conformance.sh, tests/common/suites.rs)
    fsx:fsx@0.3.2               # file data integrity exerciser, mmap included (same)
)

# Rust components the CI needs (cargo fmt, cargo clippy).
RUST_COMPONENTS=(rustfmt clippy)

did=()  # what this run changed, for the summary

# ---- Debian packages -----------------------------------------------------------

pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

install_apt_packages() {
    command -v dpkg-query >/dev/null 2>&1 ||
        kb_die "dpkg-query not found: this script supports Debian 12 (bookworm) and derivatives"
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        pkg_installed "$pkg" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -gt 0 ] || return 0

    kb_say "installing Debian packages: ${missing[*]}"
    if ! kb_can_be_root; then
        kb_die "not root and no sudo; as root, run:
    apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
    fi

    # pcscd's install script may start pcscd (through /etc/init.d) before
    # vsmartcard-vpcd is installed; such a pcscd never shows the virtual
    # readers. Remember which pcscd processes existed before.
    local before after pid
    before=" $(kb_pcscd_pids | tr '\n' ' ') "

    local apt_opts=(-y -q --no-install-recommends -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=300)
    if ! kb_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q -o DPkg::Lock::Timeout=300 >/dev/null; then
        kb_die "apt-get update failed (network? run it by hand to see why)"
    fi
    # Show only the "Setting up" lines; apt's errors go to stderr and stay visible.
    kb_as_root env DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" "${missing[@]}" \
        </dev/null | grep -E '^Setting up' || true
    for pkg in "${missing[@]}"; do
        pkg_installed "$pkg" || kb_die "package $pkg is still not installed (see apt-get output above)"
    done
    did+=("installed ${missing[*]}")

    after=$(kb_pcscd_pids)
    for pid in $after; do
        if [[ "$before" != *" $pid "* ]]; then
            kb_say "stopping pcscd $pid that the package install started (it would not see the virtual readers); the scripts start pcscd on demand"
            kb_as_root kill "$pid" 2>/dev/null || true
            did+=("stopped the pcscd apt had started")
        fi
    done
}

# ---- Rust ------------------------------------------------------------------------

# The oldest Rust the package builds with: rust-version in Cargo.toml.
min_rust_version() {
    sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$KB_ROOT/Cargo.toml" | head -n 1
}

version_at_least() { # have want
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]
}

ensure_rust() {
    local want have
    want=$(min_rust_version)
    want=${want:-1.85}
    if ! command -v cargo >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            kb_say "cargo not found; installing the stable toolchain with rustup"
            rustup toolchain install stable --profile minimal --component "${RUST_COMPONENTS[@]}"
            rustup default stable
        else
            kb_say "Rust not found; installing it with rustup (https://rustup.rs) into ${CARGO_HOME:-$HOME/.cargo}"
            curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
                sh -s -- -y --no-modify-path --profile minimal --component "${RUST_COMPONENTS[@]}"
            kb_path_setup
        fi
        command -v cargo >/dev/null 2>&1 || kb_die "Rust installation failed: cargo still not found"
        did+=("installed Rust")
    fi

    have=$(rustc --version | awk '{print $2}')
    if ! version_at_least "$have" "$want"; then
        if command -v rustup >/dev/null 2>&1; then
            kb_say "Rust $have is older than $want (Cargo.toml rust-version); updating stable"
            rustup update stable
            have=$(rustc --version | awk '{print $2}')
            did+=("updated Rust to $have")
        fi
        version_at_least "$have" "$want" ||
            kb_die "Rust $have is older than $want, which keybound needs; install a newer toolchain (https://rustup.rs)"
    fi
    RUST_VERSION=$have

    local comp missing=()
    for comp in "${RUST_COMPONENTS[@]}"; do
        case $comp in
        rustfmt) cargo fmt --version >/dev/null 2>&1 || missing+=("$comp") ;;
        clippy) cargo clippy --version >/dev/null 2>&1 || missing+=("$comp") ;;
        esac
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        command -v rustup >/dev/null 2>&1 ||
            kb_die "Rust components missing (${missing[*]}) and no rustup to add them"
        kb_say "adding Rust components: ${missing[*]}"
        rustup component add "${missing[@]}"
        did+=("added ${missing[*]}")
    fi
}

ensure_cargo_tools() {
    local entry cmd crate
    for entry in "${CARGO_TOOLS[@]}"; do
        cmd=${entry%%:*}
        crate=${entry#*:}
        command -v "$cmd" >/dev/null 2>&1 && continue
        kb_say "installing $crate from crates.io (cargo install --locked $crate; takes a few minutes)"
        cargo install --locked "$crate"
        kb_path_setup
        command -v "$cmd" >/dev/null 2>&1 || kb_die "cargo install $crate did not provide $cmd"
        did+=("installed $crate")
    done
}

# ---- main ------------------------------------------------------------------------

install_apt_packages
ensure_rust
ensure_cargo_tools

tools=""
for entry in "${CARGO_TOOLS[@]}"; do
    tools+=", ${entry%%:*}"
done
if [ "${#did[@]}" -eq 0 ]; then
    kb_say "ok: ${#APT_PACKAGES[@]} Debian packages present, Rust $RUST_VERSION$tools; nothing to do"
else
    for line in "${did[@]}"; do
        kb_say "did: $line"
    done
    kb_say "ok: ${#APT_PACKAGES[@]} Debian packages present, Rust $RUST_VERSION$tools"
fi
