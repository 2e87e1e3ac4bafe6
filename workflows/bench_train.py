"""Training throughput: the train stage (Ray Train DDP) beside a plain PyTorch loop, one run.

    python -m workflows.bench_train [--steps 60] [--repeats 3] [--out runs/bench/train.json]

Both train the demo's model (``workflows/demo.yaml``'s train config, with its shapes from the
data contract) on the demo's preprocessed train split, with the same optimizer (AdamW through
:func:`pipeline.train_loop.build_parts`), the same global batch (``num_workers x batch_size``) and
the same number of steps, on the same cores:

- ``stage``: ``mmvq stage train --workflow workflows/demo.yaml`` in a fresh process and a fresh
  data root: in-process Ray, Ray Train with ``num_workers`` workers of ``threads_per_worker``
  threads, MLflow tracking to SQLite, as a user runs it.
- ``plain``: one process with ``num_workers x threads_per_worker`` torch threads reads the same
  parquet into memory and steps the same model on whole global batches (a fresh permutation per
  epoch), with :func:`mmvq.train_step.generator_step`, as the stage's workers do.
- ``floor``: Ray Train's own start-up and nothing of ours: the embedded Ray started as the
  stage starts it, and a trainer of the stage's size whose workers import torch and print one
  line. Its time to that line is what the stage's time to step 0 cannot go below here.

The data (synth + preprocess of the demo, 768 samples) is made once under ``--root`` and reused.
This process reads each child's output line by line and stamps it: *time to step 0* is from the
command's start to the line of its first finished step; *steady samples/s* is the global batch
times the steps between the ``--warmup`` step and the last progress line before the final step
(which the stage follows with validation and the checkpoint), over the time between those lines;
*wall* is the whole command. Repeats alternate stage and plain so that a change in machine load
hits both; the table gives the median, min and max of each.

Targets (issue 15): steady samples/s of the stage >= 0.95x the plain loop's; time to step 0 of
the stage <= 15 s on the 2-core development machine. Repeats run stage, plain, floor in turn.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.bench import run_meta

TARGET_STEADY_RATIO = 0.95  # stage steady samples/s >= 0.95x the plain loop's
TARGET_STEP0_S = 15.0  # command start -> first step of the stage
WORKFLOW = "workflows/demo.yaml"
# "[train] step 5/60 ..." (the stage's rank 0, forwarded by Ray) or "[plain] step 5/60 ..."
STEP_LINE = re.compile(r"\[(?:train|plain|floor)\] step (\d+)/(\d+)")
DATA_WAIT = re.compile(r"data-wait (\d+)%")


@dataclass(frozen=True)
class TrainBenchSettings:
    steps: int = 60  # optimizer steps per run
    log_every: int = 5  # steps between progress lines (each line is a timestamp)
    warmup: int = 10  # steady throughput is measured from this step on
    repeats: int = 3  # runs of each, alternating
    root: str = "runs/bench"  # where the demo data is made once (train-data/)


def prepare_data(root: Path) -> Path:
    """The demo's preprocess output under ``root/train-data`` (made once; the stages reuse it)."""
    data_root = root / "train-data"
    subprocess.run([sys.executable, "-m", "workflows.cli", "run", WORKFLOW, "--only", "synth",
                    "--only", "preprocess", "--data-root", str(data_root), "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL)
    from pipeline.stage import committed_outputs

    return committed_outputs(data_root, "preprocess")[-1]


def timed(command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``command``, stamping each output line; the step lines' times and the wall time."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, bufsize=1)
    steps: dict[int, float] = {}
    waits: dict[int, float] = {}
    total, tail = 0, []
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter() - start
        tail = (tail + [line])[-40:]
        match = STEP_LINE.search(line)
        if match:
            step, total = int(match.group(1)), int(match.group(2))
            steps.setdefault(step, now)
            if wait := DATA_WAIT.search(line):
                waits[step] = int(wait.group(1)) / 100
    code = proc.wait()
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited {code}:\n{''.join(tail)}")
    return {"steps": steps, "total": total, "wall_s": time.perf_counter() - start,
            "data_wait": waits}


def summarize(run: dict[str, Any], global_batch: int, warmup: int) -> dict[str, float]:
    """Time to the first step, steady samples/s after ``warmup`` and the wall time of one run."""
    steps = run["steps"]
    first = min(steps)
    # The last line before the final step: the stage validates and checkpoints at the end.
    end = max(s for s in steps if s < run["total"]) if len(steps) > 1 else run["total"]
    begin = min((s for s in steps if s >= warmup), default=first)
    if end <= begin:
        raise RuntimeError(f"too few progress lines to measure: steps {sorted(steps)}")
    steady = (end - begin) * global_batch / (steps[end] - steps[begin])
    waits = [w for s, w in run["data_wait"].items() if begin < s <= end]
    return {"step0_s": steps[first], "steady_samples_per_s": steady, "wall_s": run["wall_s"],
            "data_wait": statistics.mean(waits) if waits else float("nan")}


def stage_command(data: Path, out_root: Path, settings: TrainBenchSettings) -> list[str]:
    return [sys.executable, "-m", "workflows.cli", "stage", "train", "--workflow", WORKFLOW,
            "--input", f"data={data}", "--data-root", str(out_root), "--no-progress",
            f"steps={settings.steps}", f"log_every={settings.log_every}", "val_every=0",
            "checkpoint_every=0"]


def plain_command(data: Path, settings: TrainBenchSettings) -> list[str]:
    return [sys.executable, "-m", "workflows.bench_train", "--plain-loop", str(data),
            "--steps", str(settings.steps), "--log-every", str(settings.log_every)]


def train_in_process(data: Path, overrides: list[str],
                     on_step: Callable[[int, int, float], None] | None = None) -> tuple[Any, Any]:
    """The demo's train config (``WORKFLOW`` under ``overrides``) and model trained in this
    process on whole global batches of ``data``'s train split, as the stage's workers step it.

    ``on_step(step, global_batch, seconds_since_start)`` is called after every step. Returns
    the train config (its model config completed from the data contract) and the trained parts
    (what :func:`pipeline.train_loop.build_parts` returns).
    """
    import numpy as np
    import torch

    from mmvq.batch import to_model_inputs
    from mmvq.columns import MODEL_COLUMNS
    from pipeline.formats.preprocessed import model_config_for_data, read_split
    from pipeline.train_loop import build_parts, train_step
    from workflows.plan import load_workflow, plan_workflow

    workflow = load_workflow(WORKFLOW, [f"data_root={tempfile.mkdtemp()}", *overrides])
    config = next(p.config for p in plan_workflow(workflow) if p.name == "train")
    model_config, vocab = model_config_for_data(config.model, data)
    config = dataclasses.replace(config, model=model_config)
    torch.set_num_threads(config.num_workers * config.threads_per_worker)
    torch.manual_seed(config.seed)
    rows = read_split(data / "train", MODEL_COLUMNS)
    parts = build_parts(config, torch.device("cpu"), vocab)
    batch = config.num_workers * config.batch_size
    n = len(next(iter(rows.values())))
    step, epoch = 0, 0
    started = time.perf_counter()
    while step < config.steps:
        order = np.random.default_rng(config.seed + epoch).permutation(n)
        for begin in range(0, n - batch + 1, batch):
            index = order[begin:begin + batch]
            inputs = to_model_inputs({k: v[index] for k, v in rows.items()})
            # The stage's own step: the discriminators from gan.disc_start, schedules, EMA.
            train_step(config, parts, parts.model, parts.discriminators, [inputs], step)
            step += 1
            if on_step is not None:
                on_step(step, batch, time.perf_counter() - started)
            if step == config.steps:
                break
        epoch += 1
    return config, parts


def plain_loop(data: Path, steps: int, log_every: int) -> None:
    """The baseline: the demo's train config and model, one process, whole global batches."""
    def progress(step: int, batch: int, seconds: float) -> None:
        if step == 1 or step % log_every == 0 or step == steps:
            print(f"[plain] step {step}/{steps}  {step * batch / seconds:.1f} samples/s",
                  flush=True)

    train_in_process(data, [f"train.steps={steps}"], progress)


def floor_command() -> list[str]:
    return [sys.executable, "-m", "workflows.bench_train", "--floor-loop"]


def floor_loop() -> None:
    """Ray Train with nothing to train: the stage's Ray (in-process, the workflow's CPUs, no
    dashboard), trainer class and scaling; each worker imports torch, rank 0 prints a line."""
    import ray.train

    from pipeline.raydata import init_single_node
    from pipeline.train import trainer_class
    from workflows.plan import load_workflow, plan_workflow

    workflow = load_workflow(WORKFLOW, [f"data_root={tempfile.mkdtemp()}"])
    config = next(p.config for p in plan_workflow(workflow) if p.name == "train")
    init_single_node(num_cpus=workflow.ray.num_cpus, include_dashboard=False, log_to_driver=True)
    trainer_class()(
        _floor_worker,
        scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers,
                                               resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="bench-floor-")),
    ).fit()


def _floor_worker(_config: dict[str, Any] | None = None) -> None:
    import ray.train
    import torch  # noqa: F401  what every train worker imports before its first step

    if ray.train.get_context().get_world_rank() == 0:
        print("[floor] step 1/1", flush=True)


def run(settings: TrainBenchSettings) -> dict[str, Any]:
    data = prepare_data(Path(settings.root))
    from workflows.plan import load_workflow, plan_workflow

    workflow = load_workflow(WORKFLOW, [f"data_root={tempfile.mkdtemp()}"])
    train = next(p.config for p in plan_workflow(workflow) if p.name == "train")
    global_batch = train.num_workers * train.batch_size
    runs: dict[str, list[dict[str, float]]] = {"stage": [], "plain": [], "floor": []}
    for repeat in range(settings.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-train-") as out_root:
            for name, command in (("stage", stage_command(data, Path(out_root), settings)),
                                  ("plain", plain_command(data, settings)),
                                  ("floor", floor_command())):
                timing = timed(command)
                result = (summarize(timing, global_batch, settings.warmup) if name != "floor"
                          else {"step0_s": timing["steps"][1], "wall_s": timing["wall_s"]})
                result["load_average"] = os.getloadavg()[0]
                runs[name].append(result)
                print(f"[bench-train] {name} run {repeat + 1}: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in result.items()), flush=True)
    summary = {name: {key: _spread([r[key] for r in results]) for key in results[0]}
               for name, results in runs.items()}
    ratio = (summary["stage"]["steady_samples_per_s"]["median"]
             / summary["plain"]["steady_samples_per_s"]["median"])
    return {"data": str(data), "global_batch": global_batch, "runs": runs, "summary": summary,
            "steady_ratio": ratio,
            "targets": {"steady_ratio": TARGET_STEADY_RATIO, "stage_step0_s": TARGET_STEP0_S},
            "met": {"steady_ratio": ratio >= TARGET_STEADY_RATIO,
                    "stage_step0_s": summary["stage"]["step0_s"]["median"] <= TARGET_STEP0_S}}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'':8}{'step 0 s':>22}{'steady samples/s':>24}{'wall s':>22}{'data-wait':>11}"]
    for name, cols in result["summary"].items():
        cells = [f"{c['median']:7.1f} ({c['min']:.1f}-{c['max']:.1f})" if c else "-" for c in
                 (cols["step0_s"], cols.get("steady_samples_per_s"), cols["wall_s"])]
        wait = cols.get("data_wait", {"median": math.nan})["median"]
        shown = "-" if math.isnan(wait) else f"{wait:.0%}"
        lines.append(f"{name:8}{cells[0]:>22}{cells[1]:>24}{cells[2]:>22}{shown:>11}")
    lines.append(f"steady ratio stage/plain {result['steady_ratio']:.2f} "
                 f"(target >= {TARGET_STEADY_RATIO}); met: {result['met']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m workflows.bench_train",
        description="The train stage (Ray Train) beside a plain PyTorch loop on the demo's data "
                    "and model: time to step 0, steady samples/s and wall time, side by side.")
    parser.add_argument("--steps", type=int, default=TrainBenchSettings.steps,
                        help="optimizer steps per run (default %(default)s)")
    parser.add_argument("--log-every", type=int, default=TrainBenchSettings.log_every,
                        help="steps between progress lines (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=TrainBenchSettings.warmup,
                        help="steady throughput is measured from this step (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=TrainBenchSettings.repeats,
                        help="runs of each, alternating (default %(default)s)")
    parser.add_argument("--root", default=TrainBenchSettings.root,
                        help="where the demo data is made once (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/train.json"),
                        help="JSON result (default %(default)s)")
    parser.add_argument("--plain-loop", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--floor-loop", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.plain_loop is not None:  # the child that runs the baseline
        plain_loop(args.plain_loop, args.steps, args.log_every)
        return None
    if args.floor_loop:  # the child that times Ray Train's own start-up
        floor_loop()
        return None
    settings = TrainBenchSettings(steps=args.steps, log_every=args.log_every,
                                  warmup=args.warmup, repeats=args.repeats, root=args.root)
    result = {"meta": run_meta("workflows.bench_train", settings, argv), **run(settings)}
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float))
    return result


if __name__ == "__main__":
    main()
