"""Scaling with the number of samples: ingest -> preprocess -> tokenize at several sizes.

    python -m workflows.bench_scale [--sizes 1000 4000 16000] [--image-size 64]
        [--out runs/bench/scale.json]

For each size ``N`` a folder of ``N`` aligned samples is generated once (``KEY.jpg`` of
``--image-size`` px, ``KEY.flac`` of 1-2 s mono or stereo at 16 or 22.05 kHz, a unicode
``KEY.txt`` caption and ``KEY.json`` with a split, about 10% ``val``; deterministic per key, so the
first 1000 samples of every size are the same) and cached under ``--root`` as
``scale-data-N-pxS``. Then a fresh Python process runs the three stages one after the other with
:func:`workflows.run.run_single_stage` on in-process Ray (``num_cpus = --cores``) into a fresh
data root, so nothing is reused, every size starts Ray anew and no size's memory leaks into
another's. Between preprocess and tokenize that process saves an untrained tokenizer sized for the
preprocessed data (what the train stage would write; not timed).

Time: each stage's own seconds (``StageResult.seconds``: the stage's work and its MLflow
bookkeeping; not ``ray.init``, which the first call pays once and which is reported apart), summed
over the three stages, per sample. CPU seconds: the user + system time of the child's process
tree over each stage call, reaped processes included (ingest's call also starts Ray): the work
done, which other users' load on a shared machine changes far less than the seconds.

Memory: this process samples the child's whole process tree
(the driver, Ray's daemons, workers and actors) every ``--interval`` seconds; the child polls the
object store's bytes in use (Ray 2.58's raylet ``FormatGlobalMemoryInfo`` reply, ``store_stats``:
what ``ray memory --stats-only`` prints) on the same clock. The peak memory is the largest
``sum(RssAnon) + object store bytes in use`` at one moment: every process's private anonymous
memory (heaps, arrays, tensors: ``/proc/PID/status``, kernel counters, cheap to read; Ray starts
its workers with exec, not fork, so these pages are not shared) plus the objects alive in the
store, whose shared-memory pages (``RssShmem``) would otherwise count in every process that
mapped them, at their high-water mark. File-backed pages (shared libraries, mapped files) are left
out of it; summed PSS (``/proc/PID/smaps_rollup``, all pages, shared ones split) is reported beside
it, read at most 10% of the time: it walks every mapping, about a second per reading of a tree of
70 Ray processes on two cores.

Targets (the issue): seconds per sample at the largest size within 1.25x of the smallest, and
peak memory at the largest size at most 1.3x that at the smallest.
"""

from __future__ import annotations

import argparse
import bisect
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench import process_table, run_meta

STAGES = ("ingest", "preprocess", "tokenize")
TARGET_SECONDS_RATIO = 1.25  # issue: s/sample at 16k <= 1.25x s/sample at 1k
TARGET_MEMORY_RATIO = 1.3  # issue: peak memory at 16k <= 1.3x peak at 1k
DATA_VERSION = 1  # bump when make_sample changes, so cached folders are regenerated
VAL_FRACTION = 0.1
# Caption words: accents, other scripts and emoji, so text goes through real UTF-8.
WORDS = ("a", "red", "blue", "green", "cat", "dog", "sings", "café", "naïve", "straße", "ñandú",
         "Ελλάδα", "кошка", "東京", "猫", "音楽", "🙂", "🎵", "über", "façade", "jalapeño", "mañana")


@dataclass(frozen=True)
class ScaleSettings:
    """What one run measures."""

    sizes: tuple[int, ...]  # samples per run, smallest first; ratios are against the smallest
    image_size: int  # generated images and preprocess.image_size (the tokenizer matches)
    cores: int  # in-process Ray num_cpus, preprocess and tokenize actors at most
    root: str  # cached sample folders and the per-size work directories
    seed: int  # of the generated samples
    interval_s: float  # memory sampling period, parent (process tree) and child (object store)
    keep_outputs: bool  # keep each size's stage outputs (preprocess at 16k, 64 px: ~1.5 GB)


# -- samples ---------------------------------------------------------------------------------


