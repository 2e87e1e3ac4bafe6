"""Plan a workflow: per stage, run, reuse or skip, and why. Starts nothing.

For each stage in order the planner builds its typed config (with the model's shapes derived
from the data contract, :mod:`pipeline.formats.preprocessed`) and computes its fingerprint, then
decides to reuse the committed output of an earlier run with the same fingerprint or to run it
into a fresh committed directory. Flags narrow or widen the plan: ``only`` (just these stages, on
committed upstream outputs), ``from_`` (these and everything downstream), ``force`` (these).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError, apply_overrides, flatten, from_dict, load_yaml, to_dict
from pipeline.stage import (
    StageSpec,
    committed_dir,
    committed_outputs,
    fingerprint,
    is_locked,
    leftovers,
    read_record,
)
from workflows.spec import StageEntry, Workflow, workflow_data_root, workflow_tracking_uri
from workflows.splits import check_splits
from workflows.stages import STAGES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedStage:
    """What the runner will do with one stage, and why."""

    name: str  # the workflow entry (also the directory under data_root)
    stage: str  # the registry name
    config: Any  # the typed stage config
    input_fps: dict[str, str]  # input slot -> upstream fingerprint
    inputs: dict[str, str]  # input slot -> upstream entry name
    fingerprint: str
    code: str  # the stage's code version
    action: Literal["run", "reuse", "skip"]
    reason: str
    output: Path  # the committed directory of this fingerprint (present or not)
    forced: bool = False  # rerun even if the output is committed
    run_id: str = ""  # MLflow run that produced the committed output, if known
    previous: Path | None = None  # newest committed output of this entry for another fingerprint
    external: tuple[str, ...] = ()  # input slots that name the user's data, not an entry

    def input_is_stage(self, slot: str) -> bool:
        return slot not in self.external


class PlanError(ConfigError):
    """The flags ask for a plan that cannot run (an upstream output is missing)."""


def load_workflow(path: str | Path, overrides: Sequence[str] = ()) -> Workflow:
    """Read and validate a workflow file; ``overrides`` are ``STAGE.key=value`` or ``key=value``.

    ``train.steps=50`` sets ``stages.train.config.steps``; top-level keys (``data_root=...``)
    are set as they are.
    """
    data = load_yaml(path)
    stage_names = set(data.get("stages", {}) or {})
    rewritten = []
    for item in overrides:
        key = item.split("=", 1)[0]
        head = key.split(".", 1)[0]
        rewritten.append(f"stages.{head}.config.{item.split('.', 1)[1]}"
                         if head in stage_names and "." in key else item)
    data = apply_overrides(data, rewritten)
    workflow = from_dict(Workflow, data, source=str(path))
    for name, entry in workflow.stages.items():
        stage = entry.stage or name
        if stage not in STAGES:
            raise ConfigError(f"{path}: stages.{name}: unknown stage {stage!r} "
                              f"(known: {', '.join(STAGES)})")
        slots = set(STAGES[stage].inputs)
        if set(entry.inputs) != slots:
            raise ConfigError(f"{path}: stages.{name}.inputs must name exactly "
                              f"{sorted(slots)}, got {sorted(entry.inputs)}")
        for slot, upstream in entry.inputs.items():
            if upstream not in workflow.stages and slot in STAGES[stage].external_inputs:
                continue  # the user's shards; checked (listed) when the plan is made
            if upstream not in workflow.stages or list(workflow.stages).index(upstream) >= \
                    list(workflow.stages).index(name):
                raise ConfigError(f"{path}: stages.{name}.inputs.{slot}: {upstream!r} is not "
                                  "a stage listed before it")
        from_dict(STAGES[stage].config_type, entry.config,
                  source=str(path), path=f"stages.{name}.config")
    return workflow


def external_fingerprint(location: str, where: str) -> str:
    """Fingerprint of a user's shards named as an input (``where`` names the key in errors)."""
    from pipeline.storage import listing_fingerprint

    try:
        return listing_fingerprint(location, (".tar",))
    except FileNotFoundError as err:
        raise ConfigError(f"{where}: {err} (name a folder, a .tar file or an s3:// prefix of "
                          "webdataset shards, e.g. the output of `mmvq ingest`)") from err


