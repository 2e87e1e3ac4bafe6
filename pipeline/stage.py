"""What a stage is, where its output lives, and how that output becomes visible.

A stage is ``run(config, ctx) -> summary``: a typed config, the committed outputs of the stages
it reads (``ctx.inputs``), a fresh directory to write into (``ctx.output_dir``) and a logger for
its MLflow run. It returns a small summary (counts, metrics) that is stored beside its output.

Outputs live under ``{data_root}/{stage}/{fingerprint}/``. A stage writes into a temporary
sibling directory and the runner renames it into place when the stage returns, so a directory
under its fingerprint name is always complete: a killed stage leaves only a ``.tmp-`` directory
that nothing reads, and the next run of that fingerprint deletes it. The fingerprint covers the
stage name, its config, its inputs' fingerprints and the code version, so an unchanged stage is
reused and a changed one reruns alone.

Two runs that reach the same output at once serialise on ``{data_root}/{stage}/{fp}.lock``
(``flock``, released by the kernel when its holder dies, even by SIGKILL): the second waits,
then finds the first one's committed output and reuses it.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import to_dict

if TYPE_CHECKING:  # only for annotations: importing mlflow costs every Ray worker seconds
    from pipeline.tracking import RunLogger

# Written last into every committed output; its presence is what "complete" means to readers.
STAGE_RECORD = "stage.json"
# Prefixes of the siblings of committed outputs that are never outputs themselves.
TMP_PREFIX = ".tmp-"  # a stage being written (or killed while it was)
TRASH_PREFIX = ".trash-"  # a replaced output on its way out


@dataclass(frozen=True)
class StageContext:
    """Everything a stage may touch besides its config."""

    output_dir: Path  # write here; renamed to the committed location when run() returns
    # Input slot -> the committed output directory it reads, or for an external input (shards
    # no stage of ours wrote) the folder, file or URI the user named.
    inputs: Mapping[str, Path | str]
    logger: RunLogger | None = None  # this stage's MLflow run (None when run without tracking)
    tracking_uri: str | None = None  # for processes (train workers) that log on their own
    progress: bool = True  # show progress bars
    verbose: bool = False  # Ray's own INFO lines on the console too (mmvq --verbose)
    # Where output_dir is renamed to when run() returns, for records that must name the place
    # the data will stay (lineage); None: output_dir is already final (a direct call).
    committed_dir: Path | None = None


@dataclass(frozen=True)
class StageSpec:
    """A registered stage: its name, config type, upstream stages and the function that runs it."""

    name: str
    config_type: type
    run: Callable[[Any, StageContext], dict[str, Any]]
    inputs: tuple[str, ...] = ()
    # Input slots that may also name data of the user's instead of a committed output: a
    # folder, a single file or an s3:// prefix of webdataset .tar shards (``mmvq ingest``'s
    # output, or any tool's).
    external_inputs: tuple[str, ...] = ()
    # The modules the stage runs; their source and that of every module of ours they import
    # (code_closure) is part of the fingerprint. Default: the module of ``run``.
    code: tuple[str, ...] = ()
    # Distributions whose version can change the output (a new Pillow resizes differently, a
    # new torch changes kernels); their versions are part of the fingerprint. mmvq itself and
    # numpy/pyarrow (every stage's arrays and files) are always included.
    libraries: tuple[str, ...] = ()
    # The data contract this stage's output promises, from its config alone (preprocess: the
    # shapes it writes), so that a consumer can be checked before anything runs.
    contract: Callable[[Any], dict[str, Any]] | None = None
    # The consumer's side: (raw config as written, input slot -> (contract, who made it)) -> the
    # raw config with what follows from the inputs filled in; raises ConfigError on a conflict.
    derive: Callable[[Mapping[str, Any], Mapping[str, tuple[dict[str, Any], str]]],
                     dict[str, Any]] | None = None

    def library_versions(self) -> dict[str, str]:
        return library_versions(("mmvq", "numpy", "pyarrow", *self.libraries))

    def code_version(self) -> str:
        """Hash of the stage's source and of the versions of the libraries it depends on."""
        versions = json.dumps(self.library_versions(), sort_keys=True)
        return code_version(self.code or (self.run.__module__,), extra=versions)


