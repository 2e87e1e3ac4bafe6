# Two commands do all set-up: `make demo` and `make test`. Both create .venv when it is missing and
# install the project into it once; the stamp file makes a second run skip the install.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mmvq-installed
# The demo keeps everything it writes (shards, checkpoints, tokens, MLflow store) under here.
DEMO_ROOT ?= runs/demo
UI_PORT ?= 5000

.PHONY: demo test bench bench-data bench-scale bench-train bench-fusion bench-gpu services-up services-down status lint ui clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH, or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)  ## set up, then run the demo workflow end to end (in-process Ray, MLflow in SQLite)
	$(BIN)/mmvq run workflows/demo.yaml --data-root $(DEMO_ROOT)

test: $(STAMP)  ## set up, then run the test suite (no benchmarks)
	$(BIN)/python -m pytest -q

bench: $(STAMP)  ## the benchmark-marked checks, then the quantizer and data-plane benchmarks
	$(BIN)/python -m pytest -q -m benchmark
	$(BIN)/python -m pipeline.bench.quantizers --out runs/bench/quantizers.json
	$(MAKE) bench-data

# Generates its shards once into runs/bench/dataplane-shards (about two minutes), then reuses them.
DATA_BENCH_ARGS ?= --samples 768 --image-size 64 256 --passes 3 --repeats 3
bench-data: $(STAMP)  ## data plane: pure-function floor vs webdataset+DataLoader vs our Ray Data path
	$(BIN)/python -m pipeline.bench.dataplane $(DATA_BENCH_ARGS) --out runs/bench/dataplane.json

# Generates each size's samples once into runs/bench/scale-data-N-px64 (16k: about a minute), then
# reuses them; each size runs ingest + preprocess + tokenize in a fresh process with in-process Ray.
SCALE_BENCH_ARGS ?= --sizes 1000 4000 16000 --image-size 64
bench-scale: $(STAMP)  ## scaling: ingest+preprocess+tokenize at 1k/4k/16k samples, s/sample and peak memory
	$(BIN)/python -m workflows.bench_scale $(SCALE_BENCH_ARGS) --out runs/bench/scale.json

# Makes the demo's data once into runs/bench/train-data, then alternates the train stage and the plain
# PyTorch loop on it (three runs of each, about 6 minutes on 2 cores).
TRAIN_BENCH_ARGS ?= --steps 60 --repeats 3
bench-train: $(STAMP)  ## training: the train stage (Ray Train) vs a plain PyTorch loop, same data/model/batch
	$(BIN)/python -m workflows.bench_train $(TRAIN_BENCH_ARGS) --out runs/bench/train.json

# Generates 2048 spoken scenes once into runs/bench/fusion (512 held out as the val gallery), then
# trains, tokenizes and evaluates the demo model with and without fusion (about 8 minutes per seed
# on 2 cores) and compares retrieval, NMI, joint usage and reconstruction.
FUSION_BENCH_ARGS ?= --samples 2048 --val-fraction 0.25 --seeds 0
bench-fusion: $(STAMP)  ## fusion: separate per-modality tokenizers vs the fused tokenizer, same data and schedule
	$(BIN)/python -m workflows.bench_fusion $(FUSION_BENCH_ARGS) --out runs/bench/fusion.json

# e.g. make bench-gpu GPU_BENCH_ARGS="--device cpu --small" for the seconds-long CPU version.
GPU_BENCH_ARGS ?= --device cuda
bench-gpu: $(STAMP)  ## GPU speed: train step, encode, quantizer; fp32 eager vs fast (table + JSON)
	$(BIN)/python -m pipeline.bench.gpu $(GPU_BENCH_ARGS) --out runs/bench/gpu.json

services-up: $(STAMP)  ## local Ray head (jobs on 127.0.0.1:8265) + MLflow server (127.0.0.1:5000)
	infra/local/mlflow-server.sh start runs/mlflow $(UI_PORT)
	infra/local/ray-head.sh start
	@echo "then: MLFLOW_TRACKING_URI=http://127.0.0.1:$(UI_PORT) $(BIN)/mmvq submit workflows/demo.yaml --address http://127.0.0.1:8265 --data-root $(abspath $(DEMO_ROOT))"

services-down:  ## stop what services-up started (only those processes)
	infra/local/ray-head.sh stop
	infra/local/mlflow-server.sh stop runs/mlflow

status: $(STAMP)  ## done / stale / missing per stage of the demo workflow
	$(BIN)/mmvq status workflows/demo.yaml --data-root $(DEMO_ROOT)

lint: $(STAMP)  ## ruff over the code
	$(BIN)/ruff check mmvq pipeline workflows tests

ui: $(STAMP)  ## open the MLflow UI over the demo's tracking store on 127.0.0.1
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(DEMO_ROOT))/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

clean:  ## remove the demo outputs (keeps .venv)
	rm -rf $(DEMO_ROOT)
