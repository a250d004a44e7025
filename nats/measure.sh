#!/usr/bin/env bash
# The README's bridge figures: export and import rates of a 300,000-trade backtest next to the
# plain local bus, and the end-to-end latency of a live session paced at 1,000 trades/s,
# local tap vs remote tap (export -> JetStream -> import, --keep-stamps). Loopback only: a
# nats-server from .ci/install-nats-server on a free port, two daemons on private sockets.
# Needs `cargo build --release --workspace` first. Every process it starts is stopped by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
B=$PWD/target/release
.ci/install-nats-server >/dev/null
T=$(mktemp -d /tmp/aegis-nats-measure.XXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$T"; }
trap cleanup EXIT
python3 - "$T" <<'PY'
import random, sys
random.seed(1); d = sys.argv[1]; day = 1726876800000
with open(f"{d}/BTCUSDT-trades-2024-09-21.csv", "w") as f:
    for i in range(300000):
        f.write(f"{1000000+i},63201.{random.randrange(100):02d},0.{random.randrange(1,99999):05d},1.0,{day+i*288},{random.choice(['True','False'])}\n")
with open(f"{d}/ETHUSDT-trades-2024-09-21.csv", "w") as f:
    for i in range(5000):
        f.write(f"{1+i},2600.{random.randrange(100):02d},0.{random.randrange(1,99999):05d},1.0,{day+i},{random.choice(['True','False'])}\n")
PY
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
target/nats-server/bin/nats-server -js -sd "$T/js" -a 127.0.0.1 -p "$PORT" >"$T/nats.log" 2>&1 & pids+=($!)
$B/aegis-shmctl serve --socket "$T/a.sock" >"$T/a.log" 2>&1 & pids+=($!)
$B/aegis-shmctl serve --socket "$T/b.sock" >"$T/b.log" 2>&1 & pids+=($!)
sleep 1; U=nats://127.0.0.1:$PORT
$B/aegis-replay --convert "$T/trades.aegisj" "$T/BTCUSDT-trades-2024-09-21.csv" >/dev/null
echo "== backtest, 300000 trades (journal): plain local bus (aegis-tap), then aegis-nats export"
$B/aegis-shmctl --socket "$T/a.sock" session run plain --mode backtest -c "$B/aegis-replay $T/trades.aegisj" -c "$B/aegis-tap --format count --json --out /dev/null" 2>&1 | grep '"events_per_s"'
$B/aegis-shmctl --socket "$T/a.sock" session run exp --mode backtest -c "$B/aegis-replay $T/trades.aegisj" -c "$B/aegis-nats export --url $U --stream bt --json" 2>&1 | grep 'msgs_per_s'
echo "== aegis-nats import of that stream into the other daemon"
$B/aegis-shmctl --socket "$T/b.sock" session run imp --mode backtest -c "$B/aegis-nats import --url $U --stream bt --json" -c "$B/aegis-tap --format count --json --out /dev/null" 2>&1 | grep '"imported"'
echo "== live, 5000 trades 1 ms apart (--speed 1): local tap, then remote tap through the bridge"
$B/aegis-shmctl --socket "$T/b.sock" session run rlive --mode live -c "$B/aegis-nats import --url $U --stream live --keep-stamps" -c "$B/aegis-tap --name remote-tap --format count --json --out /dev/null" >"$T/rlive.out" 2>&1 & rl=$!
sleep 1
$B/aegis-shmctl --socket "$T/a.sock" session run llive --mode live -c "$B/aegis-replay --speed 1 $T/ETHUSDT-trades-2024-09-21.csv" -c "$B/aegis-tap --name local-tap --format count --json --out /dev/null" -c "$B/aegis-nats export --url $U --stream live" 2>&1 | grep 'latency_ns' | sed 's/"cpu_s.*//'
wait $rl; grep 'latency_ns' "$T/rlive.out" | sed 's/"cpu_s.*//'
