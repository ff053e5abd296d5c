#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the store's tests (crate executor/store).
#
#   eval "$(scripts/postgres.sh start)"   # exports STEPBOX_TEST_POSTGRES_URL and _DIR
#   cargo test -p stepbox-store
#   scripts/postgres.sh stop "$STEPBOX_TEST_POSTGRES_DIR"
#
# start: installs Debian's `postgresql` when no `initdb` is found, creates a temporary directory,
# runs `initdb` and `postgres` as the unprivileged user `stepbox-pg` (PostgreSQL refuses to run
# as root; when not root, as the current user), listening on a free 127.0.0.1 port and on a unix
# socket in that directory, with durability off (fsync, synchronous_commit: test data only).
# Creates the role `stepbox` (password auth, CREATEDB so each test makes its own database) and
# the database `stepbox`, then prints `export ...` lines on stdout; progress goes to stderr.
# If STEPBOX_TEST_POSTGRES_DIR names a cluster that is still running, start prints its exports
# again instead of starting another.
# stop DIR: stops that cluster and deletes DIR (only a directory this script created).
set -euo pipefail

PG_USER=stepbox-pg
ROLE=stepbox
MARKER=.stepbox-postgres

log() { echo "postgres.sh: $*" >&2; }

pg_bin() {
    local bin
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v initdb)")"
        return
    fi
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -z "$bin" ]]; then
        log "installing Debian's postgresql (apt-get)"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
        bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    echo "$bin"
}

# Runs a command as the cluster's owner.
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u "$PG_USER" -- "$@"
    else
        "$@"
    fi
}

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

print_exports() {
    local dir=$1
    echo "export STEPBOX_TEST_POSTGRES_URL='$(cat "$dir/url")'"
    echo "export STEPBOX_TEST_POSTGRES_DIR='$dir'"
}

start() {
    local existing=${STEPBOX_TEST_POSTGRES_DIR:-}
    if [[ -n "$existing" && -f "$existing/$MARKER" && -f "$existing/url" ]]; then
        local bin
        bin=$(pg_bin)
        if (cd "$existing" && as_owner "$bin/pg_ctl" -D "$existing/data" status >/dev/null 2>&1); then
            log "reusing the cluster in $existing"
            print_exports "$existing"
            return
        fi
    fi

    local bin dir port password
    bin=$(pg_bin)
    if [[ $(id -u) -eq 0 ]] && ! id "$PG_USER" >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_USER"
    fi
    dir=$(mktemp -d "${TMPDIR:-/tmp}/stepbox-pg.XXXXXX")
    touch "$dir/$MARKER"
    [[ $(id -u) -eq 0 ]] && chown -R "$PG_USER" "$dir"
    chmod 700 "$dir"
    cd "$dir"
    password=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')

    log "initdb in $dir ($bin)"
    as_owner "$bin/initdb" -D "$dir/data" -U postgres -E UTF8 --no-locale \
        --auth-local=trust --auth-host=scram-sha-256 >"$dir/initdb.log" 2>&1 ||
        { cat "$dir/initdb.log" >&2; exit 1; }

    local started=""
    for port in $(seq 55432 55531); do
        port_free "$port" || continue
        if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 30 \
            -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
            start >/dev/null 2>&1; then
            started=$port
            break
        fi
        log "port $port failed, trying the next"
    done
    if [[ -z "$started" ]]; then
        log "could not start postgres; log:"
        cat "$dir/postgres.log" >&2 || true
        exit 1
    fi
    port=$started

    as_owner "$bin/psql" -h "$dir" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -q \
        -c "CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$password'" \
        -c "CREATE DATABASE $ROLE OWNER $ROLE" >&2
    echo "postgres://$ROLE:$password@127.0.0.1:$port/$ROLE" >"$dir/url"
    [[ $(id -u) -eq 0 ]] && chown "$PG_USER" "$dir/url"
    log "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port, socket and data in $dir"
    print_exports "$dir"
}

stop() {
    local dir=${1:?usage: postgres.sh stop DIR}
    if [[ ! -f "$dir/$MARKER" ]]; then
        log "$dir was not made by this script; not touching it"
        exit 1
    fi
    local bin
    bin=$(pg_bin)
    (cd "$dir" && as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1) || true
    rm -rf "$dir"
    log "stopped and removed $dir"
}

case "${1:-}" in
    start) start ;;
    stop) shift; stop "$@" ;;
    *) echo "usage: $0 start | stop DIR" >&2; exit 2 ;;
esac
