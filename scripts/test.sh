#!/usr/bin/env bash
# Runs Ponte's whole test suite: starts a private RabbitMQ on loopback (installing Debian's
# rabbitmq-server if it is missing), runs every unit and integration test against it with
# cargo-nextest, and stops the broker again.
set -euo pipefail
cd "$(dirname "$0")/.."

port=${PONTE_TEST_BROKER_PORT:-5681}
dir=target/test-broker
scripts/broker.sh start test "$port" "$dir"
trap 'scripts/broker.sh stop test "$port" "$dir"' EXIT
export TEST_BROKER_URL="amqp://guest:guest@127.0.0.1:$port/%2f"

if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
cargo build --all-targets --locked
cargo nextest run --all-targets --locked --no-fail-fast "$@"
