"""Data-plane throughput: the preprocess transforms three ways on the same shards.

    python -m pipeline.bench.dataplane [--samples N] [--image-size 64 256] [--passes P]
        [--out results.json]

For each image size the demo's synth stage generates ``N`` spoken scenes once (cached under
``--shards-root``), and the demo's preprocess config (``workflows/demo.yaml``, with
``image_size`` set to the shard's size) turns them into model-ready rows in

(a) ``floor``: one process, one thread, a loop of :func:`pipeline.formats.shards.read_shard` and
    :func:`pipeline.formats.samples.preprocess_sample`: the CPU cost per sample;
(b) ``webdataset``: ``webdataset.WebDataset(urls)`` mapped with the same function, batched to
    NumPy, through ``torch.utils.data.DataLoader(num_workers=cores)``;
(c) ``ray-data``: the preprocess stage's own pipeline
    (:func:`pipeline.preprocess.preprocessed_dataset`: shard paths into the
    ``ShardPreprocessor`` actor pool, whose actors read and preprocess whole shards), on
    in-process Ray with ``num_cpus = cores``, streamed with
    ``iter_batches`` as training reads it (default), or materialized as the stage does before
    writing parquet (``--ray-consume materialize``).

Each path runs in a fresh interpreter of its own, so that each starts from nothing but its own
imports: run in one process, the Ray driver held what the floor and webdataset had left on its heap
(~700 MiB counted against Ray), and the webdataset workers forked a parent that had just run the
floor. ``--repeats`` runs the three paths that many times in turn; the ratios are the medians.

Each path is timed from building its pipeline to its last row (DataLoader worker start and Ray
actor start included; ``ray.init`` and the start of Ray Data's helper actors are not, a workflow
pays them once per run). ``--passes`` reads the shard list several times, so that start-up weighs
less; "steady" rates count only the rows after a path's first output. Memory is the peak over the
path's process tree (its interpreter, DataLoader workers, Ray's daemons and workers), sampled every
250 ms (PSS every second): summed RSS, which counts pages shared between processes (forked workers,
the object store) once per process, and summed PSS, which splits them. Spilled bytes come from the
object store's own counters after the Ray path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Self

import numpy as np
import yaml

from pipeline.bench import process_table, run_meta
from pipeline.config import from_dict
from pipeline.formats.samples import BadSample, Resamplers, preprocess_sample
from pipeline.formats.shards import SHARD_MANIFEST, read_shard
from pipeline.preprocess import PreprocessConfig, preprocessed_dataset, shard_paths
from pipeline.raydata import init_single_node

DEMO_WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "demo.yaml"
PATHS = ("floor", "webdataset", "ray-data")
# Issue 15 at 256 px, (c) against (b): end to end >= 0.8x, once started >= 1.0x, peak PSS <= 2x.
TARGETS_VS_WEBDATASET = {"end_to_end": 0.8, "steady": 1.0}
TARGET_PSS_VS_WEBDATASET = 2.0
TARGET_VS_FLOOR = 0.8  # issue 4: (c) >= 80% of (a) x cores


@dataclass(frozen=True)
class BenchSettings:
    """What one run measures."""

    samples: int  # spoken scenes per image size
    image_sizes: tuple[int, ...]  # synth image side; preprocess resizes to the same side
    cores: int  # DataLoader workers, Ray num_cpus, and the floor's multiplier
    shards_root: str  # where generated shards are cached between runs
    ray_consume: str  # "materialize" (as the stage) or "iter_batches" (streaming)
    passes: int  # times each path reads the shard list (more work against start-up costs)
    num_actors: int | None  # preprocess.num_actors override; None: the demo's value
    batch_size: int | None  # preprocess.batch_size override; None: the demo's value
    repeats: int = 1  # runs of the three paths, in turn; ratios are medians over them


@dataclass
class Measurement:
    """One path over one set of shards."""

    path: str
    image_size: int
    samples: int  # rows that came out
    ok: int  # of which preprocessed without a BadSample
    seconds: float
    samples_per_s: float
    samples_per_s_per_core: float
    cores: int  # the cores the path may use (1 for the floor)
    peak_rss_bytes: int | None  # process tree, summed RSS
    peak_pss_bytes: int | None  # process tree, summed PSS (shared pages split)
    first_output_s: float | None = None  # until the first row/batch came out (start-up)
    # Rows after the first output over the time after it: the rate once started, or None
    # where the output arrives all at once (materialize).
    steady_samples_per_s: float | None = None
    spilled_bytes: int | None = None  # Ray only
    note: str = ""
    repeat: int = 0  # which of the settings' repeats measured it


# -- configs and shards --------------------------------------------------------------------------


def demo_configs(image_size: int, workflow: Path = DEMO_WORKFLOW) -> tuple[Any, PreprocessConfig]:
    """The demo workflow's synth and preprocess configs, both at ``image_size``."""
    from pipeline.synth import SynthConfig

    stages = yaml.safe_load(workflow.read_text())["stages"]
    synth = from_dict(SynthConfig, stages["synth"].get("config"), source=str(workflow),
                      path="stages.synth.config")
    pre = from_dict(PreprocessConfig, stages["preprocess"].get("config"), source=str(workflow),
                    path="stages.preprocess.config")
    return replace(synth, image_size=image_size), replace(pre, image_size=image_size)


