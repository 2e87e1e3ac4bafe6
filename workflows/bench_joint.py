"""The fused demo model trained without Ray, per setting and seed: joint tokens, alignment and
reconstruction on val, for sweeping fusion's settings in minutes.

    python -m workflows.bench_joint --data runs/bench/fusion/preprocess/<fingerprint>
        [--seeds 2 0 1] [--steps 300] [--variant "train.model.fusion.diversity_temperature=0.1"]
        [--variant "train.model.fusion.enabled=false"]

Each run trains the demo's model (``workflows/demo.yaml``'s train config with
``train.model.fusion.enabled=true``, the seed and the variant's overrides) in this process on the
preprocessed train split, with the train stage's optimizer, schedule and step function on whole
global batches (:func:`workflows.bench_train.train_in_process`, bench-train's plain loop). It then
scores the val split:

- the joint tokens: codebook usage (the acceptance asks >= 0.8 with the default config),
  perplexity and ``fusion/recon`` (1 - R^2 of predicting each modality from the joint tokens;
  lower means the joint tokens carry more);
- alignment: R@5 of image->text, audio->text and image->audio retrieval through the probe fitted
  on the frozen train tokens (:mod:`pipeline.probe_retrieval`, the same for every model, so it
  compares fused with separate) and through fusion's own embedding heads, and the cross-modal
  NMI of the tokens;
- reconstruction: image PSNR and mel distance (:class:`mmvq.scoring.ReconstructionScores`).

The default configuration is always a variant, so every setting is compared with it in the same
run on the same seeds; ``train.model.fusion.enabled=false`` is the separate tokenizers' variant
(no joint tokens or heads). A run takes about three minutes on 2 cores (no Ray start-up, no
discriminator steps); ``make bench-fusion`` runs the whole workflow for the numbers that count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.bench import run_meta

WORKFLOW = "workflows/demo.yaml"
DEFAULT_VARIANT = ""  # no overrides: the configuration a user gets
SEPARATE_VARIANT = "train.model.fusion.enabled=false"  # the same model without fusion
CROSS_PAIRS = (("image", "audio"), ("image", "text"), ("audio", "text"))
RETRIEVAL = ("image_to_text", "audio_to_text", "image_to_audio")
# Result key -> table column. Retrieval is R@5 on val: the probe fitted on frozen train tokens
# (pipeline.probe_retrieval, the same for every model) and fusion's own embedding heads.
SCORES = {"usage": "joint usage", "perplexity": "joint perplexity",
          "fusion_recon": "fusion/recon",
          **{f"probe_{p}": f"probe {p.replace('_to_', '→')} R@5" for p in RETRIEVAL},
          **{f"heads_{p}": f"heads {p.replace('_to_', '→')} R@5" for p in RETRIEVAL},
          **{f"nmi_{a}_{b}": f"NMI {a}/{b}" for a, b in CROSS_PAIRS},
          "image_psnr": "image PSNR", "mel_distance": "mel distance"}


@dataclass(frozen=True)
class JointBenchSettings:
    data: str  # a preprocess stage's output folder
    seeds: tuple[int, ...] = (2, 0, 1)
    steps: int | None = None  # None: the demo's train.steps
    variants: tuple[str, ...] = ()  # each: space-separated overrides, beside the default


def train_and_score(data: Path, overrides: list[str], seed: int,
                    steps: int | None = None) -> dict[str, Any]:
    """Train the fused demo model under ``overrides`` with ``seed``; its scores on val."""
    import numpy as np
    import torch

    from mmvq.batch import to_model_inputs
    from mmvq.columns import MODEL_COLUMNS
    from mmvq.scoring import ReconstructionScores
    from pipeline.formats.preprocessed import read_split
    from pipeline.probe_retrieval import score_model
    from workflows.bench_train import train_in_process

    extra = [f"train.steps={steps}"] if steps else []
    started = time.perf_counter()
    config, parts = train_in_process(data, ["train.model.fusion.enabled=true",
                                            f"train.seed={seed}", *extra, *overrides])
    seconds = time.perf_counter() - started
    model = parts.model.eval()
    fused = model.fusion is not None
    val = read_split(data / "val", MODEL_COLUMNS)
    scores = ReconstructionScores(model.codebook_sizes(), config.model.audio.sample_rate)
    joint, recon = [], []
    with torch.no_grad():
        for begin in range(0, len(val["has_image"]), 64):
            inputs = to_model_inputs({k: v[begin:begin + 64] for k, v in val.items()})
            codes = model.encode(inputs)
            # No embeddings: the heads' retrieval is score_model's below, scored once.
            scores.add(inputs, model.decode(codes), codes, {})
            if fused:
                joint.append(codes["joint"])
                recon.append(float(model(inputs).losses["fusion/recon"]))
    summary = scores.summary()
    retrieval = score_model(model, data / "train", data / "val")
    result = {"seed": seed, "train_s": seconds,
              "image_psnr": summary["image/psnr"], "mel_distance": summary["audio/mel_distance"],
              **{f"nmi_{a}_{b}": summary[f"cross/nmi_{a}_{b}"] for a, b in CROSS_PAIRS},
              **{f"probe_{pair}": retrieval["probe"][f"{pair}/r5"] for pair in RETRIEVAL},
              **{f"heads_{pair}": retrieval["heads"][f"{pair}/r5"] if fused else None
                 for pair in RETRIEVAL},
              "chance_r5": retrieval["chance"]["r5"],
              "usage": None, "perplexity": None, "codes_per_query": None, "fusion_recon": None}
    if fused:
        codes = torch.cat(joint)  # (N, num_queries)
        result |= {"usage": summary["joint/codebook_usage"],
                   "perplexity": summary["joint/codebook_perplexity"],
                   "codes_per_query": [int(codes[:, q].unique().numel())
                                       for q in range(codes.shape[1])],
                   "fusion_recon": float(np.mean(recon))}
    return result


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """Per variant, the median over seeds of every score (None where the variant has none:
    a variant without fusion has no joint tokens)."""
    def median(results: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in results if r[key] is not None]
        return statistics.median(values) if values else None

    return {variant: {key: median(results, key) for key in SCORES}
            for variant, results in runs.items()}


def format_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """One row per variant and seed, then one per variant of medians over seeds."""
    header = ["variant", "seed", *SCORES.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]

    def row(variant: str, seed: str, values: dict[str, Any]) -> str:
        cells = ["-" if values[k] is None else f"{values[k]:.3f}" for k in SCORES]
        return f"| {variant or 'default'} | {seed} | " + " | ".join(cells) + " |"

    for variant, results in runs.items():
        lines += [row(variant, str(r["seed"]), r) for r in results]
    lines += [row(variant, "median", medians) for variant, medians in summarize(runs).items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m workflows.bench_joint",
        description="The fused demo model trained in one process (no Ray) per setting and seed; "
                    "on val its joint tokens' usage and fusion/recon, probe and head retrieval "
                    "R@5, cross-modal NMI, PSNR and mel distance, beside the default "
                    "configuration's.")
    parser.add_argument("--data", type=Path, required=True,
                        help="a preprocess stage's output folder (with train/ and val/), e.g. "
                             "runs/bench/fusion/preprocess/<fingerprint> after make bench-fusion")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2, 0, 1],
                        help="train.seed of each run (default %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default: the demo's train.steps)")
    parser.add_argument("--variant", action="append", default=[],
                        help="space-separated STAGE.KEY=VALUE overrides compared with the "
                             "default; repeat for more variants; "
                             f"{SEPARATE_VARIANT!r} is the separate tokenizers")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/joint.json"),
                        help="JSON result (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    for split in ("train", "val"):
        if not (args.data / split).is_dir():
            sys.exit(f"{args.data}: no {split}/ folder; pass a preprocess stage's output folder")
    runs: dict[str, list[dict[str, Any]]] = {}
    for variant in [DEFAULT_VARIANT, *args.variant]:
        for seed in args.seeds:
            result = train_and_score(args.data, variant.split(), seed, args.steps)
            print(f"[joint] {variant or 'default'} seed {seed}: "
                  f"probe image->text R@5 {result['probe_image_to_text']:.3f}, "
                  f"audio->text {result['probe_audio_to_text']:.3f}, "
                  f"PSNR {result['image_psnr']:.2f}, joint usage {result['usage']} "
                  f"(trained in {result['train_s']:.0f} s)", flush=True)
            runs.setdefault(variant, []).append(result)
    settings = JointBenchSettings(data=str(args.data), seeds=tuple(args.seeds),
                                  steps=args.steps, variants=tuple(args.variant))
    result = {"meta": run_meta("workflows.bench_joint", settings, argv), "runs": runs,
              "median": summarize(runs)}
    print(format_table(runs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
