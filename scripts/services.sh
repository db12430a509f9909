#!/usr/bin/env bash
# RabbitMQ and PostgreSQL for Palisade on this machine.
#
#   scripts/services.sh ensure            the machine's own servers (127.0.0.1:5672, 127.0.0.1:5432) answer,
#                                         started if installed and stopped; else say what is missing
#   scripts/services.sh ensure --private  the same, but fall back to private servers under .run/ (make run);
#                                         prints `export PALISADE_..._URL=...` for each on stdout, for eval
#   scripts/services.sh stop              stop the private servers
#
# Ports can be overridden (AMQP_PORT, PG_PORT, PRIVATE_AMQP_PORT, PRIVATE_PG_PORT), and the wait (DEADLINE).
set -euo pipefail

RUN=$(cd "$(dirname "$0")/.." && pwd)/.run
AMQP_PORT=${AMQP_PORT:-5672}
PG_PORT=${PG_PORT:-5432}
PRIVATE_AMQP_PORT=${PRIVATE_AMQP_PORT:-55672}
PRIVATE_PG_PORT=${PRIVATE_PG_PORT:-55432}
DEADLINE=${DEADLINE:-60}

say() { echo "services: $*" >&2; }

answers() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

wait_for() { # name port
    local until=$((SECONDS + DEADLINE))
    while ! answers "$2"; do
        if ((SECONDS >= until)); then
            say "$1 still does not answer on 127.0.0.1:$2 after ${DEADLINE}s"
            return 1
        fi
        sleep 0.5
    done
}

# PostgreSQL refuses to run as root: run its programs as the postgres user then.
as_postgres() {
    if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_bin() { # directory of initdb/pg_ctl: Debian keeps them out of PATH
    local pg_ctl
    pg_ctl=$(command -v pg_ctl || ls -d /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -n 1) || return 1
    [[ -n $pg_ctl ]] && dirname "$pg_ctl"
}

start_machine_postgresql() {
    command -v pg_ctlcluster >/dev/null && [[ -d /etc/postgresql ]] || return 1
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    say "starting the machine's PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2
}

start_machine_rabbitmq() {
    command -v rabbitmq-server >/dev/null || return 1
    say "starting the machine's RabbitMQ"
    rabbitmq-server -detached >&2
}

# Private servers run in their own session (setsid) so Ctrl-C on `make run` does not stop them
# before the workers have finished.
start_private_postgresql() {
    local bin
    bin=$(pg_bin) || return 1
    mkdir -p "$RUN/pg"
    [[ $(id -u) != 0 ]] || chown postgres: "$RUN/pg"
    if [[ ! -f $RUN/pg/PG_VERSION ]]; then
        say "creating a private PostgreSQL in $RUN/pg"
        as_postgres "$bin/initdb" -D "$RUN/pg" -U postgres -A trust -E UTF8 >"$RUN/pg-initdb.log" ||
            { say "initdb failed, see $RUN/pg-initdb.log"; return 1; }
    fi
    local start=("$bin/pg_ctl" -D "$RUN/pg" -l "$RUN/pg/server.log"
        -o "-p $PRIVATE_PG_PORT -k $RUN/pg -c listen_addresses=127.0.0.1" start)
    [[ $(id -u) != 0 ]] || start=(runuser -u postgres -- "${start[@]}")
    say "starting a private PostgreSQL on 127.0.0.1:$PRIVATE_PG_PORT"
    setsid -w "${start[@]}" >&2
}

start_private_rabbitmq() {
    local server=/usr/lib/rabbitmq/bin/rabbitmq-server # Debian's wrapper in PATH insists on root/rabbitmq
    [[ -x $server ]] || server=$(command -v rabbitmq-server) || return 1
    local dir=$RUN/rabbitmq
    mkdir -p "$dir"
    echo "listeners.tcp.1 = 127.0.0.1:$PRIVATE_AMQP_PORT" >"$dir/rabbitmq.conf"
    echo "[]." >"$dir/enabled_plugins" # no management/prometheus plugin: their ports are the machine's
    : >"$dir/rabbitmq-env.conf"        # not /etc/rabbitmq/rabbitmq-env.conf, which names the machine's node
    say "starting a private RabbitMQ on 127.0.0.1:$PRIVATE_AMQP_PORT"
    HOME=$dir \
        RABBITMQ_NODENAME=palisade-dev@localhost \
        RABBITMQ_NODE_PORT=$PRIVATE_AMQP_PORT \
        RABBITMQ_DIST_PORT=$((PRIVATE_AMQP_PORT + 1)) \
        RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq-env.conf \
        RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf \
        RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins \
        RABBITMQ_MNESIA_BASE=$dir/mnesia \
        RABBITMQ_LOG_BASE=$dir/log \
        RABBITMQ_PID_FILE=$dir/pid \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        setsid -f "$server" >"$dir/server.out" 2>&1
}

missing=()

# ensure NAME PORT PRIVATE_PORT ENV_VAR PRIVATE_URL COMPOSE_SERVICE DEBIAN_PACKAGE
ensure() {
    local name=$1 port=$2 private_port=$3 var=$4 url=$5 what
    answers "$port" && return 0
    what=${name,,}
    say "$name does not answer on 127.0.0.1:$port"
    if "start_machine_$what" && wait_for "$name" "$port"; then
        return 0
    fi
    if [[ $private == yes ]]; then
        if answers "$private_port" || { "start_private_$what" && wait_for "$name" "$private_port"; }; then
            say "using the private $name: export $var=$url"
            echo "export $var=$url"
            return 0
        fi
    fi
    missing+=("$name: docker compose up -d $6   (or: apt-get install $7)")
}

case ${1:-} in
ensure)
    private=no
    [[ ${2:-} != --private ]] || private=yes
    ensure RabbitMQ "$AMQP_PORT" "$PRIVATE_AMQP_PORT" PALISADE_AMQP_URL \
        "amqp://guest:guest@127.0.0.1:$PRIVATE_AMQP_PORT/" rabbitmq rabbitmq-server
    ensure PostgreSQL "$PG_PORT" "$PRIVATE_PG_PORT" PALISADE_DATABASE_URL \
        "postgresql://postgres@127.0.0.1:$PRIVATE_PG_PORT/palisade" postgres postgresql
    if ((${#missing[@]})); then
        say "missing, and could not be started here:"
        printf '  %s\n' "${missing[@]}" >&2
        exit 1
    fi
    say "RabbitMQ and PostgreSQL answer"
    ;;
stop)
    if [[ -f $RUN/pg/postmaster.pid ]]; then
        as_postgres "$(pg_bin)/pg_ctl" -D "$RUN/pg" -m fast stop >&2
    fi
    pid=$(cat "$RUN/rabbitmq/pid" 2>/dev/null) || pid=
    if [[ -n $pid ]] && ps -o args= -p "$pid" | grep -qF -- "-home $RUN/rabbitmq" && kill "$pid"; then
        say "stopping the private RabbitMQ"
        while kill -0 "$pid" 2>/dev/null; do sleep 0.5; done
    fi
    rm -f "$RUN/rabbitmq/pid"
    ;;
*)
    echo "usage: $0 ensure [--private] | stop" >&2
    exit 2
    ;;
esac