def input_locations(planned: PlannedStage, data_root: Path) -> dict[str, Path | str]:
    """Where each input slot of ``planned`` reads: an upstream entry's committed output for
    its fingerprint (a reused or skipped upstream has no result to ask), or the user's path."""
    return {slot: committed_dir(data_root, upstream, planned.input_fps[slot])
            if planned.input_is_stage(slot) else upstream
            for slot, upstream in planned.inputs.items()}


def plan_workflow(workflow: Workflow, *, only: Sequence[str] = (), from_: Sequence[str] = (),
                  force: Sequence[str] = (), tracking_uri: str | None = None,
                  ) -> list[PlannedStage]:
    """Decide per stage: run, reuse or skip, with the reason. Starts nothing.

    Parameters
    ----------
    only : run just these stages (always, as if forced); every other stage is reused from its
        committed output or skipped. A missing output that an ``only`` stage reads is an error.
    from_ : rerun these stages and everything downstream of them.
    force : rerun these stages even when their output is committed.
    tracking_uri : where to look up the MLflow run that produced each committed output;
        None: the workflow's. Lookup failures only cost the run ids in the reasons.

    Raises
    ------
    ConfigError
        For a flag naming an unknown stage; :class:`PlanError` for a missing upstream output.
    """
    for flag, names in (("--only", only), ("--from", from_), ("--force", force)):
        unknown = [n for n in names if n not in workflow.stages]
        if unknown:
            raise ConfigError(f"{flag} names unknown stage {unknown[0]!r} "
                              f"(stages: {', '.join(workflow.stages)})")
    data_root = workflow_data_root(workflow)
    producers = _ProducerLookup(tracking_uri or workflow_tracking_uri(workflow), workflow.name)
    downstream = _downstream(workflow, from_)
    plan: dict[str, PlannedStage] = {}
    for name, entry in workflow.stages.items():
        spec = STAGES[entry.stage or name]
        config = from_dict(spec.config_type, _derived(spec, name, entry, plan),
                           path=f"stages.{name}.config")
        input_fps = {slot: plan[u].fingerprint if u in plan else
                     external_fingerprint(u, f"stages.{name}.inputs.{slot}")
                     for slot, u in entry.inputs.items()}
        code = spec.code_version()
        fp = fingerprint(spec.name, config, input_fps, code)
        output = committed_dir(data_root, name, fp)
        committed = read_record(output)
        history = [p for p in committed_outputs(data_root, name) if p != output]
        base = PlannedStage(name, spec.name, config, input_fps, dict(entry.inputs), fp, code,
                            "run", "", output, previous=history[-1] if history else None,
                            external=tuple(s for s, u in entry.inputs.items() if u not in plan))
        run_id = producers.run_id(spec.name, fp) if committed or not history else ""
        run_id = run_id or (committed or {}).get("mlflow_run_id", "")
        reuse = _replace(base, action="reuse", run_id=run_id,
                         reason=f"committed output {output}"
                         + (f" (MLflow run {run_id})" if run_id else ""))
        step = _decide(workflow, base, reuse, committed is not None, only=only, from_=from_,
                       force=force, downstream=downstream)
        if step is None:
            step = _replace(base, reason=_why_run(base, plan, data_root, producers))
        plan[name] = step
    check_splits(list(plan.values()))  # a split a stage reads exists, before anything runs
    return list(plan.values())


def _derived(spec: StageSpec, name: str, entry: StageEntry,
             plan: Mapping[str, PlannedStage]) -> dict[str, Any]:
    """The entry's raw config with what its upstream stages' data contracts decide filled in
    (train's model shapes from preprocess's config); a conflict is a ConfigError naming both."""
    if spec.derive is None:
        return entry.config
    contracts = {}
    for slot, upstream in entry.inputs.items():
        producer = STAGES[plan[upstream].stage] if upstream in plan else None
        if producer is not None and producer.contract is not None:
            contracts[slot] = (producer.contract(plan[upstream].config), upstream)
    try:
        return spec.derive(entry.config, contracts)
    except ConfigError as err:
        raise ConfigError(str(err).replace(f"{spec.name}.model.", f"{name}.model.", 1)) from None


