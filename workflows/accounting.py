"""Where every sample of a workflow went: one quarantine table across stages, and the counts
checked along the chain.

Each stage that can reject samples (ingest, preprocess) writes ``quarantine.parquet`` beside its
output with ``key``, ``shard``, ``stage``, ``reason`` and ``origin``: the user's original file
or manifest row (ingest records it in every sample's json, so preprocess can name it too).
:func:`rejected_samples` gathers them for the outputs of a workflow's current plan, and
:func:`chain_counts` checks that what one stage put out is what the next one took in, from the
counts in the stage records:

    ingest      in 50 = out 46 + quarantined 4
    preprocess  in 46 (= ingest out) = out 44 + quarantined 2
    tokenize    44 token rows (= preprocess out)

``mmvq quarantine WORKFLOW`` (:mod:`workflows.cli`) prints both; the runner logs the chain to the parent MLflow run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.formats.shards import QUARANTINE_FILE
from pipeline.stage import read_record

COLUMNS = ("stage", "origin", "key", "reason", "shard")


@dataclass(frozen=True)
class ChainLine:
    """One stage's sample counts and whether its input matches its upstream's output."""

    entry: str  # the workflow entry name
    stage: str  # the registry name
    taken: int  # samples in (or token rows, for tokenize)
    out: int
    quarantined: int
    upstream: str | None = None  # the entry whose output this one read
    upstream_out: int | None = None

    @property
    def consistent(self) -> bool:
        balanced = self.taken == self.out + self.quarantined
        return balanced and (self.upstream_out is None or self.upstream_out == self.taken)

    def text(self) -> str:
        source = f" (= {self.upstream} out {self.upstream_out})" if self.upstream else ""
        if self.upstream_out is not None and self.upstream_out != self.taken:
            source = f" (MISMATCH: {self.upstream} put out {self.upstream_out})"
        if self.stage == "tokenize":
            return f"{self.entry:<12} {self.out} token rows{source}"
        return (f"{self.entry:<12} in {self.taken}{source} = out {self.out} + quarantined "
                f"{self.quarantined}")


def _counts(stage: str, summary: dict[str, Any]) -> tuple[int, int, int] | None:
    """(in, out, quarantined) from a stage's summary, or None if it does not count samples."""
    counts = summary.get("counts")
    if not isinstance(counts, dict):
        return None
    if stage == "tokenize":  # {split: rows}
        rows = sum(v for v in counts.values() if isinstance(v, int))
        return rows, rows, 0
    if {"in", "out", "quarantined"} <= set(counts):
        return int(counts["in"]), int(counts["out"]), int(counts["quarantined"])
    if stage == "synth":  # {split: n}
        made = sum(v for v in counts.values() if isinstance(v, int))
        return made, made, 0
    return None


def chain_counts(plan: Sequence[Any]) -> list[ChainLine]:
    """The counts of every committed stage of ``plan`` that handles samples, in plan order.

    ``plan`` is :func:`workflows.plan.plan_workflow`'s list; stages without a committed output
    (not run yet, skipped) are left out.
    """
    lines: dict[str, ChainLine] = {}
    for step in plan:
        record = read_record(step.output)
        counted = record and _counts(step.stage, record.get("summary") or {})
        if not counted:
            continue
        # The sample stream flows through shards -> data: the one input slot that carries it.
        slot = next((s for s in ("shards", "data") if s in step.inputs), None)
        upstream = step.inputs.get(slot) if slot else None
        above = lines.get(upstream) if upstream else None
        taken, out, quarantined = counted
        lines[step.name] = ChainLine(step.name, step.stage, taken, out, quarantined,
                                     upstream if above else None,
                                     above.out if above else None)
    return list(lines.values())


def rejected_samples(plan: Sequence[Any]) -> pa.Table:
    """Every quarantined sample of the committed outputs of ``plan``, stage by stage."""
    tables = []
    for step in plan:
        path = Path(step.output) / QUARANTINE_FILE
        if read_record(step.output) is None or not path.is_file():
            continue
        table = pq.read_table(path)
        n = table.num_rows
        columns = {name: table[name].cast(pa.string()) if name in table.column_names
                   else pa.nulls(n, pa.string()) for name in COLUMNS}
        columns["stage"] = pa.array([step.name] * n, pa.string())
        if "origin" not in table.column_names:  # older outputs: the shard and key
            columns["origin"] = columns["shard"]
        tables.append(pa.table(columns))
    if not tables:
        return pa.table({name: pa.array([], pa.string()) for name in COLUMNS})
    return pa.concat_tables(tables)


def format_quarantine(rejected: pa.Table, chain: Sequence[ChainLine], limit: int = 50) -> str:
    """The ``mmvq quarantine`` text: the chain of counts, then one line per rejected sample."""
    lines = ["samples, stage by stage:"]
    lines += [f"  {line.text()}" + ("" if line.consistent else "   <-- counts do not add up")
              for line in chain]
    if not chain:
        lines.append("  (no committed stage that counts samples: run the workflow first)")
    rows = rejected.to_pylist()
    lines += ["", f"{len(rows)} quarantined sample{'s' if len(rows) != 1 else ''}"
              + (":" if rows else ".")]
    shown = rows if limit <= 0 else rows[:limit]
    for row in shown:
        lines.append(f"  [{row['stage']}] {row['origin'] or row['shard']}  key {row['key']!r}: "
                     f"{row['reason']}")
    if len(shown) < len(rows):
        lines.append(f"  ... {len(rows) - len(shown)} more (--limit 0 shows all, --csv FILE "
                     "writes them)")
    return "\n".join(lines)


def chain_metrics(chain: Sequence[ChainLine]) -> dict[str, float]:
    """Counts per stage for the parent MLflow run, and 1.0/0.0 for whether the chain adds up."""
    metrics: dict[str, float] = {}
    for line in chain:
        metrics[f"samples/{line.entry}/in"] = line.taken
        metrics[f"samples/{line.entry}/out"] = line.out
        metrics[f"samples/{line.entry}/quarantined"] = line.quarantined
    if chain:
        metrics["samples/chain_consistent"] = float(all(line.consistent for line in chain))
    return metrics
