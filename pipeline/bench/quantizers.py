"""Quantizer forward+backward throughput: mmvq's EMA VectorQuantizer vs vector-quantize-pytorch.

Both run in training mode with the baseline's defaults (EMA codebook updates with its ``decay``,
the rotation trick) on the same random tokens in the same process; a step is a forward pass and
the backward pass of ``quantized.sum() + commitment loss``. Reports the median of repeated steps
after warm-up, the ratio ours / theirs, and the peak extra memory of a step. A last check runs
K = 65536 codes to show that mmvq's blocked search keeps its memory far below one N x K distance
matrix.

    python -m pipeline.bench.quantizers [--device cpu|cuda] [--tokens N] [--out results.json]
        [--small]

Install the baseline with ``pip install vector-quantize-pytorch``; without it the script says so
and times mmvq alone.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from mmvq.quantizers import VectorQuantizer

BASELINE = "vector-quantize-pytorch"
BASELINE_DECAY = 0.8  # VectorQuantize's default; ours uses the same so both do the same work
# (K, D, cosine) as in BENCHMARKS.md: two codebook sizes, a narrow and a wide code, cosine at 8.
CASES = [(1024, 8, False), (1024, 256, False), (16384, 8, False), (16384, 256, False),
         (16384, 8, True)]
SMALL_CASES = [(64, 8, False), (256, 32, True)]
MEMORY_CASE = (65536, 8)  # K, D of the memory check
# The baseline's training step holds about three N x K fp32 matrices (distances, one-hot, the
# one-hot product); skip it in the memory check when those would exceed this.
BASELINE_MEMORY_LIMIT = 4 * 2**30


@dataclass(frozen=True)
class BenchSettings:
    """What one run measures."""

    device: str  # "cpu" or "cuda"
    tokens: int  # vectors per step (BENCHMARKS.md: 16,384)
    warmup: int  # untimed steps first: allocator, kernel selection, first k-means-free updates
    repeats: int  # timed steps; the median is reported
    cases: tuple[tuple[int, int, bool], ...]
    memory_codes: int  # K of the memory check


@dataclass
class Row:
    """One measurement."""

    impl: str
    codebook_size: int
    dim: int
    cosine: bool
    tokens: int
    status: str = "ok"  # or why it did not run
    median_s: float | None = None
    tokens_per_s: float | None = None
    peak_extra_bytes: int | None = None  # above the memory in use before the step


# -- the two quantizers --------------------------------------------------------------------------


def baseline_version() -> str | None:
    """Installed vector-quantize-pytorch version, or None."""
    try:
        return metadata.version(BASELINE)
    except metadata.PackageNotFoundError:
        return None


def make_ours(k: int, d: int, cosine: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    # The baseline's defaults, matched: EMA with its decay, and the rotation trick (on there by
    # default for D > 1).
    q = VectorQuantizer(k, d, l2_normalize=cosine, ema=True, decay=BASELINE_DECAY,
                        rotation_trick=True).train()

    def step(z: torch.Tensor) -> torch.Tensor:
        out = q(z)
        return out.quantized.sum() + out.commit_loss

    return _with_module(q, step)


def make_theirs(k: int, d: int, cosine: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    from vector_quantize_pytorch import VectorQuantize

    q = VectorQuantize(dim=d, codebook_size=k, decay=BASELINE_DECAY, use_cosine_sim=cosine)

    def step(z: torch.Tensor) -> torch.Tensor:
        quantized, _, loss = q(z)
        return quantized.sum() + loss.sum()

    return _with_module(q.train(), step)


def _with_module(module: torch.nn.Module, step: Callable) -> Callable:
    step.module = module  # build() moves it to the device of the tokens
    return step


# -- measuring ---------------------------------------------------------------------------------


def time_step(step: Callable, z: torch.Tensor) -> float:
    """Seconds of one forward+backward (CUDA events on a GPU, wall clock on the CPU)."""
    z.grad = None
    if z.device.type != "cuda":
        began = time.perf_counter()
        step(z).backward()
        return time.perf_counter() - began
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step(z).backward()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1000


def interleaved_medians(steps: dict[str, Callable], z: torch.Tensor,
                        settings: BenchSettings) -> dict[str, float]:
    """Median step time per implementation; the implementations take turns step by step, so
    that load from other processes on a shared machine falls on both alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(settings.warmup + settings.repeats):
        for name, step in steps.items():
            elapsed = time_step(step, z)
            if i >= settings.warmup:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_extra_memory(step: Callable, z: torch.Tensor) -> int | None:
    """Peak bytes above the starting point during one step (CUDA allocator or CPU RSS)."""
    z.grad = None
    if z.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(z).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not _reset_peak_rss():
        return None
    base = _status_kib("VmRSS")
    step(z).backward()
    return (_status_kib("VmHWM") - base) * 1024


def _reset_peak_rss() -> bool:
    """Drop freed heap pages, then reset the peak RSS (VmHWM) to the current RSS (Linux)."""
    try:
        # Freed memory left resident in the heap would be reused without raising the RSS.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def build(impl: str, case: tuple[int, int, bool], device: str) -> Callable:
    """The step function of ``impl`` for ``case``, its module on ``device``."""
    step = (make_ours if impl == "mmvq" else make_theirs)(*case)
    step.module.to(device)
    return step


