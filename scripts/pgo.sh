#!/usr/bin/env bash
# Builds target/pgo/ponte: the production build (Cargo.toml's `production` profile) optimized
# with a profile of the gateway at work (profile-guided optimization). Three steps, about
# 20 minutes on 2 cores:
#
#   1. a production build of `ponte` that counts what its code does (target/pgo/instrumented);
#   2. that build drains the benchmark's demo load on the benchmark's private RabbitMQ (on
#      127.0.0.1:5691, or PONTE_PGO_BROKER_PORT, with its data in target/bench-broker; installed
#      from Debian's packages if missing, started if it is not running, and then stopped
#      again): 60,000 messages with 5% invalid ones, 10 seconds at 2,000 messages a second
#      offered, then 20,000 with positive receipts;
#   3. the production build again, its compiler told which code ran and how often
#      (target/pgo/optimized), copied to target/pgo/ponte with its profile beside it.
#
# The result is the same program, laid out and inlined for the paths a message takes: under
# callgrind a message handled on the runtime's workers takes 13% fewer instructions, and at
# 5,100 messages a second offered the gateway spent 11% less CPU per message
# (docs/performance.md, "Built with a profile of the gateway at work").
#
# Needs LLVM's llvm-profdata of the compiler's own LLVM version: rustup's `llvm-tools`
# component, added here when rustup is present. RUSTFLAGS of the environment (a target CPU,
# say) apply to both builds.
set -euo pipefail
cd "$(dirname "$0")/.."

port=${PONTE_PGO_BROKER_PORT:-5691}
broker_dir=target/bench-broker
out=$PWD/target/pgo
raw=$out/raw

sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
profdata=$sysroot/lib/rustlib/$host/bin/llvm-profdata
if [ ! -x "$profdata" ]; then
    command -v rustup >/dev/null || {
        echo "pgo.sh: needs llvm-profdata of LLVM $(rustc -vV | sed -n 's/^LLVM version: //p'), as rustup's llvm-tools component installs it" >&2
        exit 1
    }
    rustup component add llvm-tools
fi

# The benchmark's harness, built as usual; it starts the gateway it is given and feeds it.
cargo build --profile production --locked --bin ponte-bench

echo "pgo.sh: building the counting gateway" >&2
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-Cprofile-generate=$raw" \
    cargo build --profile production --locked --bin ponte --target-dir "$out/instrumented"
# Build scripts and macros of that build counted their own runs into the same folder.
rm -rf "$raw"

started=""
if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    started=1
fi
PONTE_BROKER_PLUGINS=rabbitmq_shovel scripts/broker.sh start bench "$port" "$broker_dir"
if [ -n "$started" ]; then
    trap 'scripts/broker.sh stop bench "$port" "$broker_dir"' EXIT
fi

export PONTE_PSEUDONYM_KEY_OSSERVATORIO_ER=${PONTE_PSEUDONYM_KEY_OSSERVATORIO_ER:-demo-only-pseudonym-key-never-use-for-real-data}
train() {
    rm -rf "$out/work"
    target/production/ponte-bench --url "amqp://guest:guest@127.0.0.1:$port/%2f" \
        --node "bench $port $PWD/$broker_dir" --no-shovel --ponte "$out/instrumented/production/ponte" \
        --work "$out/work" --csv "$out/training.csv" "$@"
}
echo "pgo.sh: the counting gateway at work" >&2
rm -f "$out/training.csv"
train --scenario pgo-drain --messages 60000 --latency-secs 10 --latency-rate 2000
train --scenario pgo-receipts --messages 20000 --receipts on
"$profdata" merge -o "$out/ponte.profdata" "$raw"/*.profraw

echo "pgo.sh: building the gateway with its profile" >&2
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-Cprofile-use=$out/ponte.profdata" \
    cargo build --profile production --locked --bin ponte --target-dir "$out/optimized"
cp "$out/optimized/production/ponte" "$out/ponte"
echo "pgo.sh: built $out/ponte" >&2
