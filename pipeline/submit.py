"""Submit a workflow to a Ray cluster as a Ray job: the same ``mmvq run``, somewhere else.

The repository is the job's ``working_dir`` (Ray uploads it, minus the virtualenv, outputs and
git history), so the cluster runs exactly the code that is checked out here; the cluster's
Python supplies the dependencies (the project's Docker image, ``infra/docker/Dockerfile``). The
workflow is validated here first, so a typo fails before anything is uploaded. Inside the job
``RAY_ADDRESS`` points at the cluster, and the runner connects to it instead of starting Ray.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError

# The repository root: the parent of the ``pipeline`` package.
REPO_ROOT = Path(__file__).resolve().parents[1]
# Not shipped to the cluster: big, machine-specific or irrelevant to the run. Anchored at the
# repository root (gitignore syntax); Ray also honours .gitignore.
WORKING_DIR_EXCLUDES = ["/.venv/", "/runs/", "/.git/", "/mlruns/", "*.egg-info/",
                        "__pycache__/", ".pytest_cache/", ".ruff_cache/"]


def job_spec(workflow: Path, overrides: Sequence[str] = (), *, data_root: str | None = None,
             only: Sequence[str] = (), from_: Sequence[str] = (), force: Sequence[str] = (),
             python: str = "python", repo_root: Path = REPO_ROOT) -> dict[str, Any]:
    """The entrypoint and runtime_env of the job that runs ``workflow`` on the cluster.

    Validates the workflow with its overrides first (strictly, as ``mmvq run`` would).

    Raises
    ------
    ConfigError
        For a workflow outside ``repo_root`` (the cluster would not have it) or an invalid one.
    """
    from workflows.runner import load_workflow

    workflow = Path(workflow).resolve()
    try:
        relative = workflow.relative_to(repo_root)
    except ValueError:
        raise ConfigError(f"{workflow}: the workflow must be inside the repository "
                          f"{repo_root}, the job's working directory") from None
    overrides = list(overrides) + ([f"data_root={data_root}"] if data_root else [])
    loaded = load_workflow(workflow, overrides)
    if "://" in loaded.data_root:
        raise ConfigError(f"data_root {loaded.data_root!r}: use a filesystem path every node "
                          "mounts (stage outputs are committed by an atomic rename)")
    if not Path(loaded.data_root).is_absolute():
        print(f"mmvq submit: note: data_root {loaded.data_root} is relative; the job writes it "
              "inside its working-directory copy on the head node. Pass --data-root with a "
              "shared path to keep the outputs.", file=sys.stderr)
    args = [python, "-m", "pipeline.cli", "run", str(relative), "--no-progress", *overrides]
    for flag, names in (("--only", only), ("--from", from_), ("--force", force)):
        for name in names:
            args += [flag, name]
    env_vars = {"PYTHONUNBUFFERED": "1"}
    # The workflow's tracking_uri wins inside the job; otherwise ours travels with it.
    if not loaded.tracking_uri and os.environ.get("MLFLOW_TRACKING_URI"):
        env_vars["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    return {"entrypoint": shlex.join(args),
            "runtime_env": {"working_dir": str(repo_root), "excludes": WORKING_DIR_EXCLUDES,
                            "env_vars": env_vars},
            "metadata": {"workflow": loaded.name, "submitted_by": "mmvq submit"}}


def submit_workflow(workflow: Path, overrides: Sequence[str] = (), *, address: str | None = None,
                    data_root: str | None = None, only: Sequence[str] = (),
                    from_: Sequence[str] = (), force: Sequence[str] = (), wait: bool = True,
                    python: str = "python", submission_id: str | None = None) -> int:
    """Submit, print the job id, follow the logs; 0 if the job succeeded (or ``wait`` is False).

    ``address`` is the dashboard URL (``http://HEAD:8265``); None reads ``RAY_ADDRESS``.
    """
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no cluster: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    spec = job_spec(workflow, overrides, data_root=data_root, only=only, from_=from_,
                    force=force, python=python)
    client = JobSubmissionClient(address)
    job_id = client.submit_job(submission_id=submission_id, **spec)
    print(f"mmvq submit: job {job_id} on {address}: {spec['entrypoint']}", flush=True)
    if not wait:
        print(f"follow it with: ray job logs --follow --address {address} {job_id}")
        return 0
    try:
        asyncio.run(_follow(client, job_id))
    except KeyboardInterrupt:
        print(f"\nmmvq submit: stopped following; job {job_id} keeps running "
              f"(ray job stop --address {address} {job_id})", file=sys.stderr)
        return 130
    return report_status(client, job_id)


async def _follow(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def report_status(client: Any, job_id: str) -> int:
    """Print the job's final status; the exit code is 0 only for SUCCEEDED."""
    import time

    from ray.job_submission import JobStatus

    info = client.get_job_info(job_id)
    while not info.status.is_terminal():  # the log stream can close a moment before the status
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    print(f"mmvq submit: job {job_id} {info.status.value}"
          + (f": {info.message}" if info.message and info.status != JobStatus.SUCCEEDED else ""),
          flush=True)
    return 0 if info.status == JobStatus.SUCCEEDED else 1