def tokens_for(case: tuple[int, int, bool], settings: BenchSettings) -> torch.Tensor:
    """The same random tokens for both implementations: (1, N, D), requires grad."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, settings.tokens, case[1], generator=gen)
    return z.to(settings.device).requires_grad_()


def run(settings: BenchSettings) -> dict[str, Any]:
    """Time every case, then take every step's peak memory, then the large-K memory check."""
    timed = []
    for case in settings.cases:
        z = tokens_for(case, settings)
        impls = ["mmvq"] + ([BASELINE] if baseline_version() else [])
        steps = {impl: build(impl, case, settings.device) for impl in impls}
        timed.append((case, z, steps, interleaved_medians(steps, z, settings)))
    _return_large_allocations_to_the_os()  # only now: it slows allocation, so not while timing
    rows = []
    for case, z, steps, medians in timed:
        rows += [Row(impl, *case, settings.tokens, median_s=medians[impl],
                     tokens_per_s=settings.tokens / medians[impl],
                     peak_extra_bytes=peak_extra_memory(step, z))
                 for impl, step in steps.items()]
        if BASELINE not in steps:
            rows.append(Row(BASELINE, *case, settings.tokens, status="not installed"))
    return {"rows": [asdict(r) for r in rows], "memory_check": memory_check(settings)}


def _return_large_allocations_to_the_os() -> bool:
    """glibc: serve allocations >= 64 KiB by mmap and unmap them when freed.

    Otherwise freed buffers stay in the heap, already resident, and a later step that reuses
    them raises no RSS peak: the CPU memory numbers would depend on what ran before.
    """
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024) == 1  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def memory_check(settings: BenchSettings) -> list[dict[str, Any]]:
    """Peak extra memory of one step at a large K: mmvq, and the baseline where it fits."""
    case = (settings.memory_codes, MEMORY_CASE[1], False)
    z = tokens_for(case, settings)
    full_matrix = settings.tokens * settings.memory_codes * 4  # one N x K fp32 matrix
    rows = [_memory_row("mmvq", case, z)]
    if baseline_version() is None:
        rows.append(asdict(Row(BASELINE, *case, settings.tokens, status="not installed")))
    elif 3 * full_matrix > BASELINE_MEMORY_LIMIT:
        rows.append(asdict(Row(BASELINE, *case, settings.tokens,
                               status=f"skipped: needs ~{3 * full_matrix / 2**30:.0f} GiB")))
    else:
        rows.append(_memory_row(BASELINE, case, z))
    for row in rows:
        row["full_distance_matrix_bytes"] = full_matrix
    return rows


def _memory_row(impl: str, case: tuple[int, int, bool], z: torch.Tensor) -> dict[str, Any]:
    step = build(impl, case, str(z.device))
    time_step(step, z)  # warm-up: the first step's one-off allocations are not the bound
    return asdict(Row(impl, *case, z.shape[1], peak_extra_bytes=peak_extra_memory(step, z)))


# -- reporting ---------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table, with the ratio ours / theirs per case."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in result["rows"]:
        by_case.setdefault((row["codebook_size"], row["dim"], row["cosine"]), {})[row["impl"]] = row
    lines = ["| K | D | lookup | mmvq Mtok/s | vqp Mtok/s | ratio | mmvq peak MiB | vqp peak MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (k, d, cosine), impls in by_case.items():
        ours, theirs = impls["mmvq"], impls[BASELINE]
        ratio = (f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x"
                 if theirs["tokens_per_s"] else theirs["status"])
        lines.append(f"| {k} | {d} | {'cosine' if cosine else 'L2'} | "
                     f"{_mtok(ours)} | {_mtok(theirs)} | {ratio} | {_mib(ours)} | {_mib(theirs)} |")
    lines += ["", "| memory check | K | D | peak extra MiB | one N x K matrix MiB |",
              "| --- | --- | --- | --- | --- |"]
    for row in result["memory_check"]:
        peak = _mib(row) if row["status"] == "ok" else row["status"]
        lines.append(f"| {row['impl']} | {row['codebook_size']} | {row['dim']} | {peak} | "
                     f"{row['full_distance_matrix_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def _mtok(row: dict) -> str:
    return f"{row['tokens_per_s'] / 1e6:.3f}" if row["tokens_per_s"] else row["status"]


def _mib(row: dict) -> str:
    return "n/a" if row["peak_extra_bytes"] is None else f"{row['peak_extra_bytes'] / 2**20:.1f}"


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Full size (BENCHMARKS.md's cases at 16,384 tokens) or ``--small`` (seconds, for tests)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.small:
        return BenchSettings(args.device, args.tokens or 256, warmup=1, repeats=2,
                             cases=tuple(SMALL_CASES), memory_codes=4096)
    return BenchSettings(args.device, args.tokens or 16384, warmup=2, repeats=5,
                         cases=tuple(CASES), memory_codes=MEMORY_CASE[0])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tokens", type=int, default=None, help="vectors per step")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for a smoke test")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write JSON if asked; returns the results."""
    args = parse_args(argv)
    settings = settings_from_args(args)
    version = baseline_version()
    if version is None:
        print(f"{BASELINE} is not installed (pip install {BASELINE}): timing mmvq only.",
              file=sys.stderr)
    result = {"meta": _meta(settings, version, argv), **run(settings)}
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _meta(settings: BenchSettings, version: str | None, argv: list[str] | None) -> dict:
    device_name = (torch.cuda.get_device_name() if settings.device == "cuda"
                   else platform.processor() or platform.machine())
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m pipeline.bench.quantizers " + " ".join(argv or sys.argv[1:]),
        "device": settings.device, "device_name": device_name,
        "torch": torch.__version__, BASELINE: version, "threads": torch.get_num_threads(),
        "settings": asdict(settings),
    }


if __name__ == "__main__":
    main()
