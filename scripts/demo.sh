#!/usr/bin/env bash
# Runs Ponte with the demo configuration (inps, cpi-modena, cpi-bologna, comune-modena and the
# statistics partner osservatorio-er) on a local RabbitMQ: installs Debian's rabbitmq-server if it is missing, starts a private node on
# 127.0.0.1:5673 with its data under .broker/demo, builds Ponte and runs the gateway in the
# foreground until Ctrl-C. The broker keeps running afterwards; stop it with
#   scripts/broker.sh stop demo 5673 .broker/demo
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/broker.sh start demo 5673 .broker/demo
# jemalloc, the gateway's allocator, is built from its C sources with make.
. scripts/debian.sh
command -v make >/dev/null 2>&1 || install_debian demo.sh make
cargo build --release --locked
# The statistics partner's pseudonym key: a fixed demo key unless one is set. Never for real data.
export PONTE_PSEUDONYM_KEY_OSSERVATORIO_ER=${PONTE_PSEUDONYM_KEY_OSSERVATORIO_ER:-demo-only-pseudonym-key-never-use-for-real-data}
exec target/release/ponte run --config config
