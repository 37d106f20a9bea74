#!/usr/bin/env bash
# Ponte's benchmark: Ponte side by side with a RabbitMQ Shovel on the same broker, same run.
# Starts a private RabbitMQ (with the shovel plugin) on 127.0.0.1:5691, builds Ponte (its
# production profile) and runs the scenarios below, printing each row and appending it to
# target/bench/results.csv (latency samples: target/bench/latency-*.csv).
#
#   bench/run.sh           the full matrix (about 65 minutes on 2 cores), then the AMQP clients
#                          alone (ponte-bench-clients; its table in target/bench/clients.txt)
#   bench/run.sh --quick   a 2,000-message smoke of the base row (what CI runs)
#   bench/run.sh --only NAME   one row of the matrix (or `clients`)
#   bench/run.sh --callgrind [N] [ponte-bench options...]
#                          instructions per message, counted rather than timed: N messages of
#                          the base load (20,000, about a minute) drained through the gateway
#                          under `valgrind --tool=callgrind`, each part printed in thousands per
#                          message, start-up included (about 1% of the whole with the demo
#                          partners; more messages spread it thinner). Timings on a shared
#                          machine move by ±15% a run; the same load gives the same count to
#                          within a fraction of a percent, so two builds compare to 1% in one run
#                          each. The whole count stays in target/bench/callgrind.out
#                          (`callgrind_annotate --inclusive=yes` reads it, `--tree=calling` too);
#                          the drain's row, slowed by valgrind, goes to target/bench/callgrind.csv,
#                          apart from the matrix's results.
#   bench/run.sh --allocations [N] [ponte-bench options...]
#                          blocks allocated per message, by thread, counted rather than sampled:
#                          N messages of the base load (50,000) drained with a `perf probe` on
#                          jemalloc's `malloc`, `calloc` and `realloc` (and their aligned
#                          `mallocx` and `rallocx`) in the gateway
#                          (root and Debian's linux-perf, installed if missing). Each call costs
#                          a trap: the drain runs some ten times slower, and its row goes to
#                          target/bench/allocations.csv, apart from the matrix's results.
set -euo pipefail
cd "$(dirname "$0")/.."