def process_started() -> float | None:
    """When this process started (epoch seconds), from Linux's /proc; None elsewhere.

    A stage's "first sample after N s" counts from the command's start, imports and ``ray.init``
    included, which is what a user waits through; the stage itself starts seconds later.
    """
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def library_versions(distributions: tuple[str, ...]) -> dict[str, str]:
    """Installed version of each distribution (``"absent"`` if not installed).

    Read from the installed metadata, not by importing: asking torch's version this way costs
    microseconds instead of the seconds ``import torch`` takes.
    """
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in sorted(set(distributions)):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def code_version(modules: tuple[str, ...], extra: str = "") -> str:
    """Hash of the source of ``modules`` and of every module of ours they import, and ``extra``.

    The files are what the stage really runs: the import closure within mmvq and pipeline
    (:func:`code_closure`), so editing anything a stage imports reruns it, and editing a module
    it does not import (the trainer, for synth) does not. Found by reading the source, not by
    importing it, so a plan costs no torch import.
    """
    digest = hashlib.sha256(extra.encode())
    for name, path in code_closure(modules).items():
        digest.update(f"{name}:{path.name}".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# The packages whose modules count as a stage's code (a library's version counts instead).
CODE_PACKAGES = ("mmvq", "pipeline")


def code_closure(modules: tuple[str, ...]) -> dict[str, Path]:
    """``modules`` and every module of :data:`CODE_PACKAGES` they import, directly or not,
    function-local imports included: module name -> source file, sorted by name.

    ``from package import name`` counts the submodule ``package.name`` when there is one, else
    the package; a package's ``__init__`` that imports lazily (PEP 562, a ``_LAZY`` table of
    name -> module) counts the module each imported name comes from.
    """
    found: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = _source_file(name)
        if path is None:
            raise ModuleNotFoundError(f"stage code module {name!r} not found")
        found[name] = path
        todo.extend(_imports_of(name, path))
    return dict(sorted(found.items()))


def _source_file(name: str) -> Path | None:
    """The file of module ``name`` (``__init__.py`` for a package), or None: an imported
    module's own file (a stage defined outside our packages, e.g. in a user's script or a test),
    else found under its top-level package without importing it."""
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__file__", None):
        return Path(module.__file__)
    top = name.split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        return None
    base = Path(spec.origin).parent.joinpath(*name.split(".")[1:])
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _imports_of(name: str, path: Path) -> list[str]:
    """The modules of :data:`CODE_PACKAGES` that module ``name`` (at ``path``) imports."""
    tree = ast.parse(path.read_bytes())
    lazy = _lazy_table(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.append(sub if _source_file(sub) is not None else node.module)
    for target in lazy.values():
        out.append(target)
    return [m for m in out if m.split(".")[0] in CODE_PACKAGES and _source_file(m) is not None]


def _lazy_table(tree: ast.Module) -> dict[str, str]:
    """A module-level ``_LAZY = {name: module}`` literal (PEP 562 lazy imports), or {}."""
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "_LAZY"):
            try:
                return dict(ast.literal_eval(node.value))
            except ValueError:
                return {}
    return {}


def fingerprint(stage: str, config: Any, input_fingerprints: Mapping[str, str],
                code: str) -> str:
    """Stable 16-hex id of (stage, config, inputs, code)."""
    payload = json.dumps({"stage": stage, "config": to_dict(config),
                          "inputs": dict(sorted(input_fingerprints.items())), "code": code},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def committed_dir(data_root: Path, stage: str, fp: str) -> Path:
    return Path(data_root) / stage / fp


def read_record(output_dir: Path) -> dict[str, Any] | None:
    """The stage record of a committed output, or None if the output is absent or incomplete."""
    path = Path(output_dir) / STAGE_RECORD
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def committed_outputs(data_root: Path, stage: str) -> list[Path]:
    """Every committed output of ``stage`` under ``data_root``, oldest commit first."""
    parent = Path(data_root) / stage
    if not parent.is_dir():
        return []
    outputs = [p for p in parent.iterdir()
               if p.is_dir() and not p.name.startswith(".") and (p / STAGE_RECORD).is_file()]
    return sorted(outputs, key=lambda p: (p / STAGE_RECORD).stat().st_mtime)


def lock_path(data_root: Path, stage: str, fp: str) -> Path:
    return Path(data_root) / stage / f"{fp}.lock"


@contextlib.contextmanager
def output_lock(data_root: Path, stage: str, fp: str,
                on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the exclusive lock of one stage output; ``on_wait`` is called if another holds it.

    ``flock`` rather than a lock file that exists or not: the kernel drops it when the holder
    exits however it exits, so a killed run never leaves a lock that needs clearing by hand.
    The file is opened close-on-exec, so processes the holder starts (Ray) do not inherit it.
    """
    path = lock_path(data_root, stage, fp)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_locked(data_root: Path, stage: str, fp: str) -> bool:
    """Whether a process holds the lock of this output now (a run is writing it)."""
    path = lock_path(data_root, stage, fp)
    if not path.is_file():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def leftovers(data_root: Path, stage: str, fp: str | None = None) -> list[Path]:
    """Temporary and trash directories of ``stage`` (of one fingerprint if given).

    Only a lock holder writes ``.tmp-{fp}-*``, so under the lock every such directory is the
    remains of a run that died.
    """
    parent = Path(data_root) / stage
    if not parent.is_dir():
        return []
    prefixes = ((f"{TMP_PREFIX}{fp}-", f"{TRASH_PREFIX}{fp}-") if fp
                else (TMP_PREFIX, TRASH_PREFIX))
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefixes))


@dataclass(frozen=True)
class StageOutput:
    """Where one fingerprint of one workflow entry is committed: ``data_root/name/fingerprint``."""

    data_root: Path
    name: str  # the workflow entry (the stage's name when run alone)
    fingerprint: str

    @property
    def dir(self) -> Path:
        return committed_dir(self.data_root, self.name, self.fingerprint)


def run_committed(spec: StageSpec, config: Any, output: StageOutput, record: Mapping[str, Any],
                  ctx: StageContext | None = None, replace: bool = False,
                  ) -> tuple[Path, dict[str, Any]]:
    """Run ``spec`` into a temporary directory, then commit it atomically as ``output``.

    Call it holding :func:`output_lock` for the same output when other runs may write it.

    Parameters
    ----------
    ctx : the stage's inputs, logger and console settings; its ``output_dir`` and
        ``committed_dir`` are set here. None: no inputs, no tracking.
    replace : swap out an existing committed output (a forced rerun). The old one stays
        readable until the new one is complete, so a forced rerun that fails or is killed
        keeps it.

    Returns the committed directory and the stage's summary. If another process committed the
    same fingerprint meanwhile (without the lock), its output is kept and ours discarded.
    """
    final = output.dir
    tmp = final.parent / f"{TMP_PREFIX}{output.fingerprint}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        base = ctx or StageContext(output_dir=tmp, inputs={})
        summary = spec.run(config, dataclasses.replace(base, output_dir=tmp, committed_dir=final))
        full_record = {**record, "summary": summary}
        (tmp / STAGE_RECORD).write_text(json.dumps(full_record, indent=2, default=str))
        if replace and final.exists():
            _discard(final)
        try:
            os.rename(tmp, final)  # atomic on one filesystem: readers see all or nothing
        except OSError:
            if read_record(final) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return final, summary
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_stage(spec: StageSpec, config: Any, output: StageOutput, record: Mapping[str, Any],
                 ctx: StageContext | None = None, *, force: bool = False,
                 on_wait: Callable[[], None] | None = None,
                 on_run: Callable[[], None] | None = None,
                 ) -> tuple[Path, dict[str, Any], bool]:
    """Reuse the committed ``output`` or run the stage into it, under the output's lock.

    The record is read again once the lock is held: a concurrent run that committed the same
    output while this one waited is reused, not repeated. Leftovers of killed runs of the
    fingerprint are deleted first. ``ctx`` is as :func:`run_committed` takes it.

    Returns
    -------
    (output directory, the committed record, reused)
    """
    data_root, name, fp = output.data_root, output.name, output.fingerprint
    with output_lock(data_root, name, fp, on_wait=on_wait):
        for stale in leftovers(data_root, name, fp):
            shutil.rmtree(stale, ignore_errors=True)
        existing = read_record(output.dir)
        if existing is not None and not force:
            return output.dir, existing, True
        if on_run is not None:
            on_run()
        committed, summary = run_committed(spec, config, output, record, ctx, replace=force)
        return committed, {**record, "summary": summary}, False


def _discard(path: Path) -> None:
    """Move a committed output aside, then delete it (the rename is what readers see)."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