def make_sample(index: int, seed: int, image_size: int) -> dict[str, bytes]:
    """One aligned sample as file contents by extension: jpg, flac, txt, json.

    Deterministic in ``(seed, index)``: a colour gradient with a few shapes, 1-2 s of tones in
    noise (mono or stereo, 16 or 22.05 kHz), a caption of 3-12 words, a split.
    """
    import soundfile
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index])
    ramp = np.linspace(0.0, 1.0, image_size, dtype=np.float32)
    corners = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    pixels = (corners[0] * (1 - ramp)[:, None, None] + corners[1] * ramp[None, :, None])
    image = Image.fromarray(pixels.astype(np.uint8))  # (S, S, 3): a diagonal-ish gradient
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = rng.integers(0, image_size, 2)
        x1, y1 = x0 + rng.integers(4, image_size // 2 + 5), y0 + rng.integers(4, image_size // 2 + 5)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((int(x0), int(y0), int(x1), int(y1)), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    jpg = io.BytesIO()
    image.save(jpg, "JPEG", quality=90)

    rate = int(rng.choice([16000, 22050]))
    t = np.arange(int(rate * rng.uniform(1.0, 2.0))) / rate
    tones = sum(rng.uniform(0.1, 0.3) * np.sin(2 * np.pi * rng.uniform(100, 2000) * t
                                               + rng.uniform(0, 2 * np.pi))
                for _ in range(int(rng.integers(1, 4))))
    wave = tones * np.minimum(1.0, 10 * t) + 0.01 * rng.standard_normal(len(t))  # fade in
    if rng.random() < 0.5:  # stereo: the second channel quieter and noisier
        wave = np.stack([wave, 0.7 * wave + 0.01 * rng.standard_normal(len(t))], axis=1)
    flac = io.BytesIO()
    soundfile.write(flac, np.clip(wave, -1, 1).astype(np.float32), rate, format="FLAC",
                    subtype="PCM_16")

    caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 13))))
    split = "val" if rng.random() < VAL_FRACTION else "train"
    meta = {"split": split, "index": index}
    return {"jpg": jpg.getvalue(), "flac": flac.getvalue(), "txt": caption.encode(),
            "json": json.dumps(meta, ensure_ascii=False).encode()}


def ensure_samples(n: int, image_size: int, seed: int, root: Path) -> Path:
    """The folder of ``n`` generated samples, made once; a later call with the same spec reuses
    it. Returns the folder that ingest reads (``.../samples``)."""
    folder = root / f"scale-data-{n}-px{image_size}"
    spec = {"version": DATA_VERSION, "samples": n, "image_size": image_size, "seed": seed}
    spec_file = folder / "spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        return folder / "samples"
    shutil.rmtree(folder, ignore_errors=True)  # another spec, or an interrupted generation
    partial = folder / "samples.partial"
    partial.mkdir(parents=True)
    print(f"generating {n} samples at {image_size} px into {folder}", file=sys.stderr, flush=True)
    for index in range(n):
        for ext, data in make_sample(index, seed, image_size).items():
            (partial / f"{index:07d}.{ext}").write_bytes(data)
    partial.rename(folder / "samples")
    spec_file.write_text(json.dumps(spec) + "\n")  # last: its presence means complete
    return folder / "samples"


# -- the child: three stages in a fresh process ----------------------------------------------


