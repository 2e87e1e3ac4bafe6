"""The GPU benchmark runs end to end at its small size on the CPU and writes every row."""

import json

import pytest

from pipeline.bench import gpu


@pytest.mark.benchmark
def test_small_cpu_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    gpu.main(["--device", "cpu", "--small", "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    variants = ("fp32-eager", "bf16-eager")
    assert result["meta"]["settings"]["variants"] == list(variants)
    assert result["meta"]["image_params"] > 0
    assert result["ceiling"]["flops"] > 0
    rows = result["rows"]
    expected = ({("quantizer", v, 1024, d) for v in variants for d in (8, 256)}
                | {("train", v, 4, 32) for v in variants}
                | {("encode", v, b, 32) for v in variants for b in (8, 16)})
    assert {(r["section"], r["variant"], r["batch"], r["dim"]) for r in rows} == expected
    assert len(rows) == len(expected)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["median_s"] > 0 and r["first_s"] > 0 and r["mtok_per_s"] > 0
        assert r["peak_bytes"] > 0
    for r in rows:
        if r["section"] == "quantizer":
            assert r["img_per_s"] is None
            assert r["index_agreement"] == 1.0  # no TF32 on a CPU: the same search
        else:
            # Counted FLOPs: a train step of the small VQGAN with LPIPS and the PatchGAN costs
            # far more than encoding (2.8 vs 0.03 GFLOP per image).
            assert r["img_per_s"] > 0 and r["flop_per_call"] > 0 and 0 < r["mfu"]
    per_image = {r["section"]: r["flop_per_call"] / r["batch"] for r in rows
                 if r["section"] != "quantizer"}
    assert per_image["train"] > 20 * per_image["encode"]
    table = capsys.readouterr().out
    assert "| train | bf16-eager | 4 | 32 |" in table and "vs fp32-eager" in table


@pytest.mark.benchmark
def test_time_budget_skips_rows_but_keeps_them(tmp_path):
    out = tmp_path / "gpu.json"
    result = gpu.main(["--device", "cpu", "--small", "--threads", "1", "--budget-s", "0",
                       "--sections", "quantizer,encode", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))  # tuples -> lists
    assert {r["section"] for r in result["rows"]} == {"quantizer", "encode"}
    assert all(r["status"] == "skipped: time budget" for r in result["rows"])
    assert result["ceiling"] is None


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit, match="unknown"):
        gpu.main(["--device", "cpu", "--small", "--variants", "fp32-eager,turbo"])


@pytest.mark.benchmark
def test_fast_quantizer_rows_include_the_search_block_sweep(tmp_path):
    # The fast variant's quantizer needs no compiler, so this part runs on the CPU too.
    result = gpu.main(["--device", "cpu", "--small", "--threads", "1", "--sections",
                       "quantizer", "--variants", "fp32-eager,fast"])
    rows = {(r["variant"], r["dim"]): r for r in result["rows"]}
    assert set(rows) == {(v, d) for v in ("fp32-eager", "fast", "fast/block=2^8")
                         for d in (8, 256)}
    assert all(r["status"] == "ok" and r["mtok_per_s"] > 0 for r in rows.values())
    assert all(r["index_agreement"] == 1.0 for r in rows.values())


def test_the_benchmark_imports_only_what_the_device_image_has():
    """gpu_check.sh runs on a machine with torch, torchvision, torchaudio, einops, safetensors
    and numpy only: the benchmark builds through the train worker's code, which must not pull
    MLflow, Ray, pyarrow, pandas or PyYAML in with it."""
    import subprocess
    import sys

    code = ("import sys, pipeline.bench.gpu; print(sorted({m.split('.')[0] for m in sys.modules} "
            "& {'mlflow', 'ray', 'pyarrow', 'pandas', 'yaml', 'webdataset', 'soundfile'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
