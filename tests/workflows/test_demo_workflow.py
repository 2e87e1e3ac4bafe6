"""End to end: the demo workflow at tiny size against a real MLflow server and in-process Ray."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray.data
from mlflow.tracking import MlflowClient

from workflows.runner import load_workflow, run_workflow

TINY = ["synth.num_samples=40", "synth.samples_per_shard=16", "synth.val_fraction=0.25",
        "train.steps=4", "train.batch_size=4", "train.log_every=2",
        "tokenize.batch_size=16", "evaluate.batch_size=16",
        # Fusion on, so joint tokens and retrieval go through the whole pipeline too.
        "train.model.fusion.enabled=true", "train.model.fusion.dim=32",
        "train.model.fusion.num_layers=1"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, mlflow_server, ray_local):
    root = tmp_path_factory.mktemp("demo")
    workflow = load_workflow("workflows/demo.yaml",
                             TINY + [f"data_root={root}", f"tracking_uri={mlflow_server}"])
    results = run_workflow(workflow, progress=False)
    return workflow, {r.name: r for r in results}, mlflow_server


def test_token_dataset_rows_and_ranges(demo_run):
    _, results, _ = demo_run
    tokens_dir = results["tokenize"].output / "tokens"
    manifest = results["tokenize"].summary
    synth_counts = results["synth"].summary["counts"]
    total = sum(v for k, v in synth_counts.items() if k in ("train", "val"))
    assert total == 40
    table = pq.ParquetDataset(str(tokens_dir)).read()
    assert table.num_rows == total == sum(manifest["counts"].values())
    assert ray.data.read_parquet(str(tokens_dir)).count() == total
    vocab = manifest["vocab_size"]
    columns = table.to_pydict()
    assert len(set(columns["key"])) == total
    for column, size in (("image_tokens", 256), ("audio_tokens", 256), ("text_tokens", 256),
                         ("joint_tokens", 256)):
        flat = np.concatenate([np.asarray(v) for v in columns[column]])
        assert flat.min() >= 0 and flat.max() < size, column
    assert all(len(v) == 8 for v in columns["joint_tokens"])  # 8 fusion queries by default
    stream = np.concatenate([np.asarray(v) for v in columns["interleaved_tokens"]])
    assert stream.min() >= 0 and stream.max() < vocab
    assert all(g == [8, 8] for g in columns["image_grid"])


def test_mlflow_parent_and_stage_runs(demo_run):
    workflow, results, uri = demo_run
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(workflow.name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    stages = {r.data.tags["stage"]: r for r in runs
              if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(stages) == {"synth", "preprocess", "train", "tokenize", "evaluate"}
    for name, run in stages.items():
        assert run.data.tags["fingerprint"] == results[name].fingerprint
        assert run.info.status == "FINISHED"
    train_history = client.get_metric_history(stages["train"].info.run_id, "loss/total")
    assert [m.step for m in train_history] == [2, 4]
    assert stages["train"].data.params["steps"] == "4"
    evaluate = stages["evaluate"].data.metrics
    for key in ("image/psnr", "image/ssim", "audio/si_snr", "text/token_accuracy",
                "image/codebook_usage", "cross/nmi_image_text",
                "cross/retrieval_image_to_text_r1", "joint/codebook_usage",
                "text/codebook_perplexity"):
        assert f"trained/{key}" in evaluate and f"untrained/{key}" in evaluate
    artifacts = {a.path for a in client.list_artifacts(stages["evaluate"].info.run_id)}
    assert {"reconstructions.png", "metrics.json", "audio"} <= artifacts
    assert stages["preprocess"].data.metrics["samples/quarantined"] == 0


def test_second_run_reuses_every_stage(demo_run):
    workflow, results, _ = demo_run
    again = {r.name: r for r in run_workflow(workflow, progress=False)}
    assert all(r.reused for r in again.values())
    assert {n: r.output for n, r in again.items()} == {n: r.output for n, r in results.items()}


def test_single_stage_command_on_committed_inputs(demo_run, tmp_path, capsys):
    from pipeline.cli import main

    _, results, _ = demo_run
    args = ["stage", "evaluate", "--data-root", str(tmp_path), "grid_samples=4",
            "--input", f"data={results['preprocess'].output}",
            "--input", f"model={results['train'].output}",
            "--input", f"tokens={results['tokenize'].output}"]
    assert main(args) == 0
    committed = list((tmp_path / "evaluate").iterdir())
    assert len(committed) == 1 and (committed[0] / "metrics.json").is_file()
    assert "image/psnr" in capsys.readouterr().out
    assert main(args) == 0  # the same stage again is reused, not rerun
    assert "reuse" in capsys.readouterr().out
    assert main(["stage", "evaluate", "--data-root", str(tmp_path),
                 "--input", f"data={tmp_path}"]) == 2
    assert "needs --input for ['data', 'model', 'tokens']" in capsys.readouterr().err