class StorePoller:
    """Polls the object store's bytes in use and spilled while Ray runs in this process.

    Starts polling once Ray is initialized (the first stage call starts it); ``samples`` holds
    ``[unix time, bytes in use, bytes spilled so far]``.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.samples: list[list[float]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        while not ray.is_initialized():
            if self._stop.wait(0.1):
                return
        try:
            state = get_state_from_address(ray.get_runtime_context().gcs_address)
            while not self._stop.is_set():
                stats = get_memory_info_reply(state, timeout_seconds=10).store_stats
                self.samples.append([time.time(), int(stats.object_store_bytes_used),
                                     int(stats.spilled_bytes_total)])
                self._stop.wait(self.interval_s)
        except Exception as err:  # noqa: BLE001 - a private API; report, do not fail the run
            self.error = f"{type(err).__name__}: {err}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def preprocess_config(image_size: int, cores: int) -> dict[str, Any]:
    """The preprocess stage's config at ``image_size``: the demo's audio and text settings."""
    return {"image_size": image_size, "sample_rate": 8000, "audio_samples": 20000,
            "text_max_len": 64, "num_actors": cores}


def save_untrained_tokenizer(data_dir: Path, pre: dict[str, Any], out: Path) -> Path:
    """An untrained tiny tokenizer matching the preprocessed data, saved as a train stage output
    would be (``out/tokenizer`` and a stage record naming its weights, which tokenize's
    fingerprint reads); returns ``out``."""
    from dataclasses import replace

    import torch

    from mmvq.config import TokenizerConfig
    from mmvq.tokenizer import MultimodalTokenizer
    from pipeline.formats.checkpoint import TOKENIZER_DIR
    from pipeline.formats.preprocessed import model_config_for_data
    from pipeline.stage import STAGE_RECORD

    base = TokenizerConfig()
    config = replace(base, image=replace(base.image, image_size=pre["image_size"]),
                     audio=replace(base.audio, sample_rate=pre["sample_rate"],
                                   num_samples=pre["audio_samples"]),
                     text=replace(base.text, max_len=pre["text_max_len"]))
    config, _ = model_config_for_data(config, data_dir)  # checked and sized as train does
    torch.manual_seed(0)
    model = MultimodalTokenizer(config)
    model.save(out / TOKENIZER_DIR)
    record = {"stage": "train", "fingerprint": f"untrained-{model.weights_hash()[:16]}",
              "summary": {"untrained": True, "note": "workflows.bench_scale"}}
    (out / STAGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out


def _accounting(stage: str, summary: dict[str, Any], data_dir: Path | None) -> dict[str, int]:
    """``in``, ``out``, ``quarantined`` of one stage from its summary (tokenize: its input is
    the preprocessed rows on disk, its output the token rows per split; it quarantines none)."""
    counts = summary["counts"]
    if stage != "tokenize":
        return {"in": int(counts["in"]), "out": int(counts["out"]),
                "quarantined": int(counts["quarantined"])}
    from pipeline.sinks import rows_in

    assert data_dir is not None
    read = sum(rows_in(data_dir / split) for split in counts)
    return {"in": read, "out": int(sum(counts.values())), "quarantined": 0}


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _timed_stage(stage: str, config: dict[str, Any], inputs: dict[str, str], data_root: Path,
                 ray: Any, data_dir: Path | None = None) -> dict[str, Any]:
    """Run one stage; its window on the shared clock, seconds, output and counts."""
    from workflows.run import run_single_stage

    began = time.time()
    result = run_single_stage(stage, config, inputs, data_root=data_root, ray=ray, progress=False)
    ended = time.time()
    if result.reused:
        raise RuntimeError(f"{stage} was reused from {result.output}: nothing was measured")
    return {"stage": stage, "seconds": result.seconds, "call_seconds": ended - began,
            "start": began, "end": ended, "output": str(result.output),
            "output_bytes": _bytes_under(result.output),
            **_accounting(stage, result.summary, data_dir)}


def run_child(n: int, settings: ScaleSettings, out: Path) -> None:
    """Ingest, preprocess and tokenize ``n`` samples in this process; write the record to
    ``out`` as JSON (stage windows and counts, the object store series)."""
    import ray as ray_module

    from workflows.spec import RayConfig

    source = ensure_samples(n, settings.image_size, settings.seed, Path(settings.root))
    work = Path(settings.root) / f"scale-work-{n}-px{settings.image_size}"
    shutil.rmtree(work, ignore_errors=True)  # a fresh data root: no stage is reused
    data_root, ray = work / "data", RayConfig(num_cpus=settings.cores)
    pre = preprocess_config(settings.image_size, settings.cores)
    poller = StorePoller(settings.interval_s)
    load_start = os.getloadavg()
    poller.start()  # polls from the first stage call on, which starts Ray
    try:
        ingest = _timed_stage("ingest", {"source": str(source)}, {}, data_root, ray)
        preprocess = _timed_stage("preprocess", pre, {"shards": ingest["output"]}, data_root, ray)
        data = Path(preprocess["output"])
        model = save_untrained_tokenizer(data, pre, work / "model")  # outside the windows
        tokenize = _timed_stage("tokenize", {"num_actors": settings.cores},
                                {"data": str(data), "model": str(model)}, data_root, ray, data)
    finally:
        poller.stop()
        ray_module.shutdown()
    if not settings.keep_outputs:
        shutil.rmtree(work, ignore_errors=True)
    record = {"samples": n, "stages": [ingest, preprocess, tokenize], "store": poller.samples,
              "store_error": poller.error, "load_start": load_start,
              "load_end": os.getloadavg()}
    out.write_text(json.dumps(record) + "\n")


# -- the parent: memory of the child's process tree ------------------------------------------


def _status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem of one process in bytes (kernel counters)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[name] = int(rest.split()[0]) * 1024
    return fields


def _pss(pid: int) -> int:
    """PSS of one process in bytes (walks its page tables: costly for Ray workers)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no Pss in /proc/{pid}/smaps_rollup")


