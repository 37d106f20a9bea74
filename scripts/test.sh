#!/usr/bin/env bash
# Runs Ponte's whole test suite: installs what the tests drive if it is missing (Chromium, openssl,
# systemd-analyze), starts a private RabbitMQ on loopback (installing Debian's rabbitmq-server if
# it is missing) with a fresh data folder, checks that the deploy/
# definitions file loads into it, runs every unit and integration test against it (the vendored
# lapin's and amq-protocol-types' unit tests too: workspace members) with
# cargo-nextest (each test under its own queue prefix), and stops the broker again.
set -euo pipefail
cd "$(dirname "$0")/.."

# The console's end-to-end test drives Debian's Chromium; the deploy test runs systemd-analyze;
# the broker TLS test makes its certificates with openssl;
# everything runs against Debian's RabbitMQ; jemalloc, the gateway's allocator, is built from its
# C sources with make. What is missing is installed in one go.
missing=()
command -v make >/dev/null 2>&1 || missing+=(make)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
    . scripts/debian.sh
    install_debian test.sh "${missing[@]}"
fi

port=${PONTE_TEST_BROKER_PORT:-5681}
dir=target/test-broker
scripts/broker.sh stop test "$port" "$dir" 2>/dev/null || true
rm -rf "$dir"
scripts/broker.sh start test "$port" "$dir"
trap 'scripts/broker.sh stop test "$port" "$dir"' EXIT
export TEST_BROKER_URL="amqp://guest:guest@127.0.0.1:$port/%2f"
# Tests that change broker policies run rabbitmqctl against this node with these arguments.
export TEST_BROKER_NODE="test $port $PWD/$dir"

echo "test.sh: loading deploy/definitions.json into the test broker" >&2
scripts/broker.sh ctl test "$port" "$dir" import_definitions "$PWD/deploy/definitions.json" >/dev/null

if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
# What the tests leave behind (data folders, configuration copies, browser profiles) goes
# under target/, cleared at the start of every run, not into the system's temporary folder.
export TMPDIR="$PWD/target/test-tmp"
rm -rf "$TMPDIR"
mkdir -p "$TMPDIR"
cargo build --workspace --all-targets --locked
cargo nextest run --workspace --all-targets --locked --no-fail-fast "$@"
