"""Plan-time check that a stage's split exists in its input, before any stage runs.

``evaluate.split=nosuch`` used to pass planning, let preprocess, train and tokenize run, and
then fail in evaluate. A stage config that reads a named split says so with
``required_splits()`` (input slot -> split); the splits its input will have are known when the
planning can tell:

- an upstream output that is committed (reused): its split directories, read from disk;
- an upstream that will run: its config's ``output_splits()`` when it has one (synth: ``train``
  and ``val`` when ``val_fraction`` gives any), else the splits of its own single stage input
  (preprocess and tokenize keep the splits they read);
- anything else (ingest, whose source may name its own splits; the user's folder): unknown, and
  then the stage itself fails at its start with the split's path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError


def check_splits(plan: Sequence[Any]) -> None:
    """Raise ConfigError naming the stage, split and the input's splits when a stage of ``plan``
    (``workflows.plan.PlannedStage`` items) asks for a split its input will not have."""
    by_name = {step.name: step for step in plan}
    for step in plan:
        required = getattr(step.config, "required_splits", None)
        if step.action != "run" or required is None:
            continue
        for slot, split in required().items():
            upstream = step.inputs.get(slot) if step.input_is_stage(slot) else None
            have = splits_of(upstream, by_name) if upstream else None
            if have is not None and split not in have:
                raise ConfigError(
                    f"{step.name}.split={split!r}: its input {slot!r} (stage {upstream}) has "
                    f"split{'s' if len(have) != 1 else ''} {', '.join(sorted(have)) or 'none'}")


def splits_of(name: str, plan: Mapping[str, Any]) -> set[str] | None:
    """The splits stage ``name``'s output has or will have; None when that cannot be known."""
    step = plan.get(name)
    if step is None:
        return None
    if step.action != "run":
        return committed_splits(step.output)
    declared = getattr(step.config, "output_splits", None)
    if declared is not None:
        return declared()
    stage_inputs = [upstream for slot, upstream in step.inputs.items()
                    if step.input_is_stage(slot)]
    return splits_of(stage_inputs[0], plan) if len(stage_inputs) == 1 else None


def committed_splits(output: Path) -> set[str] | None:
    """Split directories of a committed output (hidden ones are bookkeeping, not splits)."""
    if not output.is_dir():
        return None
    return {p.name for p in output.iterdir() if p.is_dir() and not p.name.startswith(".")}