def _decide(workflow: Workflow, base: PlannedStage, reuse: PlannedStage, committed: bool, *,
            only: Sequence[str], from_: Sequence[str], force: Sequence[str],
            downstream: set[str]) -> PlannedStage | None:
    """The flags' verdict on one stage; None: run for lack of a committed output."""
    name = base.name
    if only:
        if name in only:
            return _replace(base, forced=True, reason="--only " + name)
        if committed:
            return reuse
        readers = [n for n in only if name in workflow.stages[n].inputs.values()]
        if readers:
            raise PlanError(
                f"--only {' '.join(only)}: {readers[0]} reads the output of {name}, which has "
                f"no committed output for fingerprint {base.fingerprint} ({base.output} is "
                f"missing); run the workflow without --only, or add --only {name}")
        return _replace(base, action="skip", reason="not read by the --only stages")
    if name in force or name in downstream:
        why = (f"--force {name}" if name in force else
               f"--from {name}" if name in from_ else
               f"downstream of --from {' '.join(from_)}")
        return _replace(base, forced=True, reason=why)
    return reuse if committed else None


def _replace(planned: PlannedStage, **changes: Any) -> PlannedStage:
    return dataclasses.replace(planned, **changes)


def _downstream(workflow: Workflow, roots: Sequence[str]) -> set[str]:
    """``roots`` and every stage that reads, directly or not, from one of them."""
    found = set(roots)
    for name, entry in workflow.stages.items():  # listed in order: upstream before downstream
        if found & set(entry.inputs.values()):
            found.add(name)
    return found


def _why_run(step: PlannedStage, plan: Mapping[str, PlannedStage], data_root: Path,
             producers: _ProducerLookup) -> str:
    """Why a stage without a committed output for its fingerprint runs: what changed since the
    newest committed output of the same entry (its stage record holds config, code, inputs)."""
    rerun = [u for u in dict.fromkeys(step.inputs.values())
             if u in plan and plan[u].action == "run"]
    reasons = [f"upstream {', '.join(rerun)} rerun{'s' if len(rerun) == 1 else ''}"] \
        if rerun else []
    previous = read_record(step.previous) if step.previous else None
    if previous is None:
        run_id = producers.run_id(step.stage, step.fingerprint)
        if run_id:  # MLflow remembers an output that is no longer on disk
            return (f"no committed output: MLflow run {run_id} finished this fingerprint but "
                    f"{step.output} is gone")
        return "; ".join(reasons) or "no committed output yet"
    changes, added = _config_changes(previous.get("config", {}), to_dict(step.config))
    if changes:
        shown = ", ".join(f"{step.name}.{k} {old}\u2192{new}" for k, old, new in changes[:3])
        more = f", +{len(changes) - 3} more" if len(changes) > 3 else ""
        reasons.append(f"config changed ({shown}{more})")
    if added:  # fields the config class gained since: a code change, not a user edit
        names = ", ".join(added[:2]) + (", ..." if len(added) > 2 else "")
        reasons.append(f"{len(added)} config field{'s' if len(added) > 1 else ''} new since "
                       f"{step.previous.name} ({names})")
    if previous.get("code") != step.code:
        old_libs = previous.get("libraries", {})
        new_libs = STAGES[step.stage].library_versions()
        bumped = [f"{n} {old_libs[n]}\u2192{v}" for n, v in new_libs.items()
                  if n in old_libs and old_libs[n] != v]
        reasons.append(f"library changed ({', '.join(bumped)})" if bumped else
                       f"code changed ({previous.get('code')}\u2192{step.code})")
    if not any(r.startswith("upstream") for r in reasons):
        old_inputs = previous.get("input_fingerprints", {})
        changed = [f"{slot} {old_inputs.get(slot, '?')}\u2192{fp}"
                   for slot, fp in step.input_fps.items() if old_inputs.get(slot) != fp]
        if changed:
            reasons.append(f"inputs changed ({', '.join(changed)})")
    return "; ".join(reasons) or f"fingerprint differs from {step.previous.name}"


