# `make repro` runs the pipeline, `make test` the tests; both set up .venv first. `make` lists every target.
SHELL := /bin/bash
VENV := .venv
BIN := $(abspath $(VENV))/bin
# ops/setup_venv.py: which lock (GPU=1 / GPU=0 / nvidia-smi), which Python 3.11 (PYTHON=..., found, or uv's), uv to
# install; it runs with the host's PATH (not .venv/bin first), on any python3 >= 3.8.
SETUP := PATH='$(PATH)' python3 ops/setup_venv.py --gpu '$(GPU)' --python '$(PYTHON)'
export DVC_NO_ANALYTICS := 1
export PATH := $(BIN):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help setup setup-dev repro test lint bench gpu-check demo compare predict push pull release s3-local lock

help:  ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup:  ## create or update .venv: requirements-gpu.lock if nvidia-smi lists a GPU (or GPU=1), else requirements.lock (GPU=0)
	@$(SETUP)

setup-dev:
	@$(SETUP) --dev

repro: setup  ## run the pipeline (dvc repro): COCO 2017 + cocoTraffic -> models/model.tflite
	dvc repro

test: setup-dev  ## run the test suite, offline (fixture and S3 store on 127.0.0.1)
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

lint: setup-dev  ## ruff check and format check
	ruff check . && ruff format --check .

bench: setup-dev  ## run bench/ (results in bench/out/, figures in BENCHMARKS.md); app_input and tflite need `make demo` first
	$(BIN)/python bench/bench_filter.py
	$(BIN)/python bench/bench_images.py
	$(BIN)/python bench/bench_evaluate.py
	$(BIN)/python bench/bench_cache.py
	$(BIN)/python bench/bench_input.py
	$(BIN)/python bench/bench_app_input.py
	$(BIN)/python bench/bench_tflite.py
	$(BIN)/python bench/bench_quantization.py

gpu-check: setup  ## on a GPU: train steps/s by precision and XLA, GPU vs CPU (bench/bench_gpu.py); else says there is none
	$(BIN)/python bench/bench_gpu.py

demo: setup  ## the whole pipeline offline on synthetic street scenes (its time and AP: BENCHMARKS.md, The offline demo)
	$(BIN)/python -m testkit.demo

# The experiments of HEAD: each one's name, the params it changed and the headline metrics
# (--keep shows those even when equal), not the deps' hashes (paths) nor the Created time.
# More: make compare ARGS='-A' (all commits), ARGS=--csv, ARGS='--sort-by tflite.AP';
# REPO_DIR=.demo/repo compares the demo's (docs/experiments.md).
REPO_DIR ?= .
compare: setup  ## dvc exp show: experiments, changed params, headline metrics (ARGS=..., REPO_DIR=...)
	dvc --cd $(REPO_DIR) exp show --only-changed --keep '(tflite|keras)\.|size_mb|latency_ms' --drop 'Created|.*/' $(ARGS)

# Your own photos, a folder of them or a clip through the shipped model, as the app runs it:
# annotated copies and detections.json in runs/predict/<n>/ (ops/predict.py, docs/app.md).
MODEL ?= models/model.tflite
SCORE ?= 0.25
predict: setup  ## make predict SOURCE=photo.jpg|folder/|clip.mp4 [MODEL=...] [SCORE=0.25]: boxes drawn, runs/predict/<n>/
	@$(BIN)/python -m ops.predict "$(SOURCE)" --model "$(MODEL)" --score "$(SCORE)"

push: setup  ## check the DVC remote, then dvc push
	$(BIN)/python -m ops.remote check && dvc push

pull: setup  ## check the DVC remote, then dvc pull
	$(BIN)/python -m ops.remote check && dvc pull

release: setup  ## make release VERSION=1.2.0: tag traffic-detector@v1.2.0 once all is committed and pushed
	$(BIN)/python -m ops.release $(VERSION)

s3-local: setup-dev  ## a local S3 (SeaweedFS) on 127.0.0.1:8333 to try the remote workflow
	$(BIN)/python -m testkit.object_store --dir .s3 --port 8333

# --all: setuptools and wheel too (TF and tensorboard need setuptools' pkg_resources, gone from setuptools 81+);
# requirements-gpu.lock: requirements.lock + tensorflow[and-cuda]'s nvidia pins, then pip checks that it resolves alone.
lock:  ## re-resolve requirements*.in into requirements*.lock (and requirements-gpu.lock) in a throwaway venv
	python=$$($(SETUP) --print-python) && rm -rf /tmp/lock-venv && $$python -m venv /tmp/lock-venv
	/tmp/lock-venv/bin/pip install -q -r requirements.in
	/tmp/lock-venv/bin/pip freeze --all --exclude-editable | grep -v '^pip==' > requirements.lock
	/tmp/lock-venv/bin/python -m ops.gpu_lock --resolve
	/tmp/lock-venv/bin/pip install -q -r requirements-dev.in
	/tmp/lock-venv/bin/pip freeze --all --exclude-editable | grep -v '^pip==' | grep -vxF -f requirements.lock > requirements-dev.lock
