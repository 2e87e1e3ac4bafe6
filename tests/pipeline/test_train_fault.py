"""Fault tolerance: a training worker process dies mid-run on a 2-node Ray cluster.

The cluster (``ray.cluster_utils.Cluster``: a head and a second node) needs a Ray of its own, so
it runs in a subprocess: this file is also that subprocess's script. Its Ray temp dir is private
(``RAY_TMPDIR``), so no other Ray on the machine can find or join it.

The kill is real: rank 1's process calls ``os._exit(1)`` in the middle of its 6th step (after
the checkpoint at step 4), once, as a marker file says. Nothing in the product code knows about
it: the script wraps the real worker loop and the real generator step.

Before it dies, rank 1 waits until Ray Train's controller has registered the step-4 checkpoint
(its snapshot file names it). The controller collects reports by polling the workers, so on a
loaded machine a worker can reach step 6 before the step-4 report is collected; a death then
loses that checkpoint by Ray Train's design, and the restart would begin at step 0, which is
not the case under test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

CRASH_AT_CALL = 6  # rank 1 dies inside its 6th step of the first attempt
STEPS, CHECKPOINT_EVERY = 10, 4


def test_worker_killed_mid_run_restarts_from_checkpoint(tmp_path, mlflow_server, ray_local):
    import traindata
    from mlflow.tracking import MlflowClient

    from pipeline.formats.checkpoint import rank_weight_hashes, read_state

    data = traindata.write_dataset(tmp_path / "data")  # with the session's Ray, before the cluster
    run_id = traindata.start_run(mlflow_server).run_id
    marker = tmp_path / "crash-once"
    marker.touch()
    ray_tmp = tempfile.mkdtemp(prefix="mmvqf-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, __file__, str(data), str(tmp_path / "out"), mlflow_server, run_id,
         str(marker)], check=False, capture_output=True, text=True, env=env, timeout=600,
        cwd=Path(__file__).parents[2])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    result = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    assert result["nodes"] == 2
    assert not marker.exists()  # the worker did die
    assert "resumed from step 4 (epoch 1, 1 batches in)" in output, output[-6000:]
    summary = result["summary"]
    assert summary["steps"] == STEPS and summary["mlflow_run_id"] == run_id
    final = tmp_path / "out" / "ckpt" / "fault" / f"checkpoint_{STEPS:08d}"
    assert read_state(final).step == STEPS
    hashes = rank_weight_hashes(final)
    assert set(hashes) == {0, 1} and hashes[0] == hashes[1]
    client = MlflowClient(mlflow_server)
    # One continuous history: steps 5 (logged before the crash) and 6.. (after) each once.
    for key in ("loss/total", "grad_norm", "perf/samples_per_s"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, STEPS + 1)), (key, steps)
    params = client.get_run(run_id).data.params
    assert params["steps"] == str(STEPS) and params["max_failures"] == "2"


def _wait_for_registered_checkpoint(snapshot: Path, name: str, timeout_s: float = 120) -> None:
    """Block until Ray Train's checkpoint-manager snapshot lists the checkpoint ``name``."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if snapshot.exists() and name in snapshot.read_text():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{name} not registered in {snapshot} after {timeout_s} s")


def _crashing_loop(marker: str, snapshot: Path):
    """The real worker loop with rank 1's real generator step wrapped to kill its process."""

    def loop(loop_config):
        import ray.train

        import pipeline.train_loop as tl

        real, calls = tl.generator_step, [0]

        def step(*args, **kwargs):
            calls[0] += 1
            rank = ray.train.get_context().get_world_rank()
            if rank == 1 and calls[0] == CRASH_AT_CALL and os.path.exists(marker):
                _wait_for_registered_checkpoint(snapshot, f"checkpoint_{CHECKPOINT_EVERY:08d}")
                os.remove(marker)
                os._exit(1)  # a real process death, mid-step, no cleanup
            return real(*args, **kwargs)

        tl.generator_step = step
        tl.train_loop_per_worker(loop_config)

    return loop


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _main(data: str, out: str, uri: str, run_id: str, marker: str) -> None:
    import dataclasses

    import ray
    from ray.cluster_utils import Cluster

    from pipeline import train
    from pipeline.stage import StageContext
    from pipeline.tracking import RunLogger

    sys.path.insert(0, str(Path(__file__).parent))
    from traindata import tiny_config

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "gcs_server_port": _free_port(), "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    try:
        snapshot = Path(out) / "ckpt" / "fault" / "checkpoint_manager_snapshot.json"
        # What _trainer hands Ray as every worker's function. Only this driver sees the patch:
        # the workers unpickle the closure and import the real loop.
        train._run_worker = _crashing_loop(marker, snapshot)
        config = dataclasses.replace(
            tiny_config(steps=STEPS, checkpoint_every=CHECKPOINT_EVERY, val_every=0,
                        run_name="fault", storage_path=str(Path(out) / "ckpt")),
            placement_strategy="SPREAD", max_failures=2)
        (Path(out) / "stage").mkdir(parents=True)
        ctx = StageContext(output_dir=Path(out) / "stage", inputs={"data": Path(data)},
                           logger=RunLogger(uri, run_id), tracking_uri=uri, progress=False)
        summary = train.run(config, ctx)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        print("RESULT " + json.dumps({"summary": summary, "nodes": len(nodes)}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    _main(*sys.argv[1:6])