def ensure_shards(synth_config: Any, root: Path) -> Path:
    """Generate the synth shards once; later runs with the same config reuse them."""
    from pipeline.synth import run as synth_run

    c = synth_config
    out = root / f"synth-n{c.num_samples}-px{c.image_size}-sr{c.sample_rate}-seed{c.seed}"
    if (out / SHARD_MANIFEST).is_file():
        return out
    if out.exists():  # an interrupted generation: synth refuses a non-empty folder
        import shutil
        shutil.rmtree(out)
    print(f"generating {c.num_samples} samples at {c.image_size} px into {out}", file=sys.stderr)
    synth_run(c, out, progress=False)
    return out


# -- memory of the process tree ------------------------------------------------------------------


def tree_memory(root: int | None = None, pss: bool = True) -> tuple[int, int | None]:
    """(summed RSS, summed PSS or None) in bytes of ``root`` (default: this process) and its
    descendants. PSS walks every mapping (tens of ms for a torch process), RSS does not."""
    tree, _ = process_table()
    todo, rss_total, pss_total = [root or os.getpid()], 0, 0 if pss else None
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        pid = todo.pop()
        todo += tree.get(pid, [])
        try:
            rss_total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            if pss_total is not None:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        pss_total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):  # exited meanwhile, or an old kernel
            continue
    return rss_total, pss_total


class PeakMemory:
    """Samples :func:`tree_memory` in a thread while the ``with`` block runs; keeps the peaks.

    RSS every ``interval_s``, PSS every ``pss_every``-th time: the sampler takes CPU from the
    paths it measures (2 cores here), so the costly reading is the rare one.
    """

    def __init__(self, interval_s: float = 0.25, pss_every: int = 4) -> None:
        self.interval_s, self.pss_every = interval_s, pss_every
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        tick = 0
        while True:
            rss, pss = tree_memory(pss=tick % self.pss_every == 0)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss or 0)
            tick += 1
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- the three paths -----------------------------------------------------------------------------


class Progress:
    """Rows out so far, and when the first of them came out."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.samples = self.ok = self.first_rows = 0
        self.first_s: float | None = None

    def add(self, rows: int, ok: int) -> None:
        if self.first_s is None:
            self.first_s, self.first_rows = time.perf_counter() - self.began, rows
        self.samples += rows
        self.ok += ok


def _timed(path: str, image_size: int, cores: int,
           body: Callable[[Progress], None]) -> Measurement:
    with PeakMemory() as memory:
        progress = Progress()
        body(progress)
        seconds = time.perf_counter() - progress.began
    rate = progress.samples / seconds
    steady = None
    after = seconds - (progress.first_s or seconds)
    if progress.samples > progress.first_rows and after > 0:
        steady = (progress.samples - progress.first_rows) / after
    return Measurement(path, image_size, progress.samples, progress.ok, seconds, rate,
                       rate / cores, cores, memory.peak_rss or None, memory.peak_pss or None,
                       progress.first_s, steady)


def run_floor(paths: list[str], config: PreprocessConfig, progress: Progress) -> None:
    """(a) Read and preprocess every sample in this process, one thread."""
    resample = Resamplers(config.sample_rate)
    for path in paths:
        with open(path, "rb") as stream:
            for raw in read_shard(stream, path):
                sample = {"__key__": raw.key, "__error__": raw.error, **raw.members}
                try:
                    preprocess_sample(sample, config, resample)
                    progress.add(1, 1)
                except BadSample:
                    progress.add(1, 0)


class WdsTransform:
    """(b)'s per-sample function; each DataLoader worker gets a copy with its own resamplers."""

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config
        self.resample = Resamplers(config.sample_rate)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        try:
            row = preprocess_sample(sample, self.config, self.resample)
            row["ok"] = True
        except BadSample:  # kept as a row so every path counts every sample
            row = {"ok": False}
        return row


