#!/usr/bin/env bash
# Runs a private RabbitMQ node for Ponte's demo, tests and benchmarks: Debian's rabbitmq-server,
# on loopback only, with its own node name, ports and data folder, so it never touches a system
# broker and several can run side by side.
#
#   scripts/broker.sh start  NAME PORT DIR   start (installing rabbitmq-server if missing); waits until ready
#   scripts/broker.sh stop   NAME PORT DIR   stop the node
#   scripts/broker.sh kill   NAME PORT DIR   kill -9 the node (fault tests)
#   scripts/broker.sh ctl    NAME PORT DIR   ARGS...  run rabbitmqctl against the node
#
# PONTE_BROKER_PLUGINS (comma-separated) enables plugins. PONTE_BROKER_TLS_PORT adds a TLS
# listener that requires a client certificate, with the PEM files ca.pem, server.pem and
# server.key of the folder PONTE_BROKER_TLS_DIR (and, with rabbitmq_auth_mechanism_ssl among
# the plugins, the EXTERNAL mechanism: a client logs in as its certificate's common name).
set -euo pipefail

cmd=${1:?usage: broker.sh start|stop|kill|ctl NAME PORT DIR}
name=${2:?node name}
port=${3:?AMQP port}
dir=${4:?data folder}
shift 4

install_broker() {
    if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
        # Debian's postinst tries to start the system service; policy-rc.d may refuse, which is fine:
        # Ponte runs its own node below.
        . "$(dirname "${BASH_SOURCE[0]}")/debian.sh"
        install_debian broker.sh rabbitmq-server
    fi
}

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
export HOME="$dir"  # the Erlang cookie lives here, shared by the node and rabbitmqctl
export RABBITMQ_NODENAME="ponte-$name@localhost"
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT="$port"
# The node's Erlang distribution port. Kept below Linux's ephemeral range (32768 and up): a port
# there may be taken at any moment by some outgoing connection's local end, and the node would
# then fail to start (`dist_port_already_used`).
export RABBITMQ_DIST_PORT=$((port + 6000))
export RABBITMQ_MNESIA_BASE="$dir/mnesia"
export RABBITMQ_LOG_BASE="$dir/log"
export RABBITMQ_PID_FILE="$dir/node.pid"
# A node that fails to start writes erl_crash.dump where it was started: keep it with its data.
export ERL_CRASH_DUMP="$dir/erl_crash.dump"
export RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
export RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
export ERL_EPMD_ADDRESS=127.0.0.1
bin=/usr/lib/rabbitmq/bin

ctl() { "$bin/rabbitmqctl" -n "$RABBITMQ_NODENAME" "$@"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

case "$cmd" in
start)
    install_broker
    if port_open; then
        echo "broker.sh: something already listens on 127.0.0.1:$port; using it" >&2
        exit 0
    fi
    cat >"$RABBITMQ_CONFIG_FILE" <<CONF
listeners.tcp.default = 127.0.0.1:$port
loopback_users.guest = true
disk_free_limit.absolute = 50MB
log.file.level = warning
log.console = false
CONF
    if [ -n "${PONTE_BROKER_TLS_PORT:-}" ]; then
        tls=$(cd "${PONTE_BROKER_TLS_DIR:?folder of ca.pem, server.pem, server.key}" && pwd)
        cat >>"$RABBITMQ_CONFIG_FILE" <<CONF
listeners.ssl.default = 127.0.0.1:$PONTE_BROKER_TLS_PORT
ssl_options.cacertfile = $tls/ca.pem
ssl_options.certfile = $tls/server.pem
ssl_options.keyfile = $tls/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
ssl_cert_login_from = common_name
CONF
        # With this plugin a client may log in as its certificate's common name, no password.
        if [[ ",${PONTE_BROKER_PLUGINS:-}," == *,rabbitmq_auth_mechanism_ssl,* ]]; then
            printf 'auth_mechanisms.1 = PLAIN\nauth_mechanisms.2 = AMQPLAIN\nauth_mechanisms.3 = EXTERNAL\n' \
                >>"$RABBITMQ_CONFIG_FILE"
        fi
    fi
    echo "[]." >"$RABBITMQ_ADVANCED_CONFIG_FILE"
    echo "[${PONTE_BROKER_PLUGINS:-}]." >"$RABBITMQ_ENABLED_PLUGINS_FILE"
    nohup "$bin/rabbitmq-server" >"$dir/server.out" 2>&1 </dev/null &
    echo $! >"$dir/launcher.pid"
    for _ in $(seq 1 120); do
        if port_open; then
            ctl await_startup >/dev/null 2>&1 || true
            echo "broker.sh: $RABBITMQ_NODENAME ready on amqp://127.0.0.1:$port" >&2
            exit 0
        fi
        if ! kill -0 "$(cat "$dir/launcher.pid")" 2>/dev/null; then
            echo "broker.sh: the node exited during start-up; its output:" >&2
            tail -n 40 "$dir/server.out" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "broker.sh: the node did not open port $port within 60 s" >&2
    exit 1
    ;;
stop)
    ctl stop >/dev/null 2>&1 || true
    ;;
kill)
    if [ -f "$RABBITMQ_PID_FILE" ]; then kill -9 "$(cat "$RABBITMQ_PID_FILE")" 2>/dev/null || true; fi
    ;;
ctl)
    ctl "$@"
    ;;
*)
    echo "broker.sh: unknown command $cmd" >&2
    exit 2
    ;;
esac
