#!/bin/sh
# Set up a Debian/Ubuntu machine for microseg: system packages, a kernel
# header tree BCC can use, bpffs, and the project's virtualenv.
# Idempotent: every step checks before it acts, so a second run takes seconds.
set -eu

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

say() { printf 'setup: %s\n' "$*"; }
fail() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || { printf 'setup: error: must run as root (BPF, tc and network namespaces need it)\n' >&2; exit 3; }
command -v apt-get >/dev/null || fail "apt-get not found: microseg's set-up supports Debian and Ubuntu"

ARCH=$(dpkg --print-architecture)
# python3-bpfcc: BCC for Debian's python3 (the PyPI "bcc" is another project).
# linux-headers-$ARCH: BCC's helpers need a kernel header tree (see below).
# The rest: tc/ip, bpftool, the tools the tests and benchmarks drive (the
# discovery tests run private docker and podman engines, busybox-static is
# their image), jq for the README's `watch --json | jq` examples,
# and for the many-hosts tests a real etcd (etcd-server; each test runs its own
# member), openssl for its TLS certificates and curl for its JSON gateway.
PACKAGES="python3-bpfcc python3-venv python3-pip bpftool iproute2 iputils-ping
  libbpf1 linux-headers-$ARCH tmux iperf3 nftables hping3 sockperf prometheus
  procps psmisc jq docker.io busybox-static podman etcd-server
  openssl curl"

missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    say "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || fail "apt-get update failed (is a Debian mirror reachable?)"
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing >/dev/null \
        || fail "apt-get install failed for:$missing"
    # Debian starts packaged services on install; the tests start their own.
    systemctl disable --now prometheus >/dev/null 2>&1 || true
    pkill -x prometheus 2>/dev/null || true
    systemctl disable --now etcd >/dev/null 2>&1 || true
    pkill -x etcd 2>/dev/null || true
fi

# BCC compiles against /lib/modules/$(uname -r)/build. A custom kernel may
# ship no headers; Debian's generic headers then do, provided build points
# at the arch part and source at the common part of Debian's split tree.
KREL=$(uname -r)
MOD=/lib/modules/$KREL
if [ ! -e "$MOD/build/include" ] && [ ! -e /sys/kernel/kheaders.tar.xz ]; then
    HDR=$(ls -d /usr/src/linux-headers-*-"$ARCH" 2>/dev/null | sort -V | tail -n 1)
    [ -n "$HDR" ] || fail "no kernel headers for $KREL and no linux-headers-$ARCH tree in /usr/src"
    COMMON=${HDR%-"$ARCH"}-common
    [ -d "$COMMON" ] || COMMON=$HDR
    mkdir -p "$MOD"
    ln -sfn "$HDR" "$MOD/build"
    ln -sfn "$COMMON" "$MOD/source"
    say "kernel $KREL has no headers: BCC will use $(basename "$HDR") ($MOD/build -> $HDR)"
fi

# bpffs holds the pinned maps that let sessions survive a daemon restart.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf || fail "could not mount bpffs on /sys/fs/bpf"
    say "mounted bpffs on /sys/fs/bpf"
fi

# The venv sees Debian's site-packages (for bcc); everything else from PyPI,
# at the versions requirements.lock pins (`make lock` renews it), so a fresh
# machine runs the libraries the suite was run with.
STAMP="$VENV/.microseg-setup"
WANT=$(cat pyproject.toml requirements.lock | md5sum | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    say "creating virtualenv $VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        -c requirements.lock -e '.[test]' \
        || fail "pip install failed (is PyPI reachable?)"
    echo "$WANT" > "$STAMP"
fi
"$VENV/bin/python" -c 'import bcc, pyroute2' 2>/dev/null \
    || fail "the virtualenv cannot import bcc and pyroute2"
say "ready"