def _config_changes(old: Mapping[str, Any], new: Mapping[str, Any],
                    ) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """``(key, old, new)`` per flattened key whose value differs, and the keys ``old`` lacks.

    Both go through a JSON round trip, so a tuple in the config equals the list in the record.
    """
    old_flat = flatten(json.loads(json.dumps(old, default=str)))
    new_flat = flatten(json.loads(json.dumps(new, default=str)))
    changed = [(k, old_flat[k], new_flat[k]) for k in sorted(set(old_flat) & set(new_flat))
               if old_flat[k] != new_flat[k]]
    return changed, sorted(set(new_flat) - set(old_flat))


class _ProducerLookup:
    """The MLflow run that produced a fingerprint (tags ``stage``, ``fingerprint``,
    ``reused=false``), looked up once per fingerprint; None of it may fail the plan."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self._experiment_id: str | None = None
        self._cache: dict[tuple[str, str], str] = {}
        self._disabled = self._missing_sqlite(tracking_uri)

    @staticmethod
    def _missing_sqlite(uri: str) -> bool:
        # Opening a SQLite URI creates the database; a plan must not write anything.
        return uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file()

    def run_id(self, stage: str, fp: str) -> str:
        if self._disabled:
            return ""
        if (stage, fp) not in self._cache:
            self._cache[(stage, fp)] = self._search(stage, fp)
        return self._cache[(stage, fp)]

    def _search(self, stage: str, fp: str) -> str:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            client = MlflowClient(self.tracking_uri)
            if self._experiment_id is None:
                experiment = client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    self._disabled = True
                    return ""
                self._experiment_id = experiment.experiment_id
            runs = client.search_runs(
                [self._experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                filter_string=(f"tags.stage = '{stage}' AND tags.fingerprint = '{fp}' AND "
                               "tags.reused = 'false' AND attributes.status = 'FINISHED'"))
        except Exception as err:  # noqa: BLE001 - run ids are a courtesy of the plan
            log.warning("MLflow lookup at %s failed, plan without run ids: %s",
                        self.tracking_uri, err)
            self._disabled = True
            return ""
        return runs[0].info.run_id if runs else ""


def format_plan(plan: Sequence[PlannedStage]) -> str:
    """The ``--dry-run`` text: one line per stage, ``run``/``reuse``/``skip`` and why."""
    lines = []
    for step in plan:
        lines.append(f"{step.name:<12} {step.fingerprint}  {step.action}: {step.reason}")
        if step.action == "run" and hasattr(step.config, "describe"):
            lines += [f"{'':<12} {line}" for line in step.config.describe()]
    return "\n".join(lines)


StageState = Literal["done", "missing", "stale", "running"]


def stage_state(step: PlannedStage, data_root: Path) -> StageState:
    """``done``: committed for the current fingerprint; ``running``: a run holds its lock;
    ``stale``: committed only for older fingerprints; ``missing``: never committed."""
    if read_record(step.output) is not None:
        return "done"
    if is_locked(data_root, step.name, step.fingerprint):
        return "running"
    return "stale" if step.previous is not None else "missing"


def format_status(workflow: Workflow, plan: Sequence[PlannedStage]) -> str:
    """The ``mmvq status`` table: state, fingerprint, MLflow run and output per stage."""
    data_root = workflow_data_root(workflow)
    rows = [("STAGE", "STATE", "FINGERPRINT", "MLFLOW RUN", "OUTPUT")]
    notes = []
    for step in plan:
        state = stage_state(step, data_root)
        output = step.output if state in ("done", "running") else step.previous or "-"
        rows.append((step.name, state, step.fingerprint, step.run_id or "-", str(output)))
        if state == "stale":
            notes.append(f"{step.name}: stale, reruns because {step.reason}")
        left = leftovers(data_root, step.name)
        if left and state != "running":
            notes.append(f"{step.name}: {len(left)} unfinished director"
                         f"{'y' if len(left) == 1 else 'ies'} of killed runs (removed when "
                         f"that fingerprint runs next): {', '.join(p.name for p in left)}")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"workflow {workflow.name}  data root {data_root}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4]
              for row in rows]
    return "\n".join(lines + notes)
