"""Fixtures of the infra tests: a real Ray head started by infra/local/ray-head.sh."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from services import LOCAL, free_port, processes_naming


@dataclass(frozen=True)
class RayHead:
    address: str  # the dashboard and job API, what `mmvq submit --address` takes
    temp: str  # the head's private temp dir: every one of its processes names it


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`infra/local/ray-head.sh start` on free ports with a private temp dir; stopped after.
    Yields the dashboard address and the temp dir (which names every process of the head)."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    dashboard = free_port()
    env.update(RAY_HEAD_DIR=str(tmp_path_factory.mktemp("ray-head")), RAY_TEMP_DIR=temp,
               RAY_PORT=str(free_port()), RAY_DASHBOARD_PORT=str(dashboard),
               RAY_CLIENT_PORT=str(free_port()), RAY_AGENT_PORT=str(free_port()),
               RAY_NUM_CPUS="2")
    script = str(LOCAL / "ray-head.sh")
    started = subprocess.run([script, "start"], env=env, capture_output=True, text=True,
                             timeout=300, check=False)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert subprocess.run([script, "status"], env=env, check=False).returncode == 0
        yield RayHead(f"http://127.0.0.1:{dashboard}", temp)
    finally:
        stopped = subprocess.run([script, "stop"], env=env, capture_output=True, text=True,
                                 timeout=120, check=False)
        left = processes_naming(temp)
        shutil.rmtree(temp, ignore_errors=True)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout
        assert left == [], f"Ray processes outlived ray-head.sh stop: {left}"
