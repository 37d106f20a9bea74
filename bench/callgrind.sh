#!/usr/bin/env bash
# Ponte's instructions per message, counted rather than timed: drains the base load through the
# gateway running under `valgrind --tool=callgrind`, on the benchmark's private RabbitMQ
# (127.0.0.1:5691), and prints where the instructions went. Timings on a shared machine move by
# ±15% from run to run; the same load gives the same count to within a fraction of a percent,
# so two builds compare to 1% in one run each.
#
#   bench/callgrind.sh [MESSAGES] [ponte-bench options...]   (default 20,000 messages: about a
#                                                            minute, the gateway at ~800 msg/s)
#
# The whole count is in target/bench/callgrind.out (`callgrind_annotate --inclusive=yes` reads
# it, `--tree=calling` too); the figures printed are per message, in thousands, start-up
# included (about 1% of the whole with the demo partners; more messages spread it thinner).
set -euo pipefail
cd "$(dirname "$0")/.."
messages=20000
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
    messages=$1
    shift
fi
port=${PONTE_BENCH_BROKER_PORT:-5691}
dir=target/bench-broker
if ! command -v valgrind >/dev/null || ! command -v callgrind_annotate >/dev/null; then
    echo "callgrind.sh: installing Debian's valgrind" >&2
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
export PONTE_PSEUDONYM_KEY_OSSERVATORIO_ER=${PONTE_PSEUDONYM_KEY_OSSERVATORIO_ER:-demo-only-pseudonym-key-never-use-for-real-data}
PONTE_BROKER_PLUGINS=rabbitmq_shovel scripts/broker.sh start bench "$port" "$dir"
if [ "${PONTE_BENCH_KEEP_BROKER:-}" != 1 ]; then
    trap 'scripts/broker.sh stop bench "$port" "$dir"' EXIT
fi
cargo build --release --locked --bins
mkdir -p target/bench
out=$PWD/target/bench/callgrind.out
rm -f "$out"
# The harness starts "the gateway" with its arguments and measures that process: valgrind, which
# runs Ponte inside itself, in the same process. The count is written when the gateway stops.
wrapper=$PWD/target/bench/ponte-under-callgrind
cat >"$wrapper" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$out $PWD/target/release/ponte "\$@"
EOF
chmod +x "$wrapper"
target/release/ponte-bench --url "amqp://guest:guest@127.0.0.1:$port/%2f" \
    --node "bench $port $PWD/$dir" --messages "$messages" --no-shovel --ponte "$wrapper" "$@"
[ -s "$out" ] || { echo "callgrind.sh: no count written ($out)" >&2; exit 1; }
echo
echo "thousands of instructions per message ($messages messages):"
callgrind_annotate --inclusive=yes --auto=no "$out" 2>/dev/null | awk -v n="$messages" '
    # A function appears once for its own code and again for code inlined into it from other
    # files: its largest line is the whole of it.
    function part(label, name) { names[label] = name; order[++count] = label }
    BEGIN {
        part("the whole gateway", "PROGRAM TOTALS")
        part("  a message handled on the flows", ":ponte::receive::Flow::handle::{{closure}}")
        part("    decoding", ":ponte::decode::decode")
        part("    validation", ":ponte::validate::SchemaSet::validate")
        part("    mapping each copy", ":ponte::map::for_recipient::{{closure}}")
        part("    serializing copies", ":ponte::decode::encode")
        part("    the crosswalk record", ":ponte::pipeline::Pipeline::record")
        part("    publishing", ":ponte::deliver::Publishing::start::{{closure}}")
        part("  settling (confirms, acks, receipts)", ":ponte::settle::delivered::{{closure}}")
        part("  lapin: frames received", ":lapin::io_loop::IoLoop<RK,C>::handle_frames")
        part("  lapin: frames written", ":lapin::io_loop::IoLoop<RK,C>::write")
        part("  the store thread", ":ponte::store::write_behind")
        part("  the delivery log thread", ":ponte::journal::write")
    }
    {
        line = $0
        sub(/ \[[^]]*\]$/, "", line)
        for (label in names) {
            name = names[label]
            at = index(line, name)
            if (at > 0 && at + length(name) == length(line) + 1) {
                value = $1
                gsub(",", "", value)
                if (value + 0 > most[label]) most[label] = value + 0
            }
        }
    }
    END { for (i = 1; i <= count; i++) printf "%-40s %8.1f\n", order[i], most[order[i]] / n / 1000 }'
