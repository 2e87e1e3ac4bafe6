#!/usr/bin/env bash
# Start or stop a local Ray head on 127.0.0.1 with its dashboard (job submission on :8265).
#   infra/local/ray-head.sh start [NUM_CPUS]     infra/local/ray-head.sh stop
# With it running, `RAY_ADDRESS=127.0.0.1:6379 mmvq run workflows/demo.yaml` uses it instead of
# an in-process Ray.
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
  start) .venv/bin/ray start --head --node-ip-address 127.0.0.1 --port 6379 \
           --dashboard-host 127.0.0.1 --num-cpus "${2:-4}";;
  stop)  .venv/bin/ray stop;;
  *) echo "usage: $0 start|stop [NUM_CPUS]"; exit 2;;
esac