def collate_numpy(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows -> one NumPy array per column; bad rows come as a count only."""
    good = [r for r in rows if r["ok"]]
    batch = {name: np.stack([np.asarray(r[name]) for r in good]) for name in good[0]} if good else {}
    batch["rows"] = np.asarray(len(rows))
    batch["ok_rows"] = np.asarray(len(good))
    return batch


def run_webdataset(paths: list[str], config: PreprocessConfig, cores: int,
                   progress: Progress) -> None:
    """(b) webdataset + DataLoader(num_workers=cores), iterated to the end."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    # Shards are split between the workers (webdataset's split_by_worker default); batching in
    # the workers, as webdataset recommends, so the loader passes whole batches (batch_size=None).
    dataset = (wds.WebDataset(paths, shardshuffle=False, empty_check=False)
               .map(WdsTransform(config))
               .batched(config.batch_size, collation_fn=collate_numpy, partial=True))
    loader = DataLoader(dataset, batch_size=None, num_workers=cores)
    for batch in loader:
        progress.add(int(batch["rows"]), int(batch["ok_rows"]))


def spilled_bytes() -> int | None:
    """Bytes the object store has spilled to disk since Ray started, or None if unavailable."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    try:  # a private API (Ray 2.58's `ray memory --stats-only` reads the same counter)
        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        return int(get_memory_info_reply(state).store_stats.spilled_bytes_total)
    except Exception as err:  # noqa: BLE001 - an optional number must not fail the benchmark
        print(f"spilled bytes not available: {type(err).__name__}: {err}", file=sys.stderr)
        return None


def run_ray(paths: list[str], filesystem: Any, config: PreprocessConfig, consume: str,
            progress: Progress) -> None:
    """(c) The preprocess stage's Ray Data pipeline, consumed to the end."""
    dataset = preprocessed_dataset(paths, filesystem, config)
    if consume == "materialize":  # what the stage does, then it reads the statuses back too
        statuses = dataset.materialize().select_columns(["status"]).to_pandas()["status"]
        progress.add(len(statuses), int((statuses == "ok").sum()))
    else:  # streaming, as training consumes it
        for batch in dataset.iter_batches(batch_size=config.batch_size, batch_format="numpy"):
            progress.add(len(batch["status"]), int((batch["status"] == "ok").sum()))


def path_config(settings: BenchSettings, image_size: int) -> tuple[Any, PreprocessConfig]:
    """The synth and preprocess configs one image size is measured with."""
    synth_config, config = demo_configs(image_size)
    synth_config = replace(synth_config, num_samples=settings.samples)
    if settings.num_actors is not None:
        config = replace(config, num_actors=settings.num_actors)
    if settings.batch_size is not None:
        config = replace(config, batch_size=settings.batch_size)
    return synth_config, config


def measure_path(settings: BenchSettings, image_size: int, path: str) -> Measurement:
    """One path over the (already generated) shards of one image size, in this process."""
    synth_config, config = path_config(settings, image_size)
    shards = ensure_shards(synth_config, Path(settings.shards_root))
    paths, filesystem = shard_paths(shards)
    paths = paths * settings.passes  # every path reads the same list, shard by shard
    cores = settings.cores
    if path == "floor":
        measured = _timed("floor", image_size, 1, lambda p: run_floor(paths, config, p))
        measured.note = "1 thread"
        return measured
    if path == "webdataset":
        # Imported before the clock starts, as Ray is for (c): the timings are of the pipelines.
        import torch.utils.data  # noqa: F401
        import webdataset  # noqa: F401

        measured = _timed("webdataset", image_size, cores,
                          lambda p: run_webdataset(paths, config, cores, p))
        measured.note = f"{cores} workers, batch {config.batch_size}, {len(paths)} shards"
        return measured
    return _measure_ray(settings, image_size, paths, filesystem, config)


def _measure_ray(settings: BenchSettings, image_size: int, paths: list[str], filesystem: Any,
                 config: PreprocessConfig) -> Measurement:
    import ray
    from ray.data import DataContext

    # Started as `mmvq run` starts the embedded Ray (init_single_node: loopback, the workers'
    # environment, MALLOC_ARENA_MAX among it), not with a bare ray.init that no user's stage gets.
    init_single_node(num_cpus=settings.cores, include_dashboard=False, log_to_driver=False)
    try:
        context = DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        # Ray Data's first execution in a session starts its helper actors (stats, actor
        # locations, autoscaling), each a fresh Python process: a one-off per Ray session, like
        # ray.init, so it is paid here, untimed, and reported in the note.
        began = time.perf_counter()
        ray.data.range(1).materialize()
        warmup_s = time.perf_counter() - began
        ours = _timed("ray-data", image_size, settings.cores,
                      lambda p: run_ray(paths, filesystem, config, settings.ray_consume, p))
        ours.spilled_bytes = spilled_bytes()
        ours.note = (f"{settings.ray_consume}, {config.num_actors} actors, "
                     f"batch {config.batch_size}, {len(paths)} shards, "
                     f"Ray Data warm-up {warmup_s:.1f} s untimed")
    finally:
        ray.shutdown()
    return ours


def measure_in_child(settings: BenchSettings, image_size: int, path: str) -> Measurement:
    """:func:`measure_path` in a fresh interpreter (``--child``), whose tree is the path's own."""
    with tempfile.TemporaryDirectory(prefix="dataplane-") as tmp:
        out = Path(tmp) / "measurement.json"
        command = [sys.executable, "-m", "pipeline.bench.dataplane", "--child", path,
                   "--child-settings", json.dumps(asdict(settings)),
                   "--image-size", str(image_size), "--out", str(out)]
        done = subprocess.run(command, check=False)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"the {path} path at {image_size} px failed "
                               f"(exit {done.returncode}): {' '.join(command)}")
        return Measurement(**json.loads(out.read_text()))


