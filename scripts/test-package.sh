#!/usr/bin/env bash
# The Debian package, tested as an operator meets it: it builds (scripts/deb.sh; PROFILE=dev by
# default here, packaging the debug build the tests made), installs with dpkg in a fresh minimal
# Debian root (mmdebstrap, cached under $VMFARM_CACHE), systemd-analyze verify accepts its units
# in that root, and its server, started there as the package's user from the package's config,
# answers /healthz (in a network namespace of its own: nothing else reaches it, it clashes with
# nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${VMFARM_CACHE:-$HOME/.cache/vmfarm}/package-root
say() { echo "test-package: $*"; }

PROFILE=${PROFILE:-dev} bash scripts/deb.sh >/dev/null
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")
deb=$(ls -t "$target"/debian/vmfarm_*.deb | head -1)
say "built $(basename "$deb") ($(du -h "$deb" | cut -f1))"

mkdir -p "$cache"
base=$cache/bookworm-minbase.tar
if [ ! -s "$base" ]; then
  mmdebstrap --quiet --variant=minbase --include=passwd,systemd bookworm "$base.part.tar"
  mv "$base.part.tar" "$base"
fi
root=$(mktemp -d /tmp/vmfarm-package.XXXXXX)
trap 'rm -rf "$root"' EXIT
tar -C "$root" -xf "$base"
cp "$deb" "$root/tmp/vmfarm.deb"
chroot "$root" dpkg -i /tmp/vmfarm.deb >/dev/null
for want in /usr/bin/vmfarm /usr/lib/vmfarm/vmfarm-agent /etc/vmfarm/server.toml \
  /etc/vmfarm/worker.toml /usr/lib/systemd/system/vmfarm-server.service \
  /usr/share/man/man1/vmfarm-server.1.gz /usr/share/bash-completion/completions/vmfarm; do
  [ -e "$root$want" ] || { say "FAIL: the package did not install $want"; exit 1; }
done
for user in vmfarm vmfarm-worker; do
  chroot "$root" getent passwd "$user" >/dev/null || { say "FAIL: no user $user"; exit 1; }
done
chroot "$root" id -nG vmfarm-worker | grep -qw kvm || { say "FAIL: vmfarm-worker is not in kvm"; exit 1; }
say "installed in a fresh bookworm root: binary, agent, configs, units, man pages, users"

systemd-analyze verify --man=no --root="$root" vmfarm-server.service vmfarm-worker.service
say "systemd-analyze verify accepts vmfarm-server.service and vmfarm-worker.service"

# The unit's command, as its user, with its config, in the root: does it answer?
unshare --net bash -euo pipefail -c '
  root=$1
  ip link set lo up
  chroot --userspec=vmfarm:vmfarm "$root" env VMFARM_CONFIG=/etc/vmfarm/server.toml \
    VMFARM_LOG=warn /usr/bin/vmfarm server >"$root/tmp/server.log" 2>&1 &
  server=$!
  for _ in $(seq 1 100); do
    if answer=$(curl -sf http://127.0.0.1:8080/healthz); then
      kill "$server"
      echo "test-package: the installed server answers /healthz: $answer"
      exit 0
    fi
    sleep 0.2
  done
  kill "$server" 2>/dev/null || true
  echo "test-package: FAIL: the installed server did not answer; its output:" >&2
  cat "$root/tmp/server.log" >&2
  exit 1
' - "$root"
[ -s "$root/var/lib/vmfarm/server/vmfarm.db" ] || { say "FAIL: no database in /var/lib/vmfarm/server"; exit 1; }
say "ok"
