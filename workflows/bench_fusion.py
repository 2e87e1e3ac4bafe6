"""Fusion benchmark: separate per-modality tokenizers against the fused tokenizer, one run.

    python -m workflows.bench_fusion [--samples 2048] [--val-fraction 0.25] [--seeds 0]
                                     [--out runs/bench/fusion.json]

Both variants run the whole demo workflow (``workflows/demo.yaml``) under one data root
(``--root``), so they share the generated spoken scenes and their preprocessing, and a rerun
reuses every stage already committed. They differ only in ``train.model.fusion.enabled``: the same data, model, optimizer, batch,
schedule and seed, and the same modality tokens per sample (fusion adds its joint tokens). The
synth stage makes ``--samples`` scenes with a ``--val-fraction`` held out, so the val split is
a gallery of several hundred samples. Each seed trains both variants.

Then, in this process, over the val split of each trained model:

- **Retrieval** image->text, audio->text and image->audio: R@1, R@5, R@10 and the median rank
  (1 = first). A hit is the sample itself or any sample whose caption is identical (same text
  ids): no embedding could tell those apart. How many val samples share their caption, and the
  recall a random ranking would get, are reported beside them.
  - ``probe``: every model's quantized latents through the InfoNCE probe of
    :mod:`mmvq.alignment_probe` (fusion's default pooling, the mean of a per-position MLP, then
    a linear map), fitted on the train split with the tokenizer frozen. The same pooling, head
    and loss for both variants: the fair comparison of what the tokens carry.
  - ``heads``: the fused model's own embedding heads (``MultimodalTokenizer.embed``), what it
    ships; the separate tokenizers have none.
- From evaluate's ``metrics.json`` (the token dataset's codes, decoded): the cross-modal NMI of
  the tokens per modality pair, the joint codebook's usage, and reconstruction (image PSNR /
  SSIM, audio SI-SNR / mel distance, text exact match).

The learning curves of both variants are in MLflow under the data root (the command is
printed). Acceptance (issue 17), checked on the medians over seeds: the fused tokens' image->text
and audio->text probe R@5 at least 10x chance and 2x the separate tokens' (the same probe, so
the same pooling; the heads' numbers are shown beside them);
fused NMI above separate for every pair; image PSNR cost <= 0.3 dB and mel distance cost
<= 5%; joint codebook usage >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.bench import run_meta
from pipeline.probe_retrieval import KS

WORKFLOW = "workflows/demo.yaml"
VARIANTS = {"separate": "false", "fused": "true"}  # name -> train.model.fusion.enabled
# A stage's line in the closing report of ``mmvq run``: "train  205.3s  ran  runs/..."
REPORT_LINE = re.compile(r"^(\w+)\s+([\d.]+)s\s+(ran|reused)\s", re.MULTILINE)
RECONSTRUCTION = ("image/psnr", "image/ssim", "audio/si_snr", "audio/mel_distance",
                  "text/exact_match")
# Acceptance of issue 17 (on the medians over seeds).
CHANCE_FACTOR, SEPARATE_FACTOR = 10.0, 2.0  # fused R@5 >= 10x chance and >= 2x separate
MAX_PSNR_COST_DB, MAX_MEL_COST, MIN_JOINT_USAGE = 0.3, 0.05, 0.8


@dataclass(frozen=True)
class FusionBenchSettings:
    samples: int = 2048  # generated scenes, train + val
    val_fraction: float = 0.25  # 512 val samples at the default size
    seeds: tuple[int, ...] = (0,)  # train seeds; each trains both variants
    root: str = "runs/bench/fusion"  # data root shared by the variants (and MLflow's store)
    overrides: tuple[str, ...] = field(default=())  # more STAGE.KEY=VALUE for both variants


def workflow_overrides(settings: FusionBenchSettings, variant: str | None,
                       seed: int | None) -> list[str]:
    """The demo workflow's overrides for the data, and for one variant and seed."""
    out = [f"synth.num_samples={settings.samples}", f"synth.val_fraction={settings.val_fraction}",
           "evaluate.compare_with=null", *settings.overrides]
    if variant is not None:
        out.append(f"train.model.fusion.enabled={VARIANTS[variant]}")
    if seed is not None:
        out += [f"train.seed={seed}", f"evaluate.seed={seed}"]
    return out