def measure(settings: BenchSettings, image_size: int) -> list[Measurement]:
    """Every repeat of the three paths over the shards of one image size, each path in its own
    interpreter, in the order a, b, c (Ray last: its daemons take a few seconds to go)."""
    ensure_shards(path_config(settings, image_size)[0], Path(settings.shards_root))
    rows = []
    for repeat in range(settings.repeats):
        for path in PATHS:
            measured = measure_in_child(settings, image_size, path)
            measured.repeat = repeat
            rows.append(measured)
    return rows


def ratios(rows: list[Measurement]) -> dict[str, float | None]:
    """(c)/(b) and (c)/((a) x cores) for one image size, end to end and once started, and the
    peak PSS of (c) over (b)'s: per repeat, then the median over the repeats."""
    per_repeat = [_ratios_of_one_repeat([r for r in rows if r.repeat == repeat])
                  for repeat in sorted({r.repeat for r in rows})]
    result: dict[str, float | None] = {}
    for name in per_repeat[0]:
        values = [r[name] for r in per_repeat if r[name] is not None]
        result[name] = statistics.median(values) if values else None
    return result


def _ratios_of_one_repeat(rows: list[Measurement]) -> dict[str, float | None]:
    by_path = {r.path: r for r in rows}
    ours, loader, floor = by_path["ray-data"], by_path["webdataset"], by_path["floor"]
    result: dict[str, float | None] = {
        "end_to_end_ray_vs_webdataset": ours.samples_per_s / loader.samples_per_s,
        "end_to_end_ray_vs_floor_x_cores": ours.samples_per_s / (floor.samples_per_s * ours.cores),
        "peak_pss_ray_vs_webdataset": (ours.peak_pss_bytes / loader.peak_pss_bytes
                                       if ours.peak_pss_bytes and loader.peak_pss_bytes else None)}
    steady = [r.steady_samples_per_s for r in (ours, loader, floor)]
    if None in steady:  # materialized: no rate once started
        result["steady_ray_vs_webdataset"] = result["steady_ray_vs_floor_x_cores"] = None
    else:
        result["steady_ray_vs_webdataset"] = steady[0] / steady[1]
        result["steady_ray_vs_floor_x_cores"] = steady[0] / (steady[2] * ours.cores)
    return result


def run(settings: BenchSettings) -> dict[str, Any]:
    """Measure every image size; rows and ratios as plain data."""
    rows, summary = [], {}
    for size in settings.image_sizes:
        measured = measure(settings, size)
        rows += [asdict(m) for m in measured]
        summary[str(size)] = ratios(measured)
    return {"rows": rows, "ratios": summary}


