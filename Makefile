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

.PHONY: install run run-single test test-fast bench bench-smoke partition-report coverage data-fashion-mnist study study-quick study-smoke pretrain-quality ticket-regimes clean

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
	WANDB_MODE=disabled OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

test-fast: $(STAMP)
	WANDB_MODE=disabled OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup -m 'not slow' $(PYTEST_ARGS)

# every benchmark (communication, step time, memory, FSDP memory, sync time, ticket speed; several minutes on 2 CPU cores), one table
# of ratios vs targets: docs/results/bench.txt, raw numbers in docs/results/bench.json (docs/results.md)
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench.py $(ARGS)

# the same benchmarks at tiny sizes (about a minute): checks that they run, not what they measure
bench-smoke: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench.py --smoke $(ARGS)

partition-report: $(STAMP)
	$(PY) benchmarks/partition_report.py

# every timm model family through the channel analysis (one or more representatives per timm.models
# module, chosen by the rule in the script): split / nothing splittable / refused, with the exactness
# check at S=2 and S=4; docs/results/timm_coverage.{md,json}. Resumable; 10 to 30 minutes on 2 CPU cores.
# ARGS="--preset one_dim_flops" sweeps the recipe's default preset (docs/results/timm_coverage-one_dim_flops.{md,json}).
coverage: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/timm_coverage.py --per_prefix $(ARGS)

# the full Fashion-MNIST in torchvision's layout under data/FashionMNIST/raw/, from Debian's package
# dataset-fashion-mnist (installed with apt-get when run as root; otherwise the script says what to do)
data-fashion-mnist:
	$(PYTHON) scripts/fashion_mnist.py --data_dir data

# the ticket-quality study (docs/results.md "Ticket study"): LoFT S=2, dense, Early-Bird and random tickets
# (on LoFT's and on dense's pretraining) in the regime ticket-regimes found, resnet10t on a Fashion-MNIST
# subset, 5 seeds, paired 95% intervals; resumable (re-running skips finished runs); results in
# docs/results/study.{json,md,*.png}. JOBS pipelines run side by side (one per CPU core).
JOBS ?= 2
study: $(STAMP) data-fashion-mnist
	OMP_NUM_THREADS=1 $(PY) benchmarks/study.py --jobs $(JOBS) $(ARGS)

# the study's first seed (the same runs; about 11 minutes on 2 idle cores); results in runs/study/results-quick
study-quick: $(STAMP) data-fashion-mnist
	OMP_NUM_THREADS=1 $(PY) benchmarks/study.py --quick --jobs $(JOBS) $(ARGS)

# the same study at tiny sizes (digits, one seed; under 2 minutes): checks that it runs, not what it measures
study-smoke: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/study.py --smoke $(ARGS)

# LoFT pretraining quality against dense at equal samples per worker and equal FLOPs, 5 seeds, paired
# 95% intervals (docs/results.md "Pretraining quality"); resumable; docs/results/pretrain_quality.{json,md}
pretrain-quality: $(STAMP) data-fashion-mnist
	OMP_NUM_THREADS=1 $(PY) benchmarks/pretrain_quality.py --jobs $(JOBS) $(ARGS)

# which ticket regime separates magnitude tickets from random ones (structured one-shot / fine-tuned,
# unstructured 90-98% fine-tuned or rewound), on pretrain-quality's pretrainings; paired 95% intervals;
# docs/results/ticket_regimes.{json,md}
ticket-regimes: $(STAMP) data-fashion-mnist
	OMP_NUM_THREADS=1 $(PY) benchmarks/ticket_regimes.py --jobs $(JOBS) $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
