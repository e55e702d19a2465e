# `make repro` runs the pipeline, `make test` the tests; both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export PATH := $(BIN):$(PATH)

.PHONY: setup repro test lint bench lock demo push pull release s3-local

setup: $(STAMP)

$(STAMP): requirements.lock
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found. TensorFlow 2.15 needs Python 3.11 (it has no 3.12 build): install Python 3.11 (e.g. 'pyenv install 3.11') or run 'make PYTHON=/path/to/python3.11 ...'" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "error: $(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())'), not 3.11: TensorFlow 2.15 has no build for it" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	touch $@

repro: $(STAMP)
	dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	ruff check . && ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/bench_filter.py
	$(BIN)/python bench/bench_images.py
	$(BIN)/python bench/bench_evaluate.py
	$(BIN)/python bench/bench_tflite.py  # needs a trained model: make demo first

# Re-resolve requirements.in into requirements.lock in a throwaway venv.
lock:
	rm -rf /tmp/lock-venv && $(PYTHON) -m venv /tmp/lock-venv
	/tmp/lock-venv/bin/pip install -q -r requirements.in
	/tmp/lock-venv/bin/pip freeze --exclude-editable > requirements.lock

demo: $(STAMP)
	$(BIN)/python -m trafficdet.demo

# Share data and models through the DVC remote; the check names the remote and the fix
# in one line when credentials or the endpoint are wrong.
push: $(STAMP)
	$(BIN)/python -m trafficdet.remote check && dvc push

pull: $(STAMP)
	$(BIN)/python -m trafficdet.remote check && dvc pull

# make release VERSION=1.2.0: tag traffic-detector@v1.2.0 once dvc.lock matches and all is pushed.
release: $(STAMP)
	$(BIN)/python -m trafficdet.release $(VERSION)

# A local S3 (SeaweedFS) on 127.0.0.1:8333 to try the remote workflow; Ctrl-C stops it.
s3-local: $(STAMP)
	$(BIN)/python -m trafficdet.object_store --dir .s3 --port 8333
