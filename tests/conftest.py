"""Shared fixtures: real local services, started by the tests that need them and stopped after,
and the weights files of the metrics' networks, made here (nothing is downloaded)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# Helper modules shared by every test folder (``own_lines``): with ``--import-mode=importlib``
# pytest puts no test folder on ``sys.path`` itself.
sys.path.insert(0, str(Path(__file__).parent))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` process on 127.0.0.1 over a SQLite store; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    with open(root / "server.log", "wb") as log_file:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--default-artifact-root", (root / "artifacts").as_uri(), "--workers", "1"],
            stdout=log_file, stderr=subprocess.STDOUT,
            env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180  # generous: a loaded CI box starts it slowly
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"mlflow server did not start:\n"
                                   f"{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def ray_local():
    """In-process Ray for the session (4 logical CPUs so train workers and data actors fit)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture
def torch_backend_flags():
    """Put torch's process-wide backend flags back after a test (``apply_speed`` sets them)."""
    import torch

    flags = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    yield
    torch.set_float32_matmul_precision(flags[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags[1], flags[2]


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """torch-fidelity's Inception-v3 as a state dict file with random weights: the real
    architecture and file format, so code that loads and runs it is tested as with the real
    weights (which would be a 92 MB download)."""
    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict",
                      lambda self, *a, **k: None)  # keep the random init
        torch.manual_seed(0)
        model = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for layer in model.modules():  # He init: features keep their scale through 40 layers
        if isinstance(layer, torch.nn.Conv2d):  # (torch's default shrinks them to ~1e-7)
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def lpips_weights(tmp_path_factory) -> Path:
    """An LPIPS state dict file (random weights, this project's own key layout)."""
    import torch

    from mmvq.perceptual import LPIPS

    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.pt"
    torch.manual_seed(0)
    torch.save(LPIPS().state_dict(), path)
    return path
