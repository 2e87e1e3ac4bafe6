"""A registered tokenizer version: the served model's columns and the tags a version carries.

The register stage writes them; evaluate reads the newest version's back to compare with it, and
a token row's ``tokenizer`` id (``local:<hash>``) finds its version by ``tags.tokenizer_id``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The served model (pipeline.tokenizer_model): its artifact key and its columns in and out.
ARTIFACT = "tokenizer"  # key of the tokenizer directory in the model's artifacts
INPUT_COLUMNS = ("key", "image", "audio", "text")
TOKEN_COLUMNS = ("image_tokens", "image_grid", "audio_tokens", "text_tokens", "joint_tokens",
                 "interleaved_tokens")
OUTPUT_COLUMNS = ("key", *TOKEN_COLUMNS, "audio_frames", "tokenizer")  # predict's, in order
# evaluate's scores (``{"trained": {...}, "untrained": {...}}``), which register tags a version with.
METRICS_FILE = "metrics.json"
METRIC_TAG_PREFIX = "eval/"  # version tag per trained metric: eval/image/psnr = 21.3


def version_tags(metrics: Mapping[str, float]) -> dict[str, str]:
    """The tags that record a version's evaluation metrics (``eval/KEY`` -> repr of the value)."""
    return {f"{METRIC_TAG_PREFIX}{k}": repr(float(v)) for k, v in metrics.items()}


# A version whose evaluation scored joint tokens was trained with fusion (mmvq.fusion).
FUSED_METRIC = "joint/codebook_usage"


def previous_version(tracking_uri: str, name: str,
                     fused: bool | None = None) -> dict[str, Any] | None:
    """The newest registered version of ``name``: version, metrics from its tags, tokenizer id,
    and whether it was trained with fusion.

    ``fused``: only versions trained with (True) or without (False) fusion, told apart by their
    evaluation's joint-token metric; None: any version. None is returned when there is no such
    version (or the registry cannot be reached: a comparison is a nice-to-have, never a reason
    to fail an evaluation).
    """
    try:
        from mlflow.tracking import MlflowClient

        versions = MlflowClient(tracking_uri).search_model_versions(f"name = '{name}'")
    except Exception:  # noqa: BLE001 - no registry, no comparison
        return None
    found = []
    for version in versions:
        metrics = {k[len(METRIC_TAG_PREFIX):]: float(v) for k, v in version.tags.items()
                   if k.startswith(METRIC_TAG_PREFIX)}
        if fused is None or (FUSED_METRIC in metrics) == fused:
            found.append((int(version.version), version, metrics))
    if not found:
        return None
    number, newest, metrics = max(found, key=lambda item: item[0])
    return {"name": name, "version": number, "metrics": metrics,
            "fused": FUSED_METRIC in metrics, "tokenizer_id": newest.tags.get("tokenizer_id", "")}