port=${PONTE_BENCH_BROKER_PORT:-5691}
dir=target/bench-broker
mode=full
only=""
count=""
case "${1:-}" in
--quick) mode=quick ;;
--only) only=${2:?row name} ;;
--callgrind | --allocations)
    mode=${1#--}
    shift
    # The counting modes' optional message count; the rest goes to ponte-bench.
    if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
        count=$1
        shift
    fi
    ;;
esac

# A tool a mode needs, from Debian's packages.
. scripts/debian.sh
if [ "$mode" = callgrind ] && { ! command -v valgrind >/dev/null || ! command -v callgrind_annotate >/dev/null; }; then
    install_debian run.sh valgrind
fi
if [ "$mode" = allocations ] && ! command -v perf >/dev/null; then
    install_debian run.sh linux-perf
fi

# The demo configuration's statistics partner needs its pseudonym key (demo only).
export PONTE_PSEUDONYM_KEY_OSSERVATORIO_ER=${PONTE_PSEUDONYM_KEY_OSSERVATORIO_ER:-demo-only-pseudonym-key-never-use-for-real-data}
PONTE_BROKER_PLUGINS=rabbitmq_shovel scripts/broker.sh start bench "$port" "$dir"
# What the run undoes as it ends, however it ends (a mode adds to it).
on_exit=()
trap 'for undo in "${on_exit[@]}"; do eval "$undo"; done' EXIT
if [ "${PONTE_BENCH_KEEP_BROKER:-}" != 1 ]; then
    on_exit+=('scripts/broker.sh stop bench "$port" "$dir"')
fi

# The figures are those of what a deployment runs: the production profile (Cargo.toml), built
# as one optimized unit. PONTE_BENCH_PROFILE=release measures the quicker-built release build.
# PONTE_BENCH_PROFILE=pgo measures the production build optimized with a profile of the
# gateway at work (scripts/pgo.sh, built anew first: up to 20 minutes more).
profile=${PONTE_BENCH_PROFILE:-production}
[ "$mode" = quick ] && profile=dev
if [ "$profile" = dev ]; then
    cargo build --locked --bins
    bin=target/debug
    ponte=$bin/ponte
elif [ "$profile" = pgo ]; then
    cargo build --profile production --locked --bins
    bin=target/production
    PONTE_PGO_BROKER_PORT=$port scripts/pgo.sh
    ponte=target/pgo/ponte
else
    cargo build --profile "$profile" --locked --bins
    bin=target/$profile
    ponte=$bin/ponte
fi
mkdir -p target/bench

callgrind() {
    local messages=${count:-20000}
    local out=$PWD/target/bench/callgrind.out
    rm -f "$out"
    # The harness starts "the gateway" with its arguments and measures that process: valgrind,
    # which runs Ponte inside itself, in the same process. The count is written when it stops.
    local wrapper=$PWD/target/bench/ponte-under-callgrind
    cat >"$wrapper" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$out $PWD/$ponte "\$@"
EOF
    chmod +x "$wrapper"
    "$bin/ponte-bench" --url "amqp://guest:guest@127.0.0.1:$port/%2f" \
        --node "bench $port $PWD/$dir" --messages "$messages" --no-shovel --ponte "$wrapper" \
        --csv target/bench/callgrind.csv "$@"
    [ -s "$out" ] || { echo "run.sh: no count written ($out)" >&2; exit 1; }
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
            part("    mapping each copy", ":<ponte::map::Mapping<F> as core::future::future::Future>::poll")
            part("    serializing copies", ":ponte::decode::encode_node")
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
        # A part whose function the compiler inlined into its caller has no line of its own: it
        # is counted in the part above it.
        END {
            for (i = 1; i <= count; i++) {
                label = order[i]
                if (most[label] > 0) printf "%-40s %8.1f\n", label, most[label] / n / 1000
                else printf "%-40s %8s\n", label, "inlined"
            }
        }'
}

# Blocks allocated per message, by thread: uprobes on jemalloc's entry points in the gateway's
# binary, counted by `perf stat` attached to the gateway once the harness has started it.
allocations() {
    local messages=${count:-50000}
    local out=$PWD/target/bench/allocations.stat
    local binary=$PWD/$ponte
    rm -f "$out"
    # A probe's group is named after the binary (`probe_ponte`); any left by an earlier run, on
    # another build, would count nothing.
    perf probe -q -d 'probe_ponte:*' 2>/dev/null || true
    local entry events=()
    # The global allocator's calls (tikv-jemallocator, whose jemalloc's names have a `_rjem_`
    # prefix): plain, zeroed and grown blocks, and those aligned beyond what `malloc` gives.
    for entry in _rjem_malloc _rjem_calloc _rjem_realloc _rjem_mallocx _rjem_rallocx; do
        perf probe -q -x "$binary" "$entry"
        events+=("probe_ponte:$entry")
    done
    on_exit+=('perf probe -q -d "probe_ponte:*" 2>/dev/null || true')
    "$bin/ponte-bench" --url "amqp://guest:guest@127.0.0.1:$port/%2f" \
        --node "bench $port $PWD/$dir" --messages "$messages" --no-shovel --ponte "$binary" \
        --csv target/bench/allocations.csv "$@" &
    local harness=$! gateway=""
    for _ in $(seq 1 600); do
        gateway=$(pgrep -f -x "$binary run .*" | head -1 || true)
        [ -n "$gateway" ] && break
        kill -0 "$harness" 2>/dev/null || break
        sleep 0.05
    done
    [ -n "$gateway" ] || { echo "run.sh: the gateway did not start" >&2; wait "$harness"; exit 1; }
    perf stat --per-thread -x, -o "$out" -e "$(IFS=,; echo "${events[*]}")" -p "$gateway" &
    local counting=$!
    wait "$harness"
    wait "$counting" || true
    echo
    echo "blocks allocated per message ($messages messages, counted from within 50 ms of the start):"
    # `perf stat --per-thread -x,` writes `thread-tid,count,,event,...`; threads by name.
    awk -F, -v n="$messages" '
        $4 ~ /^probe_ponte:/ {
            thread = $1
            sub(/-[0-9]+$/, "", thread)
            if (thread == "tokio-rt-worker" || thread ~ /^ponte-flows/) part = "the runtime'"'"'s workers"
            else if (thread ~ /^ponte-(store|checkpoin)/) part = "the store'"'"'s threads"
            else if (thread == "ponte-journal") part = "the delivery log'"'"'s thread"
            else part = "other threads"
            blocks[part] += $2
            all += $2
        }
        END {
            printf "%-32s %8.1f\n", "the whole gateway", all / n
            split("the runtime'"'"'s workers|the store'"'"'s threads|the delivery log'"'"'s thread|other threads", parts, "|")
            for (i = 1; i <= 4; i++) printf "  %-30s %8.1f\n", parts[i], blocks[parts[i]] / n
        }' "$out"
}

if [ "$mode" = callgrind ]; then
    callgrind "$@"
    exit 0
fi
if [ "$mode" = allocations ]; then
    allocations "$@"
    exit 0
fi

csv=target/bench/results.csv
[ -z "$only" ] && rm -f "$csv"

# A row that fails (the broker closing the run's connection on an internal error, say) is
# reported and the matrix goes on with the next: the others' figures stand, and the run ends
# naming the rows to run again with --only.
failed=()
row() {
    local name=$1
    shift
    if [ -n "$only" ] && [ "$only" != "$name" ]; then return; fi
    if ! "$bin/ponte-bench" --url "amqp://guest:guest@127.0.0.1:$port/%2f" --node "bench $port $PWD/$dir" \
        --ponte "$ponte" --csv "$csv" --scenario "$name" "$@"; then
        echo "run.sh: row $name failed; going on with the next" >&2
        failed+=("$name")
    fi
}

if [ "$mode" = quick ]; then
    row smoke --messages 2000 --latency-secs 2 --forwarder
else
    row base --messages 100000 --latency-secs 20 --forwarder --rounds 3
    # The forwarder doing Ponte's work on the wire: a consumer per sender, each message
    # published to a queue for each of the queues Ponte publishes it to.
    row fan-out --messages 100000 --forwarder --fan-out --rounds 3
    # The same with the load labelled as Ponte's copies are, so that the forwarder's copies are
    # too (and the shovel moves labelled messages): the like-for-like comparison.
    row fan-out-labelled --messages 100000 --forwarder --fan-out --labels labelled --rounds 3
    # One copy per message, as the shovel makes: the demo mix's fan-out set apart.
    row one-copy --messages 100000 --mix referrals --latency-secs 20 --forwarder --rounds 3
    # The same load published with the labels Ponte's copies carry (message_id, type): the
    # shovel and the forwarder then move messages that cost the broker what Ponte's cost it.
    row one-copy-labelled --messages 100000 --mix referrals --labels labelled --forwarder --rounds 3
    # Row fan-out with every classic queue of the run at storage version 2 (a policy for the
    # run's queues; RabbitMQ 3.10 to 3.12 make version 1 unless told otherwise).
    row base-cqv2 --messages 100000 --classic-queue-version 2 --forwarder --fan-out --rounds 3
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
if [ ${#failed[@]} -gt 0 ]; then
    echo "run.sh: rows that failed (not in $csv): ${failed[*]}; run each again with --only NAME" >&2
fi
# What the no-op forwarder costs with lapin (Ponte's client) and with a client whose I/O runs on
# the runtime (amqprs): how much of a message's CPU is the client's alone.
if [ "$mode" = full ] && { [ -z "$only" ] || [ "$only" = clients ]; }; then
    echo
    "$bin/ponte-bench-clients" --url "amqp://guest:guest@127.0.0.1:$port/%2f" | tee target/bench/clients.txt
fi
[ ${#failed[@]} -eq 0 ]
