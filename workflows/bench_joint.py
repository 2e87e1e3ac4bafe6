"""Joint codebook usage: the demo's fused model trained without Ray, per setting and seed.

    python -m workflows.bench_joint --data runs/bench/fusion/preprocess/<fingerprint>
        [--seeds 2 0 1] [--steps 300] [--variant "train.model.fusion.diversity_temperature=0.1"]

Each run trains the demo's model (``workflows/demo.yaml``'s train config with
``train.model.fusion.enabled=true``, the seed and the variant's overrides) in this process on the
preprocessed train split, with the train stage's optimizer, schedule and step function
(:func:`pipeline.train_loop.build_parts`, :func:`mmvq.train_step.generator_step`) on whole
global batches (``num_workers x batch_size``), as bench-train's plain loop does. It then encodes
the val split and reports what the joint tokens of the trained model look like there: codebook
usage (the acceptance asks >= 0.8 with the default config), perplexity, the distinct codes of
each query, and ``fusion/recon`` (1 - R^2 of predicting each modality from the joint tokens;
lower means the joint tokens carry more). The default configuration is always a variant, so
every setting is compared with it in the same run on the same seeds.

A run takes about two minutes on 2 cores, half a fused train stage's time (no Ray start-up and
no discriminator steps), so settings of the joint path can be swept on seeds here; ``make
bench-fusion`` runs the whole workflow for the numbers that count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.bench import run_meta

WORKFLOW = "workflows/demo.yaml"
DEFAULT_VARIANT = ""  # no overrides: the configuration a user gets


@dataclass(frozen=True)
class JointBenchSettings:
    data: str  # a preprocess stage's output folder
    seeds: tuple[int, ...] = (2, 0, 1)
    steps: int | None = None  # None: the demo's train.steps
    variants: tuple[str, ...] = ()  # each: space-separated overrides, beside the default


def train_and_score(data: Path, overrides: list[str], seed: int,
                    steps: int | None = None) -> dict[str, Any]:
    """Train the fused demo model under ``overrides`` with ``seed``; its val joint tokens."""
    import numpy as np
    import torch

    from mmvq import metrics as M
    from mmvq.batch import to_model_inputs
    from mmvq.columns import MODEL_COLUMNS
    from mmvq.train_step import generator_step
    from pipeline.formats.preprocessed import model_config_for_data, read_split
    from pipeline.train_loop import build_parts
    from workflows.plan import load_workflow, plan_workflow

    extra = [f"train.steps={steps}"] if steps else []
    workflow = load_workflow(WORKFLOW, [f"data_root={tempfile.mkdtemp()}",
                                        "train.model.fusion.enabled=true", f"train.seed={seed}",
                                        *extra, *overrides])
    config = next(p.config for p in plan_workflow(workflow) if p.name == "train")
    model_config, vocab = model_config_for_data(config.model, data)
    config = dataclasses.replace(config, model=model_config)
    torch.set_num_threads(config.num_workers * config.threads_per_worker)
    torch.manual_seed(config.seed)
    rows = read_split(data / "train", MODEL_COLUMNS)
    val = read_split(data / "val", MODEL_COLUMNS)
    parts = build_parts(config, torch.device("cpu"), vocab)
    batch = config.num_workers * config.batch_size
    n = len(rows["has_image"])
    step, epoch, started = 0, 0, time.perf_counter()
    while step < config.steps:
        order = np.random.default_rng(config.seed + epoch).permutation(n)
        for begin in range(0, n - batch + 1, batch):
            inputs = to_model_inputs({k: v[order[begin:begin + batch]] for k, v in rows.items()})
            generator_step(parts.model, [inputs], parts.optimizers["generator"],
                           config.grad_clip)
            for scheduler in parts.schedulers.values():
                scheduler.step()
            step += 1
            if step == config.steps:
                break
        epoch += 1
    seconds = time.perf_counter() - started
    model = parts.model.eval()
    joint, recon = [], []
    with torch.no_grad():
        for begin in range(0, len(val["has_image"]), 64):
            inputs = to_model_inputs({k: v[begin:begin + 64] for k, v in val.items()})
            joint.append(model.encode(inputs)["joint"])
            recon.append(float(model(inputs).losses["fusion/recon"]))
    codes = torch.cat(joint)  # (N, num_queries)
    size = config.model.fusion.codebook_size
    return {"seed": seed, "usage": M.codebook_usage(codes, size),
            "perplexity": M.codebook_perplexity(codes, size),
            "codes_per_query": [int(codes[:, q].unique().numel()) for q in range(codes.shape[1])],
            "fusion_recon": float(np.mean(recon)), "train_s": seconds}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per variant, the median over seeds of usage, perplexity and fusion/recon."""
    return {variant: {key: statistics.median(r[key] for r in results)
                      for key in ("usage", "perplexity", "fusion_recon")}
            for variant, results in runs.items()}


def format_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| variant | seed | val joint usage | perplexity | fusion/recon | codes per query |",
             "| --- | --- | --- | --- | --- | --- |"]
    for variant, results in runs.items():
        for r in results:
            lines.append(f"| {variant or 'default'} | {r['seed']} | {r['usage']:.3f} | "
                         f"{r['perplexity']:.1f} | {r['fusion_recon']:.3f} | "
                         f"{r['codes_per_query']} |")
    for variant, median in summarize(runs).items():
        lines.append(f"| {variant or 'default'} | median | {median['usage']:.3f} | "
                     f"{median['perplexity']:.1f} | {median['fusion_recon']:.3f} | |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m workflows.bench_joint",
        description="The fused demo model trained in one process (no Ray) per setting and seed; "
                    "the joint tokens' codebook usage, perplexity and fusion/recon on val, "
                    "beside the default configuration's.")
    parser.add_argument("--data", type=Path, required=True,
                        help="a preprocess stage's output folder (with train/ and val/), e.g. "
                             "runs/bench/fusion/preprocess/<fingerprint> after make bench-fusion")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2, 0, 1],
                        help="train.seed of each run (default %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default: the demo's train.steps)")
    parser.add_argument("--variant", action="append", default=[],
                        help="space-separated STAGE.KEY=VALUE overrides compared with the "
                             "default; repeat for more variants")
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
            print(f"[joint] {variant or 'default'} seed {seed}: usage {result['usage']:.3f} "
                  f"fusion/recon {result['fusion_recon']:.3f} ({result['train_s']:.0f} s)",
                  flush=True)
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
