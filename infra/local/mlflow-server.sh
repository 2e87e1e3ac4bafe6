#!/usr/bin/env bash
# Start or stop an MLflow tracking server on 127.0.0.1: SQLite by default, Postgres when a
# database URL is given; artifacts served through the server (clients need no storage access).
#
#   infra/local/mlflow-server.sh start [STORE_DIR] [PORT]     (default runs/demo 5000)
#   infra/local/mlflow-server.sh stop  [STORE_DIR]
#   infra/local/mlflow-server.sh status [STORE_DIR]
#
# Settings (environment):
#   MLFLOW_DB_URL         backend store, e.g. postgresql://mlflow:PASS@db:5432/mlflow
#                         (needs psycopg2-binary; default sqlite:///STORE_DIR/mlflow.db)
#   MLFLOW_ARTIFACT_ROOT  where the server keeps artifacts: a directory or s3://bucket/prefix
#                         (S3/MinIO: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
#                         MLFLOW_S3_ENDPOINT_URL; needs boto3) (default STORE_DIR/mlartifacts)
#   MLFLOW_HOST           bind address (127.0.0.1). Anything else requires MLFLOW_AUTH=1.
#   MLFLOW_AUTH=1         MLflow's basic-auth app (--app-name basic-auth). The admin user is
#                         created on first start from MLFLOW_AUTH_ADMIN_USERNAME and
#                         MLFLOW_AUTH_ADMIN_PASSWORD; users are kept in STORE_DIR/basic_auth.db.
#                         Clients set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
# Then: export MLFLOW_TRACKING_URI=http://127.0.0.1:PORT and every mmvq command tracks there.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
[ -x "$repo/.venv/bin/mlflow" ] && export PATH="$repo/.venv/bin:$PATH"
store=${2:-runs/demo}
port=${3:-5000}
host=${MLFLOW_HOST:-127.0.0.1}
pidfile=$store/mlflow-server.pid

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "${1:-}" in
  start)
    if running; then echo "already running (pid $(cat "$pidfile"))"; exit 0; fi
    mkdir -p "$store"
    store=$(cd "$store" && pwd)
    pidfile=$store/mlflow-server.pid
    backend=${MLFLOW_DB_URL:-sqlite:///$store/mlflow.db}
    artifacts=${MLFLOW_ARTIFACT_ROOT:-$store/mlartifacts}
    case "$backend" in
      postgresql*) python -c "import psycopg2" 2>/dev/null \
        || { echo "a Postgres store needs psycopg2: pip install psycopg2-binary"; exit 2; };;
    esac
    case "$artifacts" in
      s3://*) python -c "import boto3" 2>/dev/null \
        || { echo "an S3 artifact root needs boto3: pip install boto3"; exit 2; };;
    esac
    args=(server --host "$host" --port "$port" --backend-store-uri "$backend"
          --serve-artifacts --artifacts-destination "$artifacts" --workers 1)
    if [ "${MLFLOW_AUTH:-0}" = 1 ]; then
      python -c "import flask_wtf" 2>/dev/null \
        || { echo "basic auth needs Flask-WTF: pip install 'mlflow[auth]'"; exit 2; }
      # The users database lives beside the store; an explicit MLFLOW_AUTH_CONFIG_PATH wins.
      if [ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
        export MLFLOW_AUTH_CONFIG_PATH=$store/basic_auth.ini
        printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///%s/basic_auth.db\nadmin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n' \
          "$store" >"$MLFLOW_AUTH_CONFIG_PATH"
      fi
      : "${MLFLOW_FLASK_SERVER_SECRET_KEY:=$(python -c 'import secrets; print(secrets.token_hex(32))')}"
      export MLFLOW_FLASK_SERVER_SECRET_KEY
      args+=(--app-name basic-auth)
    elif [ "$host" != 127.0.0.1 ] && [ "$host" != localhost ]; then
      echo "refusing to serve MLflow on $host without authentication: set MLFLOW_AUTH=1"; exit 2
    fi
    setsid mlflow "${args[@]}" >"$store/mlflow-server.log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    for _ in $(seq 240); do
      if curl -sf "http://127.0.0.1:$port/health" >/dev/null; then
        echo "MLflow on http://$host:$port (pid $(cat "$pidfile"), store $backend," \
             "artifacts $artifacts, log $store/mlflow-server.log)"
        exit 0
      fi
      running || { echo "MLflow failed to start:"; tail -20 "$store/mlflow-server.log"; exit 1; }
      sleep 0.5
    done
    echo "MLflow did not answer on :$port within 120 s; log: $store/mlflow-server.log"; exit 1;;
  stop)
    if ! running; then echo "not running"; rm -f "$pidfile"; exit 0; fi
    pid=$(cat "$pidfile")
    kill -TERM -- "-$pid"  # the server and its workers: its own process group (setsid)
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pidfile"
    echo stopped;;
  status)
    if running; then echo "running (pid $(cat "$pidfile"))"; else echo "not running"; exit 1; fi;;
  *) echo "usage: $0 start|stop|status [STORE_DIR] [PORT]"; exit 2;;
esac
