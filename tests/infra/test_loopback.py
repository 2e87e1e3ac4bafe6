"""Nothing listens beyond loopback: the in-process Ray that `mmvq run` starts, and the head
that infra/local/ray-head.sh starts, read from the kernel's socket table (``ss``).

Reproduced before the fix: the in-process Ray bound its GCS, raylet, workers' and dashboard
agent's gRPC ports on all interfaces and the runtime-env agent on the machine's own address
(ray.init turns an explicit 127.0.0.1 node address into that address); the head of
ray-head.sh bound its raylet, client server and agent ports on 0.0.0.0 despite
--node-ip-address 127.0.0.1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from services import REPO, command_line, is_loopback, listening_sockets, processes_naming

pytestmark = pytest.mark.integration

# Run in a child process: it starts its own Ray exactly as `mmvq run` does (the runner's
# _init_ray), makes workers and a Ray Data actor pool start (each opens gRPC ports), then
# reports every socket its process tree listens on.
_IN_PROCESS = r"""
import json, os, sys
import ray, ray.data
from workflows.run import _init_ray
from workflows.spec import RayConfig
from pipeline.raydata import actor_pool

sys.path.insert(0, sys.argv[1])
from services import listening_sockets, process_tree

_init_ray(RayConfig(num_cpus=2), progress=False)

class Double:
    def __call__(self, batch):
        return {"id": batch["id"] * 2}

assert ray.get(ray.remote(lambda: 1).remote()) == 1
rows = ray.data.range(8).map_batches(Double, **actor_pool(1)).take_all()
assert sorted(r["id"] for r in rows) == [2 * i for i in range(8)]
print("SOCKETS " + json.dumps(listening_sockets(process_tree(os.getpid()))), flush=True)
ray.shutdown()
"""


def _names(sockets: list[list]) -> list[str]:
    return [f"{protocol} {address} ({command_line(pid)[:80]}, pid {pid})"
            for protocol, address, pid in sockets]


def test_in_process_ray_listens_on_loopback_only(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAY_ADDRESS": "",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _IN_PROCESS, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
                          check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    sockets = json.loads(output.split("SOCKETS ", 1)[1].splitlines()[0])
    assert len(sockets) >= 5, sockets  # GCS, raylet, object manager, dashboard, workers, ...
    exposed = [s for s in sockets if not is_loopback(s[1])]
    assert exposed == [], "\n".join(_names(exposed))


def test_ray_head_script_listens_on_loopback_only(ray_head):
    sockets = listening_sockets(set(processes_naming(ray_head.temp)))
    assert len(sockets) >= 3, sockets  # GCS, raylet, client server, ... (the ones naming temp)
    exposed = [s for s in sockets if not is_loopback(s[1])]
    assert exposed == [], "\n".join(_names(exposed))
