"""Submit a workflow to a Ray cluster as a Ray job: the same ``mmvq run``, somewhere else.

The repository is the job's ``working_dir`` (Ray uploads it, minus the virtualenv, outputs and
git history), so the cluster runs exactly the code that is checked out here; the cluster's
Python supplies the dependencies (the project's Docker image, ``infra/docker/Dockerfile``). The
workflow is validated here first, so a typo fails before anything is uploaded. Inside the job
``RAY_ADDRESS`` points at the cluster, and the runner connects to it instead of starting Ray.

What is uploaded. Ray packs the working directory minus its ``excludes`` (gitignore patterns)
and whatever each folder's ``.gitignore`` and ``.rayignore`` list (unless
``RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1``), and it follows symbolic links. A working directory is
also where credentials accumulate, so on top of the build outputs submit always leaves out:

- files whose names say they are secrets (:data:`SECRET_EXCLUDES`: ``.env*``, keys and
  certificates, ``basic_auth.ini``, SQLite databases such as a local MLflow store, cloud and
  tool credential folders and files);
- any file (up to :data:`SNIFF_BYTES`) that holds a PEM private key, whatever its name. This is
  how a service-account JSON key is told from the repository's other JSON: its
  ``private_key`` is PEM. A name alone cannot tell them apart, so ``*.json`` is not excluded;
- links that lead out of the working directory (or back above themselves), which Ray would
  otherwise follow and pack the target of.

:func:`plan_upload` walks the tree with Ray's own traversal to find these, and the list of
exactly what goes (files and bytes) is printed before the job is submitted. ``--exclude``
adds patterns; a ``!`` pattern (which would re-include files) is refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError

# The repository root: the parent of the ``pipeline`` package.
REPO_ROOT = Path(__file__).resolve().parents[1]
# Not shipped to the cluster: big, machine-specific or irrelevant to the run. Anchored at the
# repository root (gitignore syntax); Ray also honours .gitignore (and adds its own defaults,
# .git, .venv, venv, __pycache__).
WORKING_DIR_EXCLUDES = ["/.venv/", "/runs/", "/.git/", "/mlruns/", "*.egg-info/",
                        "__pycache__/", ".pytest_cache/", ".ruff_cache/"]
# Never shipped, at any depth: what a working directory's secrets are usually called. The job
# needs none of them (credentials reach it through env vars or the cluster's own secrets), and
# a Ray package is readable by every job on the cluster and kept in its object store.
SECRET_EXCLUDES = [
    ".env*",                                     # dotenv files (.env, .env.local, .envrc)
    "*.pem", "*.key", "*.p12", "*.pfx", "*.keystore", "*.jks",   # keys and certificates
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*",             # SSH keys
    "basic_auth.ini",                            # MLflow basic-auth config (a database URL)
    "*.db", "*.sqlite", "*.sqlite3",             # local MLflow stores, basic_auth.db
    ".mlflow*", "mlruns/", "mlartifacts/",       # MLflow's local state and file stores
    ".aws/", ".azure/", ".gcloud/", "gcloud/", ".kube/", ".ssh/", ".docker/",  # cloud CLIs
    "credentials", "credentials.json", "application_default_credentials.json",
    "*.kubeconfig", "kubeconfig", ".netrc", "_netrc", ".pgpass", ".pypirc",
    ".git-credentials", ".htpasswd", "*.keytab",
]
# Files are searched this far for a PEM private key (keys are a few KiB; service-account JSON
# keys about 2.3 KiB). Bounded so a large data file costs one read of this size, not its size.
SNIFF_BYTES = 1 << 20
_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


def working_dir_excludes(exclude: Sequence[str] = ()) -> list[str]:
    """The runtime_env ``excludes``: build outputs, :data:`SECRET_EXCLUDES`, then ``exclude``.

    Raises
    ------
    ConfigError
        For a ``!`` pattern: in one pattern list it would re-include what an earlier pattern
        (a secret's) left out.
    """
    for pattern in exclude:
        if pattern.strip().startswith("!"):
            raise ConfigError(f"--exclude {pattern!r}: a '!' pattern would re-include files, "
                              "secrets among them; --exclude only leaves files out")
    return [*WORKING_DIR_EXCLUDES, *SECRET_EXCLUDES, *(p for p in exclude if p.strip())]


@dataclass(frozen=True)
class Upload:
    """What Ray will pack as the job's working directory, and what was kept back."""

    root: Path
    files: tuple[tuple[str, int], ...]  # (path relative to root, bytes), sorted
    secrets: tuple[str, ...]  # paths left out by SECRET_EXCLUDES, sorted
    withheld: tuple[tuple[str, str], ...]  # (path, why): a private key inside, a link out
    excludes: tuple[str, ...]  # the runtime_env excludes that give exactly ``files``

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def plan_upload(root: Path, excludes: Sequence[str]) -> Upload:
    """Walk ``root`` as Ray packs a working directory, with ``excludes`` and the secret rules.

    Two walks with Ray's own traversal (``.gitignore``/``.rayignore`` included, as the job
    client does): the first finds files holding a private key and links leaving ``root``; each
    is then excluded by its exact path, and the second walk, with the final ``excludes``,
    lists what will be uploaded.
    """
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(root).absolute()
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    quiet = logging.getLogger("mmvq.submit.walk")
    quiet.setLevel(logging.WARNING)  # Ray logs every ignore file it reads at INFO

    def walk(patterns: Sequence[str], *checks: Callable[[Path], bool],
             handler: Callable[[Path], None] = lambda _: None) -> None:
        matchers = [_get_excludes(root, [*_ray_default_excludes(), *patterns]), *checks]
        _dir_travel(root, matchers, handler, include_gitignore=include_gitignore, logger=quiet)

    secret_spec = _get_excludes(root, SECRET_EXCLUDES)
    non_secret = [p for p in excludes if p not in SECRET_EXCLUDES]
    secrets: list[str] = []
    withheld: dict[str, str] = {}

    def is_secret(path: Path) -> bool:
        if path != root and secret_spec(path):
            secrets.append(path.relative_to(root).as_posix())
            return True
        return False

    def is_link_out(path: Path) -> bool:
        why = _link_problem(root, path)
        if why:
            withheld[path.relative_to(root).as_posix() + ("/" if path.is_dir() else "")] = why
        return why is not None

    def sniff(path: Path) -> None:
        if path.is_file() and _holds_private_key(path):
            withheld[path.relative_to(root).as_posix()] = "holds a PEM private key"

    walk(non_secret, is_secret, is_link_out, handler=sniff)
    final = [*excludes, *(_literal_pattern(rel) for rel in sorted(withheld))]
    files: list[tuple[str, int]] = []

    def record(path: Path) -> None:
        if path.is_file():
            files.append((path.relative_to(root).as_posix(), path.stat().st_size))

    walk(final, handler=record)
    return Upload(root, tuple(sorted(files)), tuple(sorted(secrets)),
                  tuple(sorted(withheld.items())), tuple(final))


def _ray_default_excludes() -> list[str]:
    """What Ray adds to every working directory's excludes (``.git``, ``.venv``, ...)."""
    from ray._private.ray_constants import get_runtime_env_default_excludes

    return get_runtime_env_default_excludes()


def _link_problem(root: Path, path: Path) -> str | None:
    """Why Ray must not follow the link ``path`` (its target is outside ``root``, or a folder
    above the link, which Ray would walk for ever), or None for a plain file or folder."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    real_root = root.resolve()
    if target != real_root and real_root not in target.parents:
        return f"a link to {target}, outside the working directory"
    parent = path.parent.resolve()
    if path.is_dir() and (target == parent or target in parent.parents):
        return f"a link to {target}, a folder above it (Ray would walk it for ever)"
    return None


def _holds_private_key(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return _PRIVATE_KEY.search(handle.read(SNIFF_BYTES)) is not None
    except OSError:
        return False  # unreadable here: Ray cannot pack it either


def _literal_pattern(rel: str) -> str:
    """A gitignore pattern matching exactly ``rel`` (a trailing ``/``: a folder), anchored."""
    escaped = re.sub(r"([\\*?\[\]!#])", r"\\\1", rel)
    if escaped.endswith(" "):
        escaped = escaped[:-1] + "\\ "
    return "/" + escaped


def format_upload(upload: Upload, limit: int = 8) -> str:
    """What ``mmvq submit`` prints before it submits: the count and size, then what was kept
    back and why (names only; a secret's content is never read into the message)."""
    mib = upload.total_bytes / 2**20
    lines = [(f"mmvq submit: uploading {len(upload.files)} files, {upload.total_bytes} bytes "
              f"({mib:.1f} MiB) from {upload.root} as the job's working directory")]
    if upload.secrets:
        shown = ", ".join(upload.secrets[:limit])
        more = f" and {len(upload.secrets) - limit} more" if len(upload.secrets) > limit else ""
        lines.append(f"mmvq submit: not uploaded, secret by name: {shown}{more}")
    for rel, why in upload.withheld:
        lines.append(f"mmvq submit: not uploaded: {rel} ({why})")
    return "\n".join(lines)


def job_spec(workflow: Path, overrides: Sequence[str] = (), **options: Any) -> dict[str, Any]:
    """:func:`prepare_job`'s spec alone: the entrypoint and runtime_env of the job."""
    return prepare_job(workflow, overrides, **options)[0]


def prepare_job(workflow: Path, overrides: Sequence[str] = (), *, data_root: str | None = None,
                only: Sequence[str] = (), from_: Sequence[str] = (), force: Sequence[str] = (),
                python: str = "python", repo_root: Path = REPO_ROOT,
                exclude: Sequence[str] = ()) -> tuple[dict[str, Any], Upload]:
    """The job that runs ``workflow`` on the cluster, and what its working directory uploads.

    Validates the workflow with its overrides first (strictly, as ``mmvq run`` would), then
    plans the upload (:func:`plan_upload` of :func:`working_dir_excludes`); the spec's
    runtime_env ``excludes`` are the plan's, so what Ray packs is exactly ``Upload.files``.

    Raises
    ------
    ConfigError
        For a workflow outside ``repo_root`` (the cluster would not have it) or an invalid one,
        or a ``!`` pattern in ``exclude``.
    """
    from workflows.plan import load_workflow

    excludes = working_dir_excludes(exclude)
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
    args = [python, "-m", "workflows.cli", "run", str(relative), "--no-progress", *overrides]
    for flag, names in (("--only", only), ("--from", from_), ("--force", force)):
        for name in names:
            args += [flag, name]
    env_vars = {"PYTHONUNBUFFERED": "1"}
    # The workflow's tracking_uri wins inside the job; otherwise ours travels with it.
    if not loaded.tracking_uri and os.environ.get("MLFLOW_TRACKING_URI"):
        env_vars["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    upload = plan_upload(repo_root, excludes)
    return {"entrypoint": shlex.join(args),
            "runtime_env": {"working_dir": str(repo_root), "excludes": list(upload.excludes),
                            "env_vars": env_vars},
            "metadata": {"workflow": loaded.name, "submitted_by": "mmvq submit"}}, upload


def submit_workflow(workflow: Path, overrides: Sequence[str] = (), *, address: str | None = None,
                    data_root: str | None = None, only: Sequence[str] = (),
                    from_: Sequence[str] = (), force: Sequence[str] = (), wait: bool = True,
                    python: str = "python", submission_id: str | None = None,
                    exclude: Sequence[str] = (), repo_root: Path = REPO_ROOT) -> int:
    """Submit, print the job id, follow the logs; 0 if the job succeeded (or ``wait`` is False).

    ``address`` is the dashboard URL (``http://HEAD:8265``); None reads ``RAY_ADDRESS``.
    ``exclude`` adds gitignore patterns (relative to ``repo_root``) to what is not uploaded;
    what is uploaded is printed first (:func:`format_upload`).
    """
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no cluster: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    spec, upload = prepare_job(workflow, overrides, data_root=data_root, only=only,
                               from_=from_, force=force, python=python, repo_root=repo_root,
                               exclude=exclude)
    print(format_upload(upload), flush=True)
    try:
        client = JobSubmissionClient(address)
    except ConnectionError as err:  # one line naming the address, not Ray's traceback
        raise ConfigError(f"--address {address}: no Ray dashboard answers there ({err}); start "
                          "one (infra/local/ray-head.sh start) or check the URL") from err
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
