# Two commands for a fresh machine: `make demo` and `make test` (both install first).
# `make demo`: data, a 2-rank training run with the defaults derived from the data (the command a new
# user types), per-segment evaluation, and a report with plots.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
NPROC   ?= 2

.PHONY: install lint format docs demo test bench clean

install: $(STAMP)

# The project with the CPU triple ([cpu]: torch 2.13.0 CPU build, fbgemm-gpu-cpu 1.8.0, torchrec's
# own dependencies) and every optional feature ([test] includes [all]); then torchrec 1.8.0 with
# --no-deps (its metadata asks for the CUDA fbgemm-gpu, which would replace the CPU build).
$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[cpu,test,lint]"
	$(BIN)/pip install -q --no-deps torchrec==1.8.0
	@echo "(pip's note 'torchrec requires fbgemm-gpu' is expected: fbgemm-gpu-cpu provides the same module)"
	$(BIN)/python -c "import torchrec, fbgemm_gpu, torch; print('installed torch', torch.__version__, 'torchrec', torchrec.__version__ if hasattr(torchrec, '__version__') else '1.8.0')"
	touch $(STAMP)

data/synthetic/dataset.json: $(STAMP) data_pipeline/prepare/synthetic.py
	$(BIN)/recsys prepare synthetic --rows 500000 --out data/synthetic --overwrite

demo: install data/synthetic/dataset.json
	rm -rf runs/demo  # a fresh run each time (a run dir with checkpoints would resume them)
	$(BIN)/recsys train --model dlrm --data data/synthetic --run-dir runs/demo --nproc-per-node $(NPROC)  # defaults derived from the data
	@$(BIN)/python -c "import json; s = json.load(open('runs/demo/summary.json')); print('summary: world_size', s['world_size'], '| test auc %.4f (oracle %.4f) | valid auc %.4f | %.0f samples/s' % (s['test']['auc'], s['oracle_auc'], s['valid']['auc'], s['samples_per_s']))"
	$(BIN)/recsys evaluate --checkpoint runs/demo --best --data data/synthetic --segment-by popularity:cat_0 --segment-by int_0
	$(BIN)/recsys report runs/demo

# ruff: lint and format check (pyproject.toml [tool.ruff]); `make format` rewrites the files.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# docs/config.md is generated from the config dataclasses (a test checks it is current).
docs: install
	$(BIN)/python -m trainer.config_reference > docs/config.md

test: install
	$(BIN)/python -m pytest -q --durations=40 tests

# Benchmarks print ratios against a reference measured in the same run (see BENCHMARKS.md).
bench: install
	$(BIN)/python benchmarks/bench_trainer.py --quick
	$(BIN)/python benchmarks/bench_reader.py --quick
	$(BIN)/python benchmarks/bench_prepare_criteo.py --lines 1000000
	$(BIN)/python benchmarks/bench_object_store.py
	$(BIN)/python benchmarks/bench_serving.py

clean:
	rm -rf $(VENV) data runs
