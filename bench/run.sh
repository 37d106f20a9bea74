#!/usr/bin/env bash
# Ponte's benchmark: Ponte side by side with a RabbitMQ Shovel on the same broker, same run.
# Starts a private RabbitMQ (with the shovel plugin) on 127.0.0.1:5691, builds Ponte in release
# mode and runs the scenarios below, printing each row and appending it to
# target/bench/results.csv (latency samples: target/bench/latency-*.csv).
#
#   bench/run.sh           the full matrix (about 50 minutes on 2 cores), then the AMQP clients
#                          alone (ponte-bench-clients; its table in target/bench/clients.txt)
#   bench/run.sh --quick   a 2,000-message smoke of the base row (what CI runs)
#   bench/run.sh --only NAME   one row of the matrix (or `clients`)
set -euo pipefail
cd "$(dirname "$0")/.."

port=${PONTE_BENCH_BROKER_PORT:-5691}
dir=target/bench-broker
mode=full
only=""
case "${1:-}" in
--quick) mode=quick ;;
--only) only=${2:?row name} ;;
esac

# The demo configuration's statistics partner needs its pseudonym key (demo only).
export PONTE_PSEUDONYM_KEY_OSSERVATORIO_ER=${PONTE_PSEUDONYM_KEY_OSSERVATORIO_ER:-demo-only-pseudonym-key-never-use-for-real-data}
PONTE_BROKER_PLUGINS=rabbitmq_shovel scripts/broker.sh start bench "$port" "$dir"
if [ "${PONTE_BENCH_KEEP_BROKER:-}" != 1 ]; then
    trap 'scripts/broker.sh stop bench "$port" "$dir"' EXIT
fi

profile=release
[ "$mode" = quick ] && profile=dev
if [ "$profile" = release ]; then
    cargo build --release --locked --bins
    bin=target/release
else
    cargo build --locked --bins
    bin=target/debug
fi
mkdir -p target/bench
csv=target/bench/results.csv
[ -z "$only" ] && rm -f "$csv"

row() {
    local name=$1
    shift
    if [ -n "$only" ] && [ "$only" != "$name" ]; then return; fi
    "$bin/ponte-bench" --url "amqp://guest:guest@127.0.0.1:$port/%2f" --node "bench $port $PWD/$dir" \
        --ponte "$bin/ponte" --csv "$csv" --scenario "$name" "$@"
}

if [ "$mode" = quick ]; then
    row smoke --messages 2000 --latency-secs 2 --forwarder
else
    row base --messages 100000 --latency-secs 20 --forwarder --rounds 3
    # One copy per message, as the shovel makes: the demo mix's fan-out set apart.
    row one-copy --messages 100000 --mix referrals --latency-secs 20 --forwarder --rounds 3
    # The same load published with the labels Ponte's copies carry (message_id, type): the
    # shovel and the forwarder then move messages that cost the broker what Ponte's cost it.
    row one-copy-labelled --messages 100000 --mix referrals --labels labelled --forwarder --rounds 3
    # The same two loads on quorum queues (every queue of the run, the shovel's too).
    row base-quorum --messages 100000 --queue-type quorum --latency-secs 20 --forwarder --rounds 3
    row one-copy-quorum --messages 100000 --mix referrals --queue-type quorum --forwarder --rounds 3
    row base-receipts --messages 100000 --receipts on
    row size-16k --messages 20000 --size 16384
    row size-256k --messages 2000 --size 262144
    # Many partners: the shovel moves the load from one queue per sender too, as Ponte gets it.
    row partners-100 --messages 100000 --partners 100 --shovel-per-sender
    # Latency at 1,000 msg/s rather than half the maximum: at about 2,600 msg/s the broker alone
    # takes 1.2 of the two cores with a thousand queues each getting a message now and then.
    row partners-1000 --messages 100000 --partners 1000 --shovel-per-sender --latency-secs 20 --latency-rate 1000
    row partners-1000-own --messages 100000 --partners 1000 --inps-prefetch 200 --shovel-per-sender
    row backlog-1m --messages 1000000 --no-shovel
    row history-5m --messages 100000 --history 5000000
fi
if [ "$only" != clients ] && [ -f "$csv" ]; then
    echo
    column -s, -t <"$csv"
fi
# What the no-op forwarder costs with lapin (Ponte's client) and with a client whose I/O runs on
# the runtime (amqprs): how much of a message's CPU is the client's alone.
if [ "$mode" = full ] && { [ -z "$only" ] || [ "$only" = clients ]; }; then
    echo
    "$bin/ponte-bench-clients" --url "amqp://guest:guest@127.0.0.1:$port/%2f" | tee target/bench/clients.txt
fi
