"""End to end: the demo workflow at tiny size against a real MLflow server and in-process Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray.data
from mlflow.tracking import MlflowClient

from pipeline.stage import is_locked, read_record
from workflows.plan import load_workflow
from workflows.run import run_workflow

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


def test_token_dataset_agrees_with_manifest_and_lineage(demo_run):
    from pipeline.formats.tokens import check_token_dataset, read_manifest

    _, results, uri = demo_run
    out = results["tokenize"].output
    manifest = read_manifest(out)
    assert check_token_dataset(out) == manifest["counts"]  # counts, ranges, interleaved runs
    assert sum(manifest["source_shard_counts"].values()) == manifest["total"] == 40
    layout = manifest["vocabulary"]
    assert layout["special_tokens"]["<boi>"] == sum(layout["codebook_sizes"].values())
    run = MlflowClient(uri).get_run(results["tokenize"].run_id)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert {"tokens-train", "tokens-val", "preprocessed-train", "preprocessed-val"} <= set(inputs)
    assert json.loads(inputs["tokens-val"].dataset.source)["uri"] == str(out / "tokens" / "val")
    assert {t.key: t.value for t in inputs["tokens-val"].tags}["tokenizer"] == \
        manifest["tokenizer"]["id"] == run.data.tags["tokenizer"]


def test_decoding_the_token_dataset_reproduces_evaluate_numbers(demo_run):
    from mmvq import MultimodalTokenizer, to_model_inputs
    from mmvq import metrics as M
    from pipeline.formats.tokens import model_codes, read_manifest, read_token_dataset

    _, results, _ = demo_run
    model = MultimodalTokenizer.load(results["train"].output / "tokenizer")
    tokens = read_token_dataset(results["tokenize"].output, "val").sort_by("key").to_pydict()
    rows = ray.data.read_parquet(str(results["preprocess"].output / "val"))
    batch = next(iter(rows.sort("key").iter_batches(batch_size=1000, batch_format="numpy")))
    assert list(batch["key"]) == tokens["key"]
    inputs = to_model_inputs(batch)
    layout = read_manifest(results["tokenize"].output)["vocabulary"]
    codes = model_codes(tokens, model.token_shapes(), layout)
    assert "text" not in codes  # text tokens are the captions' byte ids: exact by construction
    assert [bytes(ids).decode() for ids in tokens["text_tokens"]] == list(batch["text"])
    codes["text"] = model.encode(inputs)["text"]  # evaluate scores the text codec on its own
    out = model.decode(codes)
    again = {"image/psnr": M.psnr(inputs.image, out["image"]),
             "image/ssim": M.ssim(inputs.image, out["image"]),
             "audio/si_snr": M.si_snr(inputs.audio, out["audio"], inputs.audio_len),
             "text/token_accuracy": M.token_accuracy(inputs.text_ids, out["text_ids"],
                                                     inputs.text_len)}
    measured = json.loads((results["evaluate"].output / "metrics.json").read_text())["trained"]
    for key, values in again.items():
        assert float(values.double().mean()) == pytest.approx(measured[key], rel=1e-5), key


def test_report_and_registered_model(demo_run):
    import re

    from pipeline.formats.tokens import read_manifest

    _, results, uri = demo_run
    out = results["evaluate"].output
    page = (out / "report.html").read_text()
    links = re.findall(r'src="([^"]+)"', page)
    assert "reconstructions.png" in links and all((out / link).is_file() for link in links)
    assert "<td>image/psnr</td>" in page
    # Fusion is on and nothing separate is registered: the report says how to get a comparison.
    comparison = json.loads((out / "fused_vs_separate.json").read_text())
    assert comparison["separate"] is None and "fusion.enabled=false" in comparison["note"]
    assert comparison["fused"]["probe"] is None  # fitted only to compare two models
    assert 0.0 <= comparison["fused"]["heads"]["image_to_text/r5"] <= 1.0
    assert 'id="fused-vs-separate"' in page and "fusion.enabled=false" in page
    client = MlflowClient(uri)
    artifacts = {a.path for a in client.list_artifacts(results["evaluate"].run_id)}
    assert {"report.html", "codebook_usage.png", "spectrograms.png"} <= artifacts
    record = results["register"].summary
    version = client.get_model_version(record["name"], str(record["version"]))
    assert version.tags["tokenizer_id"] == \
        read_manifest(results["tokenize"].output)["tokenizer"]["id"]
    assert float(version.tags["eval/image/psnr"]) == pytest.approx(
        results["evaluate"].summary["trained"]["image/psnr"], rel=1e-5)


def test_mlflow_parent_and_stage_runs(demo_run):
    workflow, results, uri = demo_run
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(workflow.name)
    runs = client.search_runs([experiment.experiment_id])
    # Other tests rerun this workflow (each invocation is a parent run); take the first one's.
    parent_id = client.get_run(results["synth"].run_id).data.tags["mlflow.parentRunId"]
    parent = client.get_run(parent_id)
    assert "mlflow.parentRunId" not in parent.data.tags and parent.info.status == "FINISHED"
    stages = {r.data.tags["stage"]: r for r in runs
              if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert set(stages) == {"synth", "preprocess", "train", "tokenize", "evaluate", "register"}
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
    from workflows.cli import main

    _, results, _ = demo_run
    args = ["stage", "evaluate", "--data-root", str(tmp_path), "grid_samples=4",
            "--input", f"data={results['preprocess'].output}",
            "--input", f"model={results['train'].output}",
            "--input", f"tokens={results['tokenize'].output}"]
    assert main(args) == 0
    committed = [p for p in (tmp_path / "evaluate").iterdir() if p.is_dir()]  # not {fp}.lock
    assert len(committed) == 1 and (committed[0] / "metrics.json").is_file()
    assert "image/psnr" in capsys.readouterr().out
    assert main(args) == 0  # the same stage again is reused, not rerun
    assert "reuse" in capsys.readouterr().out
    assert main(["stage", "evaluate", "--data-root", str(tmp_path),
                 "--input", f"data={tmp_path}"]) == 2
    assert "needs --input for ['data', 'model', 'tokens']" in capsys.readouterr().err


# --- plans, reruns, status and kills, all on the one tiny demo run above -------------------

def test_dry_run_plans_reuse_with_mlflow_run_ids(demo_run, capsys):
    from workflows.cli import main

    workflow, results, uri = demo_run
    overrides = TINY + [f"data_root={workflow.data_root}", f"tracking_uri={uri}"]
    assert main(["run", "workflows/demo.yaml", "--dry-run", *overrides]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for name, result in results.items():
        assert f"reuse: committed output {result.output} (MLflow run {result.run_id})" \
            in lines[name], lines[name]


def test_plan_after_one_train_setting_changes(demo_run):
    from workflows.plan import plan_workflow

    workflow, results, uri = demo_run
    changed = load_workflow("workflows/demo.yaml", TINY + [
        f"data_root={workflow.data_root}", f"tracking_uri={uri}", "train.lr=0.001"])
    plan = {p.name: p for p in plan_workflow(changed)}
    assert {n: p.action for n, p in plan.items()} == {
        "synth": "reuse", "preprocess": "reuse", "train": "run", "tokenize": "run",
        "evaluate": "run", "register": "run"}
    assert plan["train"].reason == "config changed (train.lr 0.002\u21920.001)"
    assert plan["tokenize"].reason == "upstream train reruns"
    assert plan["evaluate"].reason == "upstream train, tokenize rerun"
    assert plan["train"].previous == results["train"].output


def test_status_table_done_then_stale(demo_run, capsys):
    from workflows.cli import main

    workflow, results, uri = demo_run
    args = ["status", "workflows/demo.yaml", *TINY, f"data_root={workflow.data_root}",
            f"tracking_uri={uri}"]
    assert main(args) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    for name, result in results.items():
        assert rows[name] == [name, "done", result.fingerprint, result.run_id,
                              str(result.output)]
    assert main(args + ["train.lr=0.001"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:8]}
    assert [rows[n][1] for n in results] == ["done", "done", "stale", "stale", "stale", "stale"]
    assert rows["train"][4] == str(results["train"].output)  # the newest, now outdated, one
    assert "train: stale, reruns because config changed (train.lr 0.002\u21920.001)" in out


def test_changed_train_setting_reruns_train_tokenize_evaluate(demo_run):
    workflow, results, uri = demo_run
    changed = load_workflow("workflows/demo.yaml", TINY + [
        f"data_root={workflow.data_root}", f"tracking_uri={uri}", "train.lr=0.001"])
    again = {r.name: r for r in run_workflow(changed, progress=False)}
    assert {n: r.reused for n, r in again.items()} == {
        "synth": True, "preprocess": True, "train": False, "tokenize": False,
        "evaluate": False, "register": False}
    for name in ("synth", "preprocess"):
        assert again[name].output == results[name].output
    for name in ("train", "tokenize", "evaluate"):
        assert again[name].fingerprint != results[name].fingerprint
        assert results[name].output.is_dir()  # the earlier config's outputs stay committed


def test_only_evaluate_reruns_just_that_stage(demo_run):
    from workflows.plan import PlanError, plan_workflow

    workflow, results, uri = demo_run
    before = (results["evaluate"].output / "stage.json").read_text()
    again = {r.name: r for r in run_workflow(workflow, only=["evaluate"], progress=False)}
    assert {n: r.reused for n, r in again.items()} == {
        "synth": True, "preprocess": True, "train": True, "tokenize": True,
        "evaluate": False, "register": True}
    assert again["evaluate"].output == results["evaluate"].output
    after = json.loads((again["evaluate"].output / "stage.json").read_text())
    assert after["mlflow_run_id"] == again["evaluate"].run_id != json.loads(before)[
        "mlflow_run_id"]
    assert after["summary"]["trained"] == pytest.approx(results["evaluate"].summary["trained"])
    # A train setting nobody ran: evaluate would read a train output that does not exist.
    unrun = load_workflow("workflows/demo.yaml", TINY + [
        f"data_root={workflow.data_root}", f"tracking_uri={uri}", "train.lr=0.0005"])
    with pytest.raises(PlanError, match=r"--only evaluate: evaluate reads the output of train, "
                       r"which has no committed output for fingerprint"):
        plan_workflow(unrun, only=["evaluate"])


def test_killed_run_leaves_nothing_complete_and_rerun_matches(demo_run, tmp_path):
    """SIGKILL the whole `mmvq run` process group during tokenize; the rerun cleans up and
    writes exactly the tokens of the uninterrupted run."""
    import ray

    _, results, uri = demo_run
    root = tmp_path / "killed"
    for name in ("synth", "preprocess", "train"):  # committed upstream: the run gets to tokenize
        shutil.copytree(results[name].output, root / name / results[name].fingerprint)
    overrides = TINY + [f"data_root={root}", f"tracking_uri={uri}"]
    # The killed driver joins the test's Ray cluster, as a job does on a real cluster.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "run", "workflows/demo.yaml",
                             "--no-progress", *overrides], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    tokenize_dir = root / "tokenize"
    deadline = time.time() + 240
    while not (tokenize_dir.is_dir() and any(p.name.startswith(".tmp-")
                                             for p in tokenize_dir.iterdir())):
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        assert time.time() < deadline, "tokenize never started"
        time.sleep(0.2)
    time.sleep(1.0)  # into the stage's work, not just its first mkdir
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    fp = results["tokenize"].fingerprint
    assert read_record(tokenize_dir / fp) is None and not (tokenize_dir / fp).exists()
    assert any(p.name.startswith(".tmp-") for p in tokenize_dir.iterdir())  # the remains
    assert not is_locked(root, "tokenize", fp)  # the kernel dropped the dead run's lock

    rerun = {r.name: r for r in run_workflow(load_workflow("workflows/demo.yaml", overrides),
                                             progress=False)}
    assert {n: r.reused for n, r in rerun.items()} == {
        "synth": True, "preprocess": True, "train": True, "tokenize": False,
        "evaluate": False, "register": False}
    assert sorted(p.name for p in tokenize_dir.iterdir()) == [fp, f"{fp}.lock"]
    assert _tokens(rerun["tokenize"].output).equals(_tokens(results["tokenize"].output))
    assert rerun["tokenize"].summary == results["tokenize"].summary
    assert rerun["evaluate"].summary["trained"] == pytest.approx(
        results["evaluate"].summary["trained"])


def _tokens(output):
    """The token dataset as one table sorted by key (file and row order are Ray's choice)."""
    table = pq.ParquetDataset(str(output / "tokens")).read()
    return table.sort_by("key").select(sorted(table.column_names))
