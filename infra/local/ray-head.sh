#!/usr/bin/env bash
# Start or stop a local Ray head: every port on 127.0.0.1 only, its own temp dir, and a
# stop that ends this head's processes alone (`ray stop` would end every Ray on the machine).
#
#   infra/local/ray-head.sh start     infra/local/ray-head.sh status     infra/local/ray-head.sh stop
#
# Settings (environment):
#   RAY_HEAD_DIR      state: pid file and log (default runs/ray-head)
#   RAY_TEMP_DIR      Ray's session dir root, must be short (sockets) (default /tmp/ray-mmvq-$USER)
#   RAY_PORT          GCS port (6379)          RAY_DASHBOARD_PORT  dashboard/jobs port (8265)
#   RAY_CLIENT_PORT   Ray client port (10001)  RAY_AGENT_PORT      dashboard agent port (52365)
#   RAY_NUM_CPUS      logical CPUs (all cores) RAY_NUM_GPUS        GPUs (Ray detects them)
# Then:  mmvq submit workflows/demo.yaml --address http://127.0.0.1:$RAY_DASHBOARD_PORT
#   or:  RAY_ADDRESS=127.0.0.1:$RAY_PORT mmvq run workflows/demo.yaml  (a driver on this head)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
# The head's Python runs the jobs: with the project's venv first on PATH, a job's `python` is it.
[ -x "$repo/.venv/bin/ray" ] && export PATH="$repo/.venv/bin:$PATH"
state=${RAY_HEAD_DIR:-$repo/runs/ray-head}
temp=${RAY_TEMP_DIR:-/tmp/ray-mmvq-${USER:-$(id -un)}}
port=${RAY_PORT:-6379}
dash=${RAY_DASHBOARD_PORT:-8265}
pidfile=$state/ray-head.pid

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "${1:-}" in
  start)
    if running; then echo "already running (pid $(cat "$pidfile"))"; exit 0; fi
    mkdir -p "$state" "$temp"
    args=(--head --block --node-ip-address 127.0.0.1 --port "$port"
          --dashboard-host 127.0.0.1 --dashboard-port "$dash"
          --ray-client-server-port "${RAY_CLIENT_PORT:-10001}"
          --dashboard-agent-listen-port "${RAY_AGENT_PORT:-52365}"
          --temp-dir "$temp" --disable-usage-stats)
    [ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus "$RAY_NUM_CPUS")
    [ -n "${RAY_NUM_GPUS:-}" ] && args+=(--num-gpus "$RAY_NUM_GPUS")
    # --block keeps one parent for the whole head; setsid gives it its own process group, which
    # is what stop ends.
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's single-machine mode (the default on macOS):
    # with it every server binds 127.0.0.1; without it the raylet, the Ray client server and
    # the agents also listened on 0.0.0.0 despite --node-ip-address. This head takes no other
    # nodes; a cluster is infra/cluster.yaml or infra/k8s (token authentication).
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
      setsid ray start "${args[@]}" >"$state/ray-head.log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    for _ in $(seq 240); do
      if curl -sf "http://127.0.0.1:$dash/api/version" >/dev/null; then
        echo "Ray head on 127.0.0.1:$port, dashboard and jobs on http://127.0.0.1:$dash" \
             "(pid $(cat "$pidfile"), log $state/ray-head.log)"
        exit 0
      fi
      running || { echo "Ray head failed to start:"; tail -20 "$state/ray-head.log"; exit 1; }
      sleep 0.5
    done
    echo "Ray dashboard did not answer on :$dash within 120 s; log: $state/ray-head.log"; exit 1;;
  stop)
    if ! running; then echo "not running"; rm -f "$pidfile"; exit 0; fi
    pid=$(cat "$pidfile")
    kill -TERM "$pid"  # `ray start --block` drains and stops its processes on SIGTERM
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    # Whatever outlived it (workers, dashboard modules) is in its process group, and only there.
    kill -KILL -- "-$pid" 2>/dev/null || true
    # A process that left the group, or was still exiting, names this head's private temp dir
    # on its command line: wait for those, and end the ones that stay (this head's alone).
    for _ in $(seq 20); do
      pgrep -f -- "$temp" >/dev/null || break
      pkill -KILL -f -- "$temp" 2>/dev/null || true
      sleep 0.5
    done
    rm -f "$pidfile"
    echo stopped;;
  status)
    if running; then echo "running (pid $(cat "$pidfile")), dashboard http://127.0.0.1:$dash"
    else echo "not running"; exit 1; fi;;
  *) echo "usage: $0 start|stop|status"; exit 2;;
esac
