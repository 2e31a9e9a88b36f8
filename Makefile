# The README's quick start: `make bench` runs the main job, `make test` runs the tests.
# Each target builds the virtual environment first (once), so both work on a fresh clone.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: venv venv-vllm bench test test-base test-vllm lint typecheck check clean

# torch goes in first so that pip takes the CPU build from its find-links (the ray and
# vllm wheels would otherwise pull a CUDA build).
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (mars-ray needs Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## + vLLM 0.29 (through ray[llm]==2.60.0) on the CPU build of torch, for tests/vllm (~4 min, ~7 GB).
## The CUDA torchvision/torchaudio that ray[llm] pulls in break `import vllm`: removed.
VLLM_STAMP = $(VENV)/.installed-vllm
$(VLLM_STAMP): $(STAMP)
	$(BIN)/pip install -q 'ray[llm]==2.60.0' torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,vllm]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio
	$(BIN)/python -c 'import vllm' || { echo 'error: vllm does not import'; exit 1; }
	touch $(VLLM_STAMP)

venv-vllm: $(VLLM_STAMP)

## MarsScheduler / SimulatedExecutor tests against real vLLM on the CPU only.
test-vllm: $(VLLM_STAMP)
	VLLM_TARGET_DEVICE=cpu $(BIN)/python -m pytest -q tests/vllm

## Quick comparison of MARS against the baselines on the embedded defaults (simulated H100).
bench: $(STAMP)
	$(BIN)/mars-ray bench --out results/quick

## The serving path (real Ray, Serve, HTTP, `mars-ray serve` with the official openai client)
## on the base install exactly as `make venv` builds it: the newest FastAPI, Starlette and
## pydantic that resolve, not the older ones the vLLM extra pins. CI runs it before the
## vLLM extra goes in; it refuses to run where vLLM is installed (that is not the base).
test-base: $(STAMP)
	@$(BIN)/python -c 'import importlib.util as u, sys; sys.exit("error: vllm is installed in $(VENV); test-base needs the base install (make clean venv, or VENV=.venv-base)" if u.find_spec("vllm") else 0)'
	$(BIN)/python -c 'import fastapi, pydantic, starlette; print(f"base install: fastapi {fastapi.__version__}, starlette {starlette.__version__}, pydantic {pydantic.VERSION}")'
	$(BIN)/python -m pytest -q tests/ray --ignore=tests/ray/test_vllm_worker.py || { rc=$$?; [ $$rc -ne 5 ] || echo 'error: pytest collected no tests'; exit $$rc; }

## The full test suite (what CI runs): policy core, simulator, real Ray / Serve runtime,
## real vLLM on the CPU. Builds the full environment first.
test: $(VLLM_STAMP)
	VLLM_TARGET_DEVICE=cpu $(BIN)/python -m pytest -q || { rc=$$?; [ $$rc -ne 5 ] || echo 'error: pytest collected no tests'; exit $$rc; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VLLM_STAMP)
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) results .mypy_cache .ruff_cache .pytest_cache
