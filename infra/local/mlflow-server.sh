#!/usr/bin/env bash
# Start or stop an MLflow tracking server on 127.0.0.1 over a SQLite store (the demo's by default).
#   infra/local/mlflow-server.sh start [STORE_DIR] [PORT]     infra/local/mlflow-server.sh stop
# Then: export MLFLOW_TRACKING_URI=http://127.0.0.1:PORT and every mmvq command tracks there.
set -euo pipefail
cd "$(dirname "$0")/../.."
store=${2:-runs/demo}
port=${3:-5000}
pidfile=$store/mlflow-server.pid
case "${1:-}" in
  start)
    mkdir -p "$store"
    .venv/bin/mlflow server --host 127.0.0.1 --port "$port" \
      --backend-store-uri "sqlite:///$(realpath "$store")/mlflow.db" \
      --default-artifact-root "file://$(realpath "$store")/mlartifacts" \
      >"$store/mlflow-server.log" 2>&1 &
    echo $! >"$pidfile"
    echo "MLflow on http://127.0.0.1:$port (pid $(cat "$pidfile"), log $store/mlflow-server.log)";;
  stop)
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" && rm -f "$pidfile" && echo stopped;;
  *) echo "usage: $0 start|stop [STORE_DIR] [PORT]"; exit 2;;
esac
