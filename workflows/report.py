"""The end-of-run report: per stage what ran or was reused, and the headline scores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class StageResult:
    name: str
    fingerprint: str
    output: Path
    reused: bool
    seconds: float
    run_id: str
    summary: dict[str, Any]
    tracking_uri: str = ""


def _evaluation(results: Sequence[StageResult]) -> dict[str, Any] | None:
    """The evaluate stage's summary (trained and untrained metrics), if the workflow has one."""
    return next((r.summary for r in results
                 if isinstance(r.summary, dict) and "trained" in r.summary), None)


def headline_metrics(results: Mapping[str, StageResult]) -> dict[str, float]:
    """Evaluate's trained and untrained metrics, logged on the parent run."""
    evaluation = _evaluation(list(results.values()))
    if not evaluation:
        return {}
    return {f"{model}/{k}": float(v) for model in ("trained", "untrained")
            for k, v in evaluation.get(model, {}).items()}


def format_report(results: Sequence[StageResult], tracking_uri: str) -> str:
    """The closing text: stage timings, trained vs untrained metrics, where things are."""
    lines = ["", "stage        time     state    output"]
    for r in results:
        lines.append(f"{r.name:<12} {r.seconds:>6.1f}s  {'reused' if r.reused else 'ran':<8} "
                     f"{r.output}")
    evaluation = _evaluation(results)
    if evaluation:
        lines += ["", f"{'metric (val)':<28} {'trained':>10} {'untrained':>10}"]
        for key in sorted(evaluation["trained"]):
            if key == "samples":
                continue
            lines.append(f"{key:<28} {evaluation['trained'][key]:>10.4f} "
                         f"{evaluation['untrained'].get(key, float('nan')):>10.4f}")
    tokens = next((r.output / r.summary["tokens"] for r in results if "tokens" in r.summary),
                  None)
    if tokens:
        lines += ["", f"token dataset: {tokens}  (parquet, one directory per split)"]
    lines += [f"MLflow tracking: {tracking_uri}",
              ("open the UI:     make ui   (or: mlflow ui --backend-store-uri "
              f"{tracking_uri} --host 127.0.0.1)")]
    return "\n".join(lines)