def _descendants(root: int, seen: dict[int, int] | None = None) -> tuple[list[int], float]:
    """``root`` and every process below it (from the parent ids in ``/proc/PID/stat``), and the
    CPU seconds the tree has used: user + system time of each process, counted at the last
    reading it was alive in. ``seen`` carries those last readings from one call to the next, so
    a process that exited (an actor of the previous stage) keeps what it used and the total
    never falls; its reaped children's times (cutime) are not added, which would count them
    twice."""
    children, ticks = process_table()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    seen = {} if seen is None else seen
    for pid in tree:
        seen[pid] = max(seen.get(pid, 0), ticks.get(pid, 0))
    return tree, sum(seen.values()) / os.sysconf("SC_CLK_TCK")


def _label(pid: int) -> str:
    """A short name for a process: Ray sets worker titles such as ``ray::MapWorker(...)``;
    Python processes are named by the module or script they run."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return "?"
    words = [w for w in command.replace("\0", " ").split() if w]
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return " ".join(words)[:48]
    head = Path(words[0]).name
    if head.startswith("python"):
        rest = [w for w in words[1:] if not w.startswith("-")]
        head = f"python {Path(rest[0]).name}" if rest else head
    return head[:48]


def tree_sample(root_pid: int, with_pss: bool = False,
                seen: dict[int, int] | None = None) -> dict[str, Any] | None:
    """One reading of the process tree under ``root_pid``: time, CPU seconds used so far, summed
    RSS, anonymous, file and shared-memory RSS (and PSS if ``with_pss``, else None), and
    anonymous RSS and the count of processes by label; None once the root has exited."""
    if not Path(f"/proc/{root_pid}").exists():
        return None
    pids, cpu = _descendants(root_pid, seen)
    total: dict[str, Any] = {"t": time.time(), "cpu": cpu, "rss": 0, "anon": 0, "file": 0,
                             "shmem": 0, "pss": 0 if with_pss else None, "by_process": {}}
    for pid in pids:
        try:
            fields = _status(pid)
            pss = _pss(pid) if with_pss else 0
        except (OSError, ValueError):  # exited meanwhile (a zombie has no RssAnon)
            continue
        if "RssAnon" not in fields:
            continue
        total["rss"] += fields["VmRSS"]
        total["anon"] += fields["RssAnon"]
        total["file"] += fields["RssFile"]
        total["shmem"] += fields["RssShmem"]
        if with_pss:
            total["pss"] += pss
        entry = total["by_process"].setdefault(_label(pid), {"bytes": 0, "processes": 0})
        entry["bytes"] += fields["RssAnon"]
        entry["processes"] += 1
    return total


class TreeSampler:
    """Readings of a process tree every ``interval_s``; PSS in at most ``pss_share`` of the
    time (after a PSS reading that took ``d`` seconds, the next waits ``d / pss_share``)."""

    def __init__(self, root_pid: int, interval_s: float, pss_share: float = 0.1) -> None:
        self.root_pid, self.interval_s, self.pss_share = root_pid, interval_s, pss_share
        self.readings: list[dict[str, Any]] = []
        self.seconds = 0.0  # spent reading /proc (CPU taken from what is measured)
        self._next_pss = 0.0
        self._seen: dict[int, int] = {}  # pid -> its CPU ticks when last seen alive

    def tick(self) -> None:
        began = time.time()
        with_pss = began >= self._next_pss
        reading = tree_sample(self.root_pid, with_pss, self._seen)
        took = time.time() - began
        if with_pss:
            self._next_pss = began + took / self.pss_share
        if reading is not None and reading["rss"]:
            self.readings.append(reading)
        self.seconds += took


def combine(tree: list[dict[str, Any]], store: list[list[float]]) -> list[dict[str, Any]]:
    """Each tree reading with the object store's bytes in use at that moment (the latest store
    sample at or before it; 0 before the first) and ``memory`` = anonymous RSS + store bytes."""
    times = [s[0] for s in store]
    combined = []
    for reading in tree:
        at = bisect.bisect_right(times, reading["t"]) - 1
        in_store = int(store[at][1]) if at >= 0 else 0
        combined.append({**reading, "store": in_store,
                         "memory": reading["anon"] + in_store})
    return combined


def peak(readings: list[dict[str, Any]], start: float = 0.0,
         end: float = float("inf")) -> dict[str, Any] | None:
    """The reading with the largest ``memory`` between ``start`` and ``end``, None if none."""
    window = [r for r in readings if start <= r["t"] <= end]
    return max(window, key=lambda r: r["memory"]) if window else None


def measure_size(n: int, settings: ScaleSettings) -> dict[str, Any]:
    """Run one size in a fresh process; returns its stages, totals and memory peaks."""
    ensure_samples(n, settings.image_size, settings.seed, Path(settings.root))  # untimed
    record_file = Path(settings.root) / f"scale-record-{n}-px{settings.image_size}.json"
    record_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "workflows.bench_scale", "--child", str(n),
               "--child-record", str(record_file), *_settings_argv(settings)]
    began = time.time()
    # The child's console goes to stderr (file descriptor 2): stdout is this script's table.
    child = subprocess.Popen(command, stdout=2,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sampler = TreeSampler(child.pid, settings.interval_s)
    try:
        while child.poll() is None:
            tick = time.time()
            sampler.tick()
            time.sleep(max(0.0, settings.interval_s - (time.time() - tick)))
    except BaseException:  # interrupted: stop the child (Ray's daemons share its fate)
        child.terminate()
        child.wait(timeout=60)
        raise
    wall = time.time() - began
    if child.returncode:
        raise RuntimeError(f"size {n}: the benchmark process failed (exit {child.returncode})")
    record = json.loads(record_file.read_text())
    record_file.unlink()
    result = summarize(record, combine(sampler.readings, record["store"]), wall)
    result["sampler_seconds"] = sampler.seconds  # time this process spent reading /proc
    return result


def summarize(record: dict[str, Any], readings: list[dict[str, Any]],
              wall: float) -> dict[str, Any]:
    """Per stage and per size: seconds, seconds per sample, peaks, counts."""
    n = record["samples"]
    stages = []
    for s in record["stages"]:
        top = peak(readings, s["start"], s["end"])
        cpu = cpu_seconds(readings, s["start"], s["end"])
        stages.append({**{k: v for k, v in s.items() if k != "output"},
                       "seconds_per_sample": s["seconds"] / n,
                       "cpu_seconds": cpu, "cpu_seconds_per_sample": None if cpu is None
                       else cpu / n,
                       "peak_memory_bytes": top["memory"] if top else None,
                       "peak_store_bytes": max((r["store"] for r in readings
                                                if s["start"] <= r["t"] <= s["end"]), default=0),
                       "peak_by_process": _by_process(top)})
    seconds = sum(s["seconds"] for s in stages)
    cpu = [s["cpu_seconds"] for s in stages]
    cpu_total = None if None in cpu else sum(cpu)
    top = peak(readings)
    spilled = max((s[2] for s in record["store"]), default=None)
    return {
        "samples": n, "seconds": seconds, "seconds_per_sample": seconds / n, "wall_seconds": wall,
        "cpu_seconds": cpu_total,
        "cpu_seconds_per_sample": None if cpu_total is None else cpu_total / n,
        # Other users' load during this size: the stages' times are only as good as it is low.
        "load_average": {"start": record.get("load_start"), "end": record.get("load_end")},
        "peak_memory_bytes": top["memory"] if top else None,
        "peak_pss_bytes": max((r["pss"] for r in readings if r["pss"] is not None),
                              default=None),
        "pss_samples": sum(r["pss"] is not None for r in readings),
        "peak_rss_bytes": max((r["rss"] for r in readings), default=None),
        "peak_store_bytes": max((r["store"] for r in readings), default=None),
        "spilled_bytes": spilled, "store_error": record["store_error"],
        "peak_at": _where(top, stages),
        "peak_by_process": _by_process(top),
        "memory_samples": len(readings), "store_samples": len(record["store"]),
        "stages": stages,
    }


def cpu_seconds(readings: list[dict[str, Any]], start: float, end: float) -> float | None:
    """CPU seconds the tree used between the first and last reading in ``[start, end]`` (None
    with fewer than two): the work done, less sensitive than seconds to others' load."""
    window = [r for r in readings if start <= r["t"] <= end]
    return window[-1]["cpu"] - window[0]["cpu"] if len(window) > 1 else None


