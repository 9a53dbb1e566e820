#!/usr/bin/env bash
# A throw-away PostgreSQL server on loopback for the tests.
#   start: prints `export VMFARM_TEST_POSTGRES=... VMFARM_TEST_POSTGRES_DIR=...` (use with eval)
#   stop:  stops the server named by VMFARM_TEST_POSTGRES_DIR and removes its files
set -euo pipefail
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
[ -x "$bin/initdb" ] || { echo "PostgreSQL is not installed: run scripts/install-deps.sh test" >&2; exit 1; }
as_pg=()
[ "$(id -u)" = 0 ] && as_pg=(runuser -u postgres --)

case "${1:-}" in
start)
  dir=$(mktemp -d /tmp/vmfarm-pg.XXXXXX)
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "${as_pg[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1
  "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=400" start >/dev/null
  echo "export VMFARM_TEST_POSTGRES=postgres://postgres@127.0.0.1:$port/postgres VMFARM_TEST_POSTGRES_DIR=$dir"
  ;;
stop)
  dir=${VMFARM_TEST_POSTGRES_DIR:?}
  "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"
  ;;
*)
  echo "usage: $0 start|stop" >&2
  exit 2
  ;;
esac
