"""The quantizer benchmark runs end to end at its smallest size and writes both rows."""

import json

import pytest

from pipeline.bench import quantizers as bench


@pytest.mark.benchmark
def test_small_benchmark_writes_ours_and_the_baseline(tmp_path, capsys):
    pytest.importorskip("vector_quantize_pytorch")
    out = tmp_path / "results.json"
    bench.main(["--small", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["meta"]["vector-quantize-pytorch"]
    for k, d, cosine in bench.SMALL_CASES:
        rows = {r["impl"]: r for r in result["rows"]
                if (r["codebook_size"], r["dim"], r["cosine"]) == (k, d, cosine)}
        assert set(rows) == {"mmvq", bench.BASELINE}
        assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows.values())
    memory = {r["impl"]: r for r in result["memory_check"]}
    assert memory["mmvq"]["codebook_size"] == 4096 and memory["mmvq"]["status"] == "ok"
    assert "| 64 | 8 | L2 |" in capsys.readouterr().out


@pytest.mark.benchmark
def test_without_the_baseline_it_says_so_and_times_ours(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "baseline_version", lambda: None)
    result = bench.main(["--small"])
    statuses = {r["impl"]: r["status"] for r in result["rows"]}
    assert statuses == {"mmvq": "ok", bench.BASELINE: "not installed"}
    assert "vector-quantize-pytorch is not installed" in capsys.readouterr().err