def run_workflow(settings: FusionBenchSettings, overrides: list[str], log: Path) -> dict[str, Any]:
    """``mmvq run`` of the workflow in a fresh process, its output in ``log``. Stages already
    committed for these overrides are reused (the data after the first variant, a whole
    variant on a rerun). Returns each stage's seconds and whether it ran, from the run's
    closing report."""
    command = [sys.executable, "-m", "workflows.cli", "run", WORKFLOW, "--data-root",
               settings.root, "--no-progress", *overrides]
    with log.open("w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                              check=False).returncode
    text = log.read_text()
    if code != 0:
        tail = "".join(text.splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(command)} exited {code} (log {log}):\n{tail}")
    return {m.group(1): {"seconds": float(m.group(2)), "ran": m.group(3) == "ran"}
            for m in REPORT_LINE.finditer(text)}


def planned_outputs(settings: FusionBenchSettings, overrides: list[str]) -> dict[str, Path]:
    """Stage name -> the committed output directory these overrides select."""
    from workflows.plan import load_workflow, plan_workflow

    workflow = load_workflow(WORKFLOW, [*overrides, f"data_root={settings.root}"])
    return {step.name: step.output for step in plan_workflow(workflow)}


def score_variant(model_dir: Path, data_dir: Path, metrics_file: Path) -> dict[str, Any]:
    """Retrieval (probe for every model, heads for a fused one), NMI, usage, reconstruction."""
    from mmvq.tokenizer import MultimodalTokenizer
    from pipeline.probe_retrieval import score_model

    result = score_model(MultimodalTokenizer.load(model_dir), data_dir / "train",
                         data_dir / "val")
    trained = json.loads(metrics_file.read_text())["trained"]
    return result | {
        "nmi": {f"{a}_{b}": trained.get(f"cross/nmi_{a}_{b}") for a, b in
                (("image", "audio"), ("image", "text"), ("audio", "text"))},
        "joint_usage": trained.get("joint/codebook_usage"),
        "reconstruction": {k: trained.get(k) for k in RECONSTRUCTION},
    }


def run(settings: FusionBenchSettings) -> dict[str, Any]:
    from pipeline.formats.checkpoint import TOKENIZER_DIR
    from pipeline.formats.registry import METRICS_FILE
    from pipeline.stage import STAGE_RECORD

    root = Path(settings.root)
    root.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    for seed in settings.seeds:
        for variant in VARIANTS:
            overrides = workflow_overrides(settings, variant, seed)
            stages = run_workflow(settings, overrides, root / f"{variant}-seed{seed}.log")
            outputs = planned_outputs(settings, overrides)
            scores = score_variant(outputs["train"] / TOKENIZER_DIR, outputs["preprocess"],
                                   outputs["evaluate"] / METRICS_FILE)
            train = stages.get("train", {"ran": False})
            # The seconds the train stage took when it ran, also when this run reused it.
            record = json.loads((outputs["train"] / STAGE_RECORD).read_text())
            train["seconds"] = float(record["summary"]["seconds"])
            scores |= {"seed": seed, "train_s": train["seconds"], "train_ran": train["ran"],
                       "train_dir": str(outputs["train"])}
            runs[variant].append(scores)
            print(f"[bench-fusion] {variant} seed {seed}: train {train['seconds']:.0f} s"
                  f"{'' if train['ran'] else ' (reused)'}; "
                  + ", ".join(f"{k} {v:.3f}" for k, v in (scores["heads"] or scores["probe"]).items()
                              if k.endswith("/r5")), flush=True)
    summary = {name: _median_tree(results) for name, results in runs.items()}
    return {"runs": runs, "summary": summary, "met": acceptance(summary),
            "mlflow_ui": f"mlflow ui --backend-store-uri sqlite:///{root.resolve()}/mlflow.db "
                         "--host 127.0.0.1"}


def _median_tree(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over runs of every numeric leaf of the score dicts."""
    first = results[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = _median_tree([r[key] for r in results])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in results)
        elif value is None:
            out[key] = None
    return out


def acceptance(summary: dict[str, Any]) -> dict[str, bool]:
    """Issue 17's acceptance points, each True or False."""
    fused, separate = summary["fused"], summary["separate"]
    met = {}
    for a, b in (("image", "text"), ("audio", "text")):
        r5 = fused["probe"][f"{a}_to_{b}/r5"]  # the same probe as separate's: like for like
        met[f"{a}_to_{b} r5 >= {CHANCE_FACTOR:g}x chance"] = r5 >= CHANCE_FACTOR * fused["chance"]["r5"]
        met[f"{a}_to_{b} r5 >= {SEPARATE_FACTOR:g}x separate"] = (
            r5 >= SEPARATE_FACTOR * separate["probe"][f"{a}_to_{b}/r5"])
    met["nmi above separate, every pair"] = all(
        (fused["nmi"][p] or 0.0) > (separate["nmi"][p] or 0.0) for p in fused["nmi"])
    fr, sr = fused["reconstruction"], separate["reconstruction"]
    met[f"image psnr cost <= {MAX_PSNR_COST_DB} dB"] = (
        sr["image/psnr"] - fr["image/psnr"] <= MAX_PSNR_COST_DB)
    met[f"mel distance cost <= {MAX_MEL_COST:.0%}"] = (
        fr["audio/mel_distance"] <= (1 + MAX_MEL_COST) * sr["audio/mel_distance"])
    met[f"joint usage >= {MIN_JOINT_USAGE}"] = (fused["joint_usage"] or 0.0) >= MIN_JOINT_USAGE
    return met


def format_table(result: dict[str, Any]) -> str:
    fused, separate = result["summary"]["fused"], result["summary"]["separate"]
    lines = [f"val gallery {fused['val_samples']:.0f} samples, "
             f"{fused['shared_caption_samples']:.0f} share their caption with another; chance "
             + ", ".join(f"R@{k} {fused['chance'][f'r{k}']:.3f}" for k in KS),
             f"{'':26}{'separate probe':>16}{'fused probe':>14}{'fused heads':>14}"]
    for key in separate["probe"]:
        heads = (fused["heads"] or {}).get(key)
        lines.append(f"{key:26}{separate['probe'][key]:>16.3f}{fused['probe'][key]:>14.3f}"
                     + (f"{heads:>14.3f}" if heads is not None else f"{'-':>14}"))
    for name in separate["nmi"]:
        lines.append(f"{'nmi ' + name:26}{separate['nmi'][name] or 0:>16.3f}"
                     f"{fused['nmi'][name] or 0:>14.3f}")
    for name in RECONSTRUCTION:
        lines.append(f"{name:26}{separate['reconstruction'][name]:>16.4f}"
                     f"{fused['reconstruction'][name]:>14.4f}")
    lines.append(f"{'joint codebook usage':26}{'-':>16}{fused['joint_usage'] or 0:>14.3f}")
    lines.append(f"{'train stage s':26}{separate['train_s']:>16.0f}{fused['train_s']:>14.0f}")
    lines += [f"  {'met' if ok else 'NOT met'}: {name}" for name, ok in result["met"].items()]
    lines.append(f"learning curves: {result['mlflow_ui']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m workflows.bench_fusion",
        description="Separate per-modality tokenizers vs the fused tokenizer on generated spoken "
                    "scenes: retrieval, cross-modal NMI, joint codebook usage and "
                    "reconstruction, side by side.")
    parser.add_argument("--samples", type=int, default=FusionBenchSettings.samples,
                        help="generated scenes, train + val (default %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=FusionBenchSettings.val_fraction,
                        help="share held out as the val gallery (default %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(FusionBenchSettings.seeds),
                        help="train seeds, each trains both variants (default %(default)s)")
    parser.add_argument("--root", default=FusionBenchSettings.root,
                        help="data root shared by the variants (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/fusion.json"),
                        help="JSON result (default %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="STAGE.KEY=VALUE",
                        help="more workflow overrides for both variants, e.g. train.steps=100")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings = FusionBenchSettings(samples=args.samples, val_fraction=args.val_fraction,
                                   seeds=tuple(args.seeds), root=args.root,
                                   overrides=tuple(args.overrides))
    result = {"meta": run_meta("workflows.bench_fusion", settings, argv), **run(settings)}
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float))
    return result


if __name__ == "__main__":
    main()
