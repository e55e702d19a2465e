# `make repro` runs the pipeline, `make test` the tests; both set up .venv first. `make` lists every target.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check
export DVC_NO_ANALYTICS := 1
export PATH := $(BIN):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help setup repro test lint bench demo compare predict push pull release s3-local lock

help:  ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv from requirements.lock (what the pipeline needs)

$(STAMP): requirements.lock
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found. TensorFlow 2.15 needs Python 3.11 (it has no 3.12 build): install Python 3.11 (e.g. 'pyenv install 3.11') or run 'make PYTHON=/path/to/python3.11 ...'" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "error: $(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())'), not 3.11: TensorFlow 2.15 has no build for it" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.lock
	touch $@

$(DEV_STAMP): $(STAMP) requirements-dev.lock
	$(PIP) -r requirements.lock -r requirements-dev.lock
	touch $@

repro: $(STAMP)  ## run the pipeline (dvc repro): COCO 2017 + cocoTraffic -> models/model.tflite
	dvc repro

test: $(DEV_STAMP)  ## run the test suite, offline (fixture and S3 store on 127.0.0.1)
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: $(DEV_STAMP)  ## ruff check and format check
	ruff check . && ruff format --check .

bench: $(DEV_STAMP)  ## run bench/ (results in bench/out/, figures in BENCHMARKS.md); app_input and tflite need `make demo` first
	$(BIN)/python bench/bench_filter.py
	$(BIN)/python bench/bench_images.py
	$(BIN)/python bench/bench_evaluate.py
	$(BIN)/python bench/bench_cache.py
	$(BIN)/python bench/bench_input.py
	$(BIN)/python bench/bench_app_input.py
	$(BIN)/python bench/bench_tflite.py
	$(BIN)/python bench/bench_quantization.py

demo: $(STAMP)  ## the whole pipeline offline on synthetic street scenes (about 8 min on a quiet machine)
	$(BIN)/python -m testkit.demo

# The experiments of HEAD: each one's name, the params it changed and the headline metrics
# (--keep shows those even when equal), not the deps' hashes (paths) nor the Created time.
# More: make compare ARGS='-A' (all commits), ARGS=--csv, ARGS='--sort-by tflite.AP';
# REPO_DIR=.demo/repo compares the demo's (docs/experiments.md).
REPO_DIR ?= .
compare: $(STAMP)  ## dvc exp show: experiments, changed params, headline metrics (ARGS=..., REPO_DIR=...)
	dvc --cd $(REPO_DIR) exp show --only-changed --keep '(tflite|keras)\.|size_mb|latency_ms' --drop 'Created|.*/' $(ARGS)

# Your own photos, a folder of them or a clip through the shipped model, as the app runs it:
# annotated copies and detections.json in runs/predict/<n>/ (ops/predict.py, docs/app.md).
MODEL ?= models/model.tflite
SCORE ?= 0.25
predict: $(STAMP)  ## make predict SOURCE=photo.jpg|folder/|clip.mp4 [MODEL=...] [SCORE=0.25]: boxes drawn, runs/predict/<n>/
	@$(BIN)/python -m ops.predict "$(SOURCE)" --model "$(MODEL)" --score "$(SCORE)"

push: $(STAMP)  ## check the DVC remote, then dvc push
	$(BIN)/python -m ops.remote check && dvc push

pull: $(STAMP)  ## check the DVC remote, then dvc pull
	$(BIN)/python -m ops.remote check && dvc pull

release: $(STAMP)  ## make release VERSION=1.2.0: tag traffic-detector@v1.2.0 once all is committed and pushed
	$(BIN)/python -m ops.release $(VERSION)

s3-local: $(DEV_STAMP)  ## a local S3 (SeaweedFS) on 127.0.0.1:8333 to try the remote workflow
	$(BIN)/python -m testkit.object_store --dir .s3 --port 8333

lock:  ## re-resolve requirements*.in into requirements*.lock in a throwaway venv
	rm -rf /tmp/lock-venv && $(PYTHON) -m venv /tmp/lock-venv
	/tmp/lock-venv/bin/pip install -q -r requirements.in
	/tmp/lock-venv/bin/pip freeze --exclude-editable > requirements.lock
	/tmp/lock-venv/bin/pip install -q -r requirements-dev.in
	/tmp/lock-venv/bin/pip freeze --exclude-editable | grep -vxF -f requirements.lock > requirements-dev.lock
