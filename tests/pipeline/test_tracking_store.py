"""A fresh SQLite tracking store opened by two processes at once: both succeed, one store.

Without the lock in ``pipeline.tracking.tracking_client``, both run MLflow's table creation and
migrations on the same empty file and one fails (``table experiments already exists``,
``duplicate column name: step``), every time.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

OPEN_STORE = textwrap.dedent("""
    import sys
    from pipeline.tracking import tracking_client

    print("ready", flush=True)
    sys.stdin.readline()  # both processes have imported mlflow: start together
    client = tracking_client(sys.argv[1])
    client.create_experiment(sys.argv[2])
    print("ok", flush=True)
""")


@pytest.mark.parametrize("attempt", range(3))
def test_two_processes_create_the_same_fresh_store(tmp_path, attempt):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri, f"exp-{i}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[2]) for i in range(2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "ok", err[-3000:]
    names = {e.name for e in MlflowClient(uri).search_experiments()}
    assert {"exp-0", "exp-1"} <= names
    assert (tmp_path / "mlflow.db.lock").exists()  # beside the store, nothing elsewhere
