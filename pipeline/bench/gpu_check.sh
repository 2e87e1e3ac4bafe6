#!/usr/bin/env bash
# Every number of issue 8 in one call on a lent GPU machine (H100 or H200):
#
#   device tool: run  command="bash pipeline/bench/gpu_check.sh"  timeout_s=590
#
# Writes $OUT/env.txt (GPU, driver, versions), $OUT/gpu.log (progress and the final table) and
# $OUT/gpu.json (rewritten after every row, so a run cut short keeps what it measured).
#
# Nothing is installed. The device image's python3 already holds torch 2.11.0+cu130 (the
# project's pin), torchvision, torchaudio, einops, safetensors and numpy, which is all that mmvq
# and this benchmark import; `pip install -e .` would fail there (the package pins Python 3.11
# and Ray/MLflow, and the machine reaches no registry), so the checkout goes on PYTHONPATH.
#
# Settings (environment): BUDGET_S no row starts after this many seconds (default 400, so the
# run ends well inside the 10-minute limit even when the last row compiles); REPEATS, WARMUP
# timed and untimed calls per row (default 10, 3); VARIANTS (default fp32-eager,fast,bf16-eager;
# also fast-nchw); SECTIONS (default ceiling,quantizer,train,encode); BATCH train batch (32);
# PYTHON (python3); EXTRA_ARGS appended to the benchmark's arguments (e.g. a dry run on a CPU:
# EXTRA_ARGS="--device cpu --small --threads 1").
set -euo pipefail

OUT="${OUT:-runs/bench}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv \
    || echo "nvidia-smi failed"
  "$PY" - <<'EOF'
import sys, torch, torchvision, torchaudio, einops, safetensors
print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision",
      torchvision.__version__, "torchaudio", torchaudio.__version__)
if torch.cuda.is_available():
    print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name(),
          "capability", torch.cuda.get_device_capability())
else:
    print("WARNING: torch sees no CUDA device")
if not torch.__version__.startswith("2.11."):
    print("WARNING: torch is not the pinned 2.11; numbers are not comparable to the reference")
EOF
} 2>&1 | tee "$OUT/env.txt"

args=(--device cuda --out "$OUT/gpu.json" --budget-s "${BUDGET_S:-400}"
      --warmup "${WARMUP:-3}" --repeats "${REPEATS:-10}")
[[ -n "${VARIANTS:-}" ]] && args+=(--variants "$VARIANTS")
[[ -n "${SECTIONS:-}" ]] && args+=(--sections "$SECTIONS")
[[ -n "${BATCH:-}" ]] && args+=(--batch "$BATCH")
# shellcheck disable=SC2206  # word splitting of EXTRA_ARGS is the point
[[ -n "${EXTRA_ARGS:-}" ]] && args+=($EXTRA_ARGS)

"$PY" -m pipeline.bench.gpu "${args[@]}" 2>&1 | tee "$OUT/gpu.log"
