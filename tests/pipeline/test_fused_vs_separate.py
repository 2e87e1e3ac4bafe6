"""Evaluate's fused-vs-separate comparison against a real MLflow server: the newest version
trained without fusion is found, loaded and scored through the same probe, on the same split."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from traindata import MODEL, write_dataset

from mmvq import MultimodalTokenizer
from mmvq.config import FusionConfig, ImageCodecConfig
from pipeline import report
from pipeline.evaluate import EvaluateConfig, _fused_vs_separate, _separate_model
from pipeline.formats.registry import previous_version
from pipeline.register import RegisterConfig, run
from pipeline.stage import StageContext
from pipeline.tracking import RunLogger, ensure_experiment

NAME = "fusion-compare-tokenizer"
FUSED = dataclasses.replace(MODEL, fusion=FusionConfig(enabled=True, dim=32, num_layers=1))


def _register(root, uri, model, metrics):
    """One version of NAME for ``model``, tagged with ``metrics`` as its evaluation."""
    model.save(root / "train" / "tokenizer")
    (root / "evaluate").mkdir(parents=True)
    (root / "evaluate" / "metrics.json").write_text(
        json.dumps({"trained": metrics, "untrained": {}}))
    client = MlflowClient(uri)
    experiment = ensure_experiment(client, "fused-vs-separate", root / "artifacts")
    ctx = StageContext(output_dir=root / "out", inputs={"model": root / "train",
                                                        "evaluation": root / "evaluate"},
                       logger=RunLogger(uri, client.create_run(experiment).info.run_id),
                       tracking_uri=uri)
    ctx.output_dir.mkdir()
    return run(RegisterConfig(name=NAME), ctx)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, mlflow_server, ray_local):
    """v1 separate (no joint metrics), then v2 fused: the comparison must skip v2."""
    root = tmp_path_factory.mktemp("fused-vs-separate")
    torch.manual_seed(0)
    _register(root / "v1", mlflow_server, MultimodalTokenizer(MODEL), {"image/psnr": 20.0})
    _register(root / "v2", mlflow_server, MultimodalTokenizer(FUSED),
              {"image/psnr": 19.0, "joint/codebook_usage": 0.5})
    data = write_dataset(root / "data", train_rows=24, val_rows=16)
    return mlflow_server, data


def test_previous_version_tells_fused_from_separate_versions(registry):
    uri, _ = registry
    assert previous_version(uri, NAME)["version"] == 2
    assert previous_version(uri, NAME, fused=True)["version"] == 2
    separate = previous_version(uri, NAME, fused=False)
    assert separate["version"] == 1 and separate["fused"] is False
    assert separate["metrics"] == {"image/psnr": 20.0}


def test_fused_model_is_scored_beside_the_newest_separate_version(registry):
    uri, data = registry
    config = EvaluateConfig(compare_with=NAME)
    torch.manual_seed(1)
    fused = MultimodalTokenizer(FUSED).eval()
    separate, note = _separate_model(config, fused, uri, torch.device("cpu"))
    assert note is None and separate["version"] == 1
    assert separate["model"].fusion is None
    comparison = _fused_vs_separate(config, data / "val", fused, separate, note)
    for side in ("fused", "separate"):
        scores = comparison[side]
        assert scores["val_samples"] == 16
        assert set(scores["probe"]) >= {"image_to_text/r5", "audio_to_text/r5",
                                        "image_to_audio/median_rank"}
        assert all(0.0 <= scores["probe"][f"{p}/r5"] <= 1.0
                   for p in ("image_to_text", "audio_to_text", "image_to_audio"))
    assert comparison["fused"]["heads"] is not None  # the fused model's own embeddings
    assert comparison["separate"]["heads"] is None and comparison["separate"]["version"] == 1
    assert 0.0 < comparison["fused"]["chance"]["r5"] < 1.0


def test_report_shows_the_comparison_table(registry, tmp_path):
    uri, data = registry
    config = EvaluateConfig(compare_with=NAME)
    fused = MultimodalTokenizer(FUSED).eval()
    separate, note = _separate_model(config, fused, uri, torch.device("cpu"))
    comparison = _fused_vs_separate(config, data / "val", fused, separate, note)
    results = {"trained": {"image/psnr": 19.5, "cross/nmi_image_text": 0.4,
                           "joint/codebook_usage": 0.9},
               "untrained": {}, "separate": {"image/psnr": 20.0, "cross/nmi_image_text": 0.3}}
    page = report.write_report(tmp_path, results, None, {}, fused_vs_separate=comparison)
    text = page.read_text()
    assert 'id="fused-vs-separate"' in text and "separate v1" in text
    assert "image→text R@5 (probe)" in text and "R@5 (fused heads)" in text
    assert "<td>image/psnr</td><td>19.5000</td><td>20.0000</td><td>-0.5000</td>" in text


def test_without_a_comparable_separate_version_the_report_says_why(registry, tmp_path):
    uri, data = registry
    fused = MultimodalTokenizer(FUSED).eval()
    config = EvaluateConfig(compare_with="no-such-tokenizer")
    separate, note = _separate_model(config, fused, uri, torch.device("cpu"))
    assert separate is None and "train.model.fusion.enabled=false" in note
    # A separate version for other inputs is not compared with: it would not read this data.
    wide = dataclasses.replace(FUSED, image=ImageCodecConfig(image_size=64))
    separate, note = _separate_model(EvaluateConfig(compare_with=NAME),
                                     MultimodalTokenizer(wide), uri, torch.device("cpu"))
    assert separate is None and "image size 64 here, 32 there" in note
    comparison = _fused_vs_separate(config, data / "val", fused, None, note)
    # Nothing to compare with: no probe is fitted (it costs more than the rest of the stage),
    # and the fused heads' retrieval stands alone.
    assert comparison["separate"] is None and comparison["fused"]["probe"] is None
    assert set(comparison["fused"]["heads"]) >= {"image_to_text/r5", "audio_to_text/median_rank"}
    text = report.write_report(tmp_path, {"trained": {}, "untrained": {}}, None, {},
                               fused_vs_separate=comparison).read_text()
    assert "image size 64 here, 32 there" in text
    assert "image→text R@10 (fused heads)" in text and "(probe)" not in text
