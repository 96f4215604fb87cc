# LLaMA from scratch, in three volumes: the table of contents.
# Every target depends on `setup`, so a newcomer needs nothing but Python to start.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PRESET ?= small
CKPT   ?= runs/vol2-$(PRESET)/ckpt
ARGS   ?=

.PHONY: help setup test test-fast lint format data tokenizer-bench \
        vol1-gradcheck vol1-train vol1-bench vol2-train vol2-bench vol2-sample \
        vol3-bench quant-bench gpu-check vol3-serve vol3-serve-bench clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install the project (idempotent)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Pin torch first: on these machines 2.13.0 is a local CPU wheel; a looser spec pulls GBs of CUDA.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

# --max-worker-restart 0: a worker that dies (a segfault in native code) fails the run at once, with
# the test it was running named, instead of xdist replacing it (which once hung the suite for good).
test: setup  ## run the whole test suite (CPU, no network)
	$(PY) -m pytest -q -n 2 --dist loadfile --max-worker-restart 0

test-fast: setup  ## the suite without tests marked slow
	$(PY) -m pytest -q -n 2 -m "not slow" --max-worker-restart 0

lint: setup  ## ruff
	$(VENV)/bin/ruff check .

format: setup  ## ruff format + import sort
	$(VENV)/bin/ruff check --fix --select I .
	$(VENV)/bin/ruff format .

data: setup  ## fetch the Shakespeare corpus (sha256-checked) and print its summary
	$(PY) -m shared.corpus $(ARGS)

# The benches (bench/) write runs/bench/<name>.json and <name>.md; ARGS="--publish results" also copies
# the Markdown table to results/<name>.md, which the chapters link.
tokenizer-bench: setup  ## train our BPE and HF tokenizers' BPE on the same text; bytes/token side by side
	$(PY) -m bench.tokenizer $(ARGS)

vol1-gradcheck: setup  ## Volume 1: every block's backward vs finite differences and torch autograd
	$(PY) -m vol1_numpy.gradcheck $(ARGS)

vol1-train: setup  ## Volume 1: train a small model in NumPy, side by side with Volume 2
	$(PY) -m vol1_numpy.train $(ARGS)

vol1-bench: setup  ## Volume 1: one NumPy training step vs PyTorch eager
	$(PY) -m bench.vol1 $(ARGS)

vol2-train: setup  ## Volume 2: train LLaMA on Shakespeare (~10 min on 2 CPU cores)
	$(PY) -m vol2_torch.train --preset $(PRESET) $(ARGS)

vol2-bench: setup  ## Volume 2: training tok/s, ours vs transformers.LlamaForCausalLM
	$(PY) -m bench.vol2 $(ARGS)

vol2-sample: setup  ## Volume 2: sample from the trained model
	$(PY) -m vol2_torch.sample --ckpt $(CKPT) $(ARGS)

vol3-bench: setup  ## Volume 3: KV cache, roofline, int8, continuous batching vs baselines and HF generate
	$(PY) -m bench.vol3 --ckpt $(CKPT) $(ARGS)

quant-bench: setup  ## Volume 3: the int8 matmul routes vs fp32 F.linear, by weight shape and rows
	$(PY) -m bench.quant $(ARGS)

vol3-serve: setup  ## Volume 3: OpenAI-compatible HTTP server on the trained model (127.0.0.1:8000)
	$(PY) -m vol3_inference.serve --ckpt $(CKPT) $(ARGS)

vol3-serve-bench: setup  ## Volume 3: the server over HTTP vs LLM.generate, and prefix caching on/off
	$(PY) -m bench.serve --ckpt $(CKPT) $(ARGS)

# The GPU machine has no network and no pip, so gpu-check does not depend on setup: it runs the python3
# it finds (GPU_PYTHON) with the checkout on PYTHONPATH. Without CUDA it prints one line and exits 0.
GPU_PYTHON    ?= python3
GPU_CHECK_OUT ?= runs/gpu-check
gpu-check:  ## on a CUDA machine (no setup): Triton kernels, engine, bf16 training; report in runs/gpu-check/
	PYTHONPATH=. GPU_CHECK_OUT=$(GPU_CHECK_OUT) $(GPU_PYTHON) -m bench.gpu_check $(ARGS)

clean:  ## remove runs/ and caches (keeps data/ and .venv/)
	rm -rf runs .pytest_cache .ruff_cache .hypothesis
