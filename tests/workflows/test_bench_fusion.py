"""The fusion benchmark's own logic: caption duplicates, medians over seeds, the acceptance."""

import numpy as np
import pytest

from pipeline.probe_retrieval import caption_groups
from workflows.bench_fusion import _median_tree, acceptance


def test_identical_captions_share_a_group_whatever_their_padding():
    ids = np.array([[5, 6, 7, 0], [5, 6, 7, 9], [5, 6, 0, 0], [5, 6, 7, 1]])
    lens = np.array([3, 3, 2, 4])
    groups = caption_groups(ids, lens)
    assert groups[0] == groups[1]  # the same 3 ids, whatever follows them
    assert len({groups[0], groups[2], groups[3]}) == 3


def _scores(r5: float, nmi: float, psnr: float, mel: float, usage: float | None) -> dict:
    return {"chance": {"r5": 0.01}, "probe": {"image_to_text/r5": r5, "audio_to_text/r5": r5},
            "heads": {"image_to_text/r5": r5, "audio_to_text/r5": r5} if usage else None,
            "nmi": {"image_text": nmi}, "joint_usage": usage,
            "reconstruction": {"image/psnr": psnr, "audio/mel_distance": mel}}


def test_acceptance_compares_the_same_probe_on_both_and_the_costs():
    separate = _scores(0.04, 0.30, 20.0, 0.080, None)
    good = acceptance({"separate": separate, "fused": _scores(0.12, 0.40, 19.8, 0.083, 0.9)})
    assert all(good.values()), good
    bad = acceptance({"separate": separate, "fused": _scores(0.07, 0.20, 19.5, 0.090, 0.5)})
    assert not any(bad.values()), bad


def test_median_over_seeds_of_every_numeric_leaf():
    runs = [{"a": 1.0, "b": {"c": 3}, "d": None, "e": "x"}, {"a": 3.0, "b": {"c": 5}, "d": None,
                                                          "e": "y"},
            {"a": 2.0, "b": {"c": 4}, "d": None, "e": "z"}]
    assert _median_tree(runs) == {"a": 2.0, "b": {"c": 4}, "d": None}


def test_joint_bench_reports_each_run_and_the_median_per_variant():
    from workflows.bench_joint import SCORES, SEPARATE_VARIANT, format_table, summarize

    def run(seed, usage, probe=0.15):
        scores = dict.fromkeys(SCORES, 0.3) | {"usage": usage, "probe_image_to_text": probe}
        if usage is None:  # without fusion: no joint tokens, no heads
            scores |= {k: None for k in SCORES if k.startswith("heads_")}
            scores |= {"perplexity": None, "fusion_recon": None}
        return scores | {"seed": seed, "codes_per_query": None, "train_s": 100.0}
    runs = {"": [run(2, 0.95), run(0, 0.86), run(1, 0.91)],
            "train.model.fusion.diversity_temperature=0.1": [run(2, 0.50), run(0, 0.67)],
            SEPARATE_VARIANT: [run(2, None, 0.10), run(0, None, 0.12)]}
    median = summarize(runs)
    assert median[""]["usage"] == 0.91
    assert median["train.model.fusion.diversity_temperature=0.1"]["usage"] == pytest.approx(0.585)
    assert median[SEPARATE_VARIANT]["usage"] is None
    assert median[SEPARATE_VARIANT]["probe_image_to_text"] == pytest.approx(0.11)
    table = format_table(runs)
    assert "| default | median | 0.910 |" in table
    assert "| train.model.fusion.diversity_temperature=0.1 | 0 | 0.670 |" in table
    assert f"| {SEPARATE_VARIANT} | median | - | - | - | 0.110 |" in table