# -- reporting ---------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    """The rows and the ratios against the targets as Markdown."""
    lines = [("| px | run | path | samples | s | samples/s | per core | first out s "
              "| steady samples/s | peak RSS MiB | peak PSS MiB | spilled MiB | setting |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        spilled = "-" if r["path"] != "ray-data" else _mib(r["spilled_bytes"])
        lines.append(f"| {r['image_size']} | {r['repeat'] + 1} | {r['path']} | {r['samples']} "
                     f"| {r['seconds']:.1f} | {r['samples_per_s']:.1f} "
                     f"| {r['samples_per_s_per_core']:.1f} "
                     f"| {_num(r['first_output_s'])} | {_num(r['steady_samples_per_s'])} "
                     f"| {_mib(r['peak_rss_bytes'])} | {_mib(r['peak_pss_bytes'])} "
                     f"| {spilled} | {r['note']} |")
    lines += ["", "Medians over the runs:", "",
              "| px | rate | ray / webdataset | ray / (floor x cores) (target >= 0.8) |",
              "| --- | --- | --- | --- |"]
    for size, r in result["ratios"].items():
        for rate, target in TARGETS_VS_WEBDATASET.items():
            if r.get(f"{rate}_ray_vs_webdataset") is None:
                continue
            lines.append(f"| {size} | {rate.replace('_', ' ')} "
                         f"| {_ratio(r[f'{rate}_ray_vs_webdataset'], target)} "
                         f"| {_ratio(r[f'{rate}_ray_vs_floor_x_cores'], TARGET_VS_FLOOR)} |")
        pss = r.get("peak_pss_ray_vs_webdataset")
        if pss is not None:
            met = "met" if pss <= TARGET_PSS_VS_WEBDATASET else "missed"
            lines.append(f"| {size} | peak PSS | {pss:.2f}x ({met}: <= "
                         f"{TARGET_PSS_VS_WEBDATASET:.0f}x) | - |")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def _ratio(value: float, target: float) -> str:
    return f"{value:.2f} ({'met' if value >= target else 'missed'}: >= {target})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=768,
                        help="samples per image size (default: the demo's 768)")
    parser.add_argument("--image-size", type=int, nargs="+", default=[64, 256],
                        help="image sides to measure (default: the demo's 64, and 256)")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                        help="DataLoader workers and Ray CPUs (default: the usable cores)")
    parser.add_argument("--shards-root", type=Path, default=Path("runs/bench/dataplane-shards"),
                        help="cache of generated shards")
    parser.add_argument("--ray-consume", choices=["materialize", "iter_batches"],
                        default="iter_batches",
                        help="how the Ray path is consumed: streamed (default, as training "
                        "reads it) or materialized (as the stage does before writing parquet)")
    parser.add_argument("--passes", type=int, default=1,
                        help="read the shards this many times in every path (default 1)")
    parser.add_argument("--num-actors", type=int, default=None,
                        help="override preprocess.num_actors (default: the demo's)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="override preprocess.batch_size (default: the demo's)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of the three paths, in turn; ratios are medians (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    # Internal: how the parent runs one path in a fresh interpreter.
    parser.add_argument("--child", choices=PATHS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-settings", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.samples, args.cores, args.passes, args.repeats, *args.image_size) < 1:
        parser.error("--samples, --cores, --passes, --repeats and --image-size must be positive")
    if args.child is not None and (args.child_settings is None or args.out is None
                                   or len(args.image_size) != 1):
        parser.error("--child needs --child-settings, --out and one --image-size")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write JSON if asked; returns the results."""
    args = parse_args(argv)
    if args.child is not None:
        child_settings = json.loads(args.child_settings)
        child_settings["image_sizes"] = tuple(child_settings["image_sizes"])
        measured = measure_path(BenchSettings(**child_settings), args.image_size[0], args.child)
        args.out.write_text(json.dumps(asdict(measured)) + "\n")
        return asdict(measured)
    settings = BenchSettings(args.samples, tuple(args.image_size), args.cores,
                             str(args.shards_root), args.ray_consume, args.passes, args.num_actors,
                             args.batch_size, args.repeats)
    result = {"meta": run_meta("pipeline.bench.dataplane", settings, argv,
                               ("ray", "webdataset", "torch")), **run(settings)}
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
