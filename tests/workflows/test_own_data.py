"""The documented route for users' own data, end to end, on a real-world corpus.

`mmvq run workflows/own-data.yaml ingest.source=FOLDER` (ingest -> preprocess -> train ->
tokenize -> evaluate -> register) on photos, stereo OGG/FLAC/WAV and unicode captions with the
folder edge cases; then the same ingest -> preprocess -> tokenize route, stage by stage with the
trained model, for a CSV manifest, webdataset.ShardWriter shards and img2dataset shards, and
preprocess straight on shards no ingest wrote. Every input sample must be a token row or a
quarantine entry naming its original file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from workflows.accounting import chain_counts, rejected_samples
from workflows.cli import main
from workflows.plan import load_workflow, plan_workflow
from workflows.run import run_single_stage, run_workflow

sys.path.insert(0, str(Path(__file__).parent))
import realcorpus

TINY = ["train.steps=2", "train.batch_size=2", "train.max_failures=0", "train.log_every=1",
        "train.val_every=0", "train.checkpoint_every=0", "tokenize.batch_size=8",
        "evaluate.batch_size=8"]


def _token_keys(tokenize_output: Path) -> set[str]:
    return set(pq.ParquetDataset(str(tokenize_output / "tokens")).read(
        columns=["key"]).column("key").to_pylist())


def _account(expected: list[realcorpus.Expected], keys: set[str], rejected: list[dict]) -> None:
    """Each expected sample is a token row (by key) or exactly one quarantine row (by origin);
    nothing else is in either."""
    wanted = {e.key for e in expected if e.key is not None}
    assert keys == wanted
    bad = [e for e in expected if e.key is None]
    assert len(rejected) == len(bad), [r["origin"] for r in rejected]
    for sample in bad:
        hits = [r for r in rejected if sample.origin in (r["origin"] or "")]
        assert len(hits) == 1, (sample.origin, [r["origin"] for r in rejected])
        assert hits[0]["reason"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, mlflow_server, ray_local, inception_weights, lpips_weights):
    root = tmp_path_factory.mktemp("own")
    expected = realcorpus.folder_corpus(root / "photos")
    overrides = [f"ingest.source={root / 'photos'}", f"data_root={root / 'runs'}",
                 f"tracking_uri={mlflow_server}", *TINY,
                 f"evaluate.inception_weights={inception_weights}",
                 f"evaluate.lpips_weights={lpips_weights}"]
    workflow = load_workflow("workflows/own-data.yaml", overrides)
    results = {r.name: r for r in run_workflow(workflow, progress=False)}
    return root, overrides, expected, results


def test_folder_route_accounts_for_every_sample(folder_run):
    _, _, expected, results = folder_run
    assert set(results) == {"ingest", "preprocess", "train", "tokenize", "evaluate", "register"}
    plan = plan_workflow(load_workflow("workflows/own-data.yaml", folder_run[1]))
    rejected = rejected_samples(plan).to_pylist()
    _account(expected, _token_keys(results["tokenize"].output), rejected)
    by_stage = {r["origin"].rsplit("/", 1)[-1]: r["stage"] for r in rejected}
    assert by_stage["broken.png"] == "preprocess"  # the user's file, not our shard
    assert by_stage["silent"] == "preprocess"
    assert any(r["stage"] == "ingest" and "twin" in r["origin"] for r in rejected)
    chain = {line.entry: line for line in chain_counts(plan)}
    assert chain["ingest"].taken == len(expected)
    assert chain["preprocess"].taken == chain["ingest"].out
    assert chain["tokenize"].out == chain["preprocess"].out == len(
        [e for e in expected if e.key])
    assert all(line.consistent for line in chain.values())


# The scores people compare tokenizers by, each in evaluate's metrics, its report (with its
# definition in the protocol section) and the registered version's tags.
STANDARD_SCORES = ("image/rfid", "image/lpips", "image/psnr", "image/ssim", "audio/pesq",
                   "audio/stoi", "audio/si_snr", "audio/mel_distance")


def test_standard_scores_reach_metrics_report_and_registry(folder_run):
    from pipeline.formats.registry import previous_version

    _, overrides, _, results = folder_run
    summary = results["evaluate"].summary
    for model in ("trained", "untrained"):
        missing = [k for k in STANDARD_SCORES if k not in summary[model]]
        assert not missing, (model, missing)
    assert summary["trained"]["image/rfid"] > 0 and summary["trained"]["image/lpips"] > 0
    html = (results["evaluate"].output / "report.html").read_text(encoding="utf-8")
    protocol = html[html.index("Protocol"):]
    for key in STANDARD_SCORES:
        assert key in html, key
    assert "Fréchet Inception distance" in protocol and "LPIPS distance" in protocol
    uri = next(o.split("=", 1)[1] for o in overrides if o.startswith("tracking_uri="))
    name = load_workflow("workflows/own-data.yaml", overrides).stages["register"].config["name"]
    tags = previous_version(uri, name)["metrics"]
    assert tags["image/rfid"] == pytest.approx(summary["trained"]["image/rfid"])


def test_quarantine_command_names_original_files(folder_run, capsys, tmp_path):
    root, overrides, expected, _ = folder_run
    code = main(["quarantine", "workflows/own-data.yaml", *overrides,
                 "--csv", str(tmp_path / "q.csv")])
    out = capsys.readouterr().out
    assert code == 0
    assert f"ingest       in {len(expected)} = out" in out
    assert str(root / "photos" / "broken.png") in out
    assert "3 quarantined samples:" in out
    assert (tmp_path / "q.csv").read_text(encoding="utf-8").count("\n") == 4  # header + 3


@pytest.mark.parametrize("layout", ["csv", "shardwriter", "img2dataset"])
def test_other_layouts_through_ingest(folder_run, tmp_path, layout):
    model = folder_run[3]["train"].output
    build = {"csv": realcorpus.csv_corpus, "shardwriter": realcorpus.shardwriter_corpus,
             "img2dataset": realcorpus.img2dataset_corpus}[layout]
    expected = build(tmp_path / "src")
    source = tmp_path / "src" / "index.csv" if layout == "csv" else tmp_path / "src"
    runs = tmp_path / "runs"
    ingest = run_single_stage("ingest", {"source": str(source)}, {}, data_root=runs,
                              progress=False)
    pre = run_single_stage("preprocess", {"required": ["image", "text"]},
                           {"shards": str(ingest.output)}, data_root=runs, progress=False)
    tokens = run_single_stage("tokenize", {"batch_size": 8},
                              {"data": str(pre.output), "model": str(model)}, data_root=runs,
                              progress=False)
    rejected = [row for stage in (ingest, pre)
                for row in pq.read_table(stage.output / "quarantine.parquet").to_pylist()]
    _account(expected, _token_keys(tokens.output), rejected)
    counts = pre.summary["counts"]
    assert counts["in"] == ingest.summary["counts"]["out"]
    assert sum(tokens.summary["counts"].values()) == counts["out"]


def test_preprocess_reads_shards_no_ingest_wrote(folder_run, tmp_path):
    expected = realcorpus.shardwriter_corpus(tmp_path / "wds")
    runs = tmp_path / "runs"
    first = run_single_stage("preprocess", {"required": ["image", "text"]},
                             {"shards": str(tmp_path / "wds")}, data_root=runs, progress=False)
    again = run_single_stage("preprocess", {"required": ["image", "text"]},
                             {"shards": str(tmp_path / "wds")}, data_root=runs, progress=False)
    assert again.reused and again.output == first.output  # the shard listing fingerprints it
    rejected = pq.read_table(first.output / "quarantine.parquet").to_pylist()
    assert [r["key"] for r in rejected] == ["sw-bad"]
    assert rejected[0]["origin"].endswith("part-0002.tar#sw-bad")
    assert first.summary["counts"]["out"] == len([e for e in expected if e.key])