def _by_process(top: dict[str, Any] | None) -> dict[str, dict[str, int]]:
    """The breakdown of one reading by process label, largest first, with the object store."""
    if top is None:
        return {}
    parts = {**top["by_process"], "(object store, in use)": {"bytes": top["store"],
                                                              "processes": 0}}
    return dict(sorted(parts.items(), key=lambda kv: -kv[1]["bytes"]))


def _where(top: dict[str, Any] | None, stages: list[dict[str, Any]]) -> str:
    if top is None:
        return "?"
    for s in stages:
        if s["start"] <= top["t"] <= s["end"]:
            return s["stage"]
    return "between stages"


def ratios(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Largest size against the smallest: seconds per sample and peak memory, with verdicts."""
    small, large = runs[0], runs[-1]
    seconds = large["seconds_per_sample"] / small["seconds_per_sample"]
    memory = (large["peak_memory_bytes"] / small["peak_memory_bytes"]
              if small["peak_memory_bytes"] and large["peak_memory_bytes"] else None)
    cpu = (large["cpu_seconds_per_sample"] / small["cpu_seconds_per_sample"]
           if small.get("cpu_seconds_per_sample") and large.get("cpu_seconds_per_sample")
           else None)
    return {"from": small["samples"], "to": large["samples"],
            "seconds_per_sample": seconds, "seconds_target": TARGET_SECONDS_RATIO,
            "cpu_seconds_per_sample": cpu,  # no target; the same work measured without others' load
            "seconds_met": seconds <= TARGET_SECONDS_RATIO,
            "peak_memory": memory, "memory_target": TARGET_MEMORY_RATIO,
            "memory_met": memory is not None and memory <= TARGET_MEMORY_RATIO}


def fit(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per stage, least squares ``seconds = fixed + per_sample * N`` over the sizes (two or
    more sizes): the start-up each stage pays once, and its cost per sample."""
    if len(runs) < 2:
        return {}
    sizes = np.array([r["samples"] for r in runs], dtype=float)
    result = {}
    for i, stage in enumerate(STAGES):
        seconds = np.array([r["stages"][i]["seconds"] for r in runs])
        per_sample, fixed = np.polyfit(sizes, seconds, 1)
        result[stage] = {"fixed_s": float(fixed), "per_sample_s": float(per_sample)}
    return result


def run(settings: ScaleSettings) -> dict[str, Any]:
    """Measure every size, smallest first; runs, ratios and the per-stage fit as plain data."""
    runs = [measure_size(n, settings) for n in settings.sizes]
    return {"runs": runs, "ratios": ratios(runs), "fit": fit(runs)}


# -- reporting ---------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    """Per size and stage as Markdown, then the ratios against the targets."""
    lines = [("| N | stage | s | ms/sample | CPU ms/sample | in = out + quarantined | peak MiB "
              "| store peak MiB | output MiB |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        for s in r["stages"]:
            lines.append(f"| {r['samples']} | {s['stage']} | {s['seconds']:.1f} "
                         f"| {1000 * s['seconds_per_sample']:.2f} "
                         f"| {_ms(s.get('cpu_seconds_per_sample'))} "
                         f"| {s['in']} = {s['out']} + {s['quarantined']} "
                         f"| {_mib(s['peak_memory_bytes'])} | {_mib(s['peak_store_bytes'])} "
                         f"| {_mib(s['output_bytes'])} |")
        load = r.get("load_average", {}).get("start")
        lines.append(f"| {r['samples']} | **total** | {r['seconds']:.1f} "
                     f"| {1000 * r['seconds_per_sample']:.2f} "
                     f"| {_ms(r.get('cpu_seconds_per_sample'))} | | "
                     f"{_mib(r['peak_memory_bytes'])} (PSS {_mib(r['peak_pss_bytes'])}, at "
                     f"{r['peak_at']}) | {_mib(r['peak_store_bytes'])} "
                     f"| wall {r['wall_seconds']:.0f} s, load {_num(load and load[0])} |")
    q = result["ratios"]
    verdict = {True: "met", False: "missed"}
    lines += ["", f"| {q['to']} vs {q['from']} | ratio | target | verdict |",
              "| --- | --- | --- | --- |"]
    lines.append(f"| seconds per sample | {q['seconds_per_sample']:.2f} "
                 f"| <= {q['seconds_target']} | {verdict[q['seconds_met']]} |")
    lines.append(f"| peak memory | {_num(q['peak_memory'])} | <= {q['memory_target']} "
                 f"| {verdict[q['memory_met']]} |")
    lines.append(f"| CPU seconds per sample | {_num(q.get('cpu_seconds_per_sample'))} | - | - |")
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.2f}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# -- command line ------------------------------------------------------------------------------


def _settings_argv(settings: ScaleSettings) -> list[str]:
    """The flags that give a child process the same settings."""
    argv = ["--sizes", *map(str, settings.sizes), "--image-size", str(settings.image_size),
            "--cores", str(settings.cores), "--root", settings.root, "--seed", str(settings.seed),
            "--interval", str(settings.interval_s)]
    return argv + (["--keep-outputs"] if settings.keep_outputs else [])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Each size runs in a fresh process; samples are generated once per size and "
        "cached under --root. Prints a Markdown table; --out gets the JSON.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000],
                        help="samples per run (default 1000 4000 16000); ratios compare the "
                        "largest with the smallest")
    parser.add_argument("--image-size", type=int, default=64,
                        help="side of the generated images and preprocess.image_size (default 64)")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                        help="in-process Ray num_cpus and actors per stage (default: the usable "
                        "cores)")
    parser.add_argument("--root", type=Path, default=Path("runs/bench"),
                        help="where sample folders are cached and stages write (default "
                        "runs/bench)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated samples")
    parser.add_argument("--interval", type=float, default=0.5,
                        help="memory sampling period in seconds (default 0.5)")
    parser.add_argument("--keep-outputs", action="store_true",
                        help="keep each size's stage outputs under ROOT/scale-work-N-pxS")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/scale.json"),
                        help="JSON results (default runs/bench/scale.json)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-record", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(*args.sizes, args.image_size, args.cores) < 1 or args.interval <= 0:
        parser.error("--sizes, --image-size, --cores and --interval must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the benchmark, print the table, write the JSON; returns the results."""
    args = parse_args(argv)
    settings = ScaleSettings(tuple(sorted(set(args.sizes))), args.image_size, args.cores,
                             str(args.root), args.seed, args.interval, args.keep_outputs)
    if args.child is not None:  # one size, inside the fresh process measure_size started
        run_child(args.child, settings, args.child_record)
        return None
    result = {"meta": run_meta(
        "workflows.bench_scale", settings, argv,
        memory_total_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        memory="peak of sum(RssAnon) over the process tree + object store bytes in use "
               "(raylet FormatGlobalMemoryInfo store_stats.object_store_bytes_used) at the same "
               "moment; PSS (smaps_rollup) beside it, at most 10% of the time"), **run(settings)}
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
