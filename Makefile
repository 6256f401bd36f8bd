# loft_ext: `make run` (the default LoFT pretraining demo) and `make test` (the test suite) work on a
# fresh machine with Python 3.11: the virtual environment is created and the pinned dependencies are
# installed on first use; later calls skip the install unless pyproject.toml changed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# DeepSpeed is installed without compiled ops; it builds what it needs at run time.
export DS_BUILD_OPS := 0

.PHONY: install run run-single test test-fast bench partition-report clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# one process per GPU when there are GPUs, else 2 gloo processes on the CPU (S=2 real workers)
NPROC ?= $(shell $(PY) -c "import torch; print(torch.cuda.device_count() or 2)" 2>/dev/null || echo 2)

run: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) recipes/loft_timm.py $(ARGS)

run-single: $(STAMP)
	$(PY) recipes/loft_timm.py $(ARGS)

test: $(STAMP)
	WANDB_MODE=disabled OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	WANDB_MODE=disabled OMP_NUM_THREADS=1 $(PY) -m pytest -q -m 'not slow' $(PYTEST_ARGS)

# communication benchmark on real gloo processes (a few minutes on 2 CPU cores): bytes per rank per epoch
bench: $(STAMP)
	$(PY) benchmarks/communication.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/step_time.py

partition-report: $(STAMP)
	$(PY) benchmarks/partition_report.py

clean:
	rm -rf $(VENV) runs .pytest_cache
