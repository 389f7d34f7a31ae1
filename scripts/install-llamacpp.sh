#!/usr/bin/env bash
# Install llama.cpp's server for the CPU here: the `xllamacpp` wheel (PyPI, prebuilt x86-64 CPU build that
# embeds llama.cpp's tools/server/server.cpp) in its own venv, plus VENV/bin/llama-server, an entry point
# that takes llama-server's flags (lib/vllm_lab/engines/xllamacpp_server.py, copied in), so vllm-lab runs
# the same command line as with a real llama-server binary.
#
#   bash scripts/install-llamacpp.sh VENV_DIR
#
# Idempotent: if VENV_DIR/bin/llama-server --version already reports the pinned wheel, exit 0 at once
# (the entry point is re-copied either way, so an edited wrapper takes effect).
# Environment: PY (base interpreter, default python3), XLLAMACPP_VERSION (default below).
set -euo pipefail

if [[ $# -ne 1 || "$1" == -* ]]; then
    echo "usage: bash $0 VENV_DIR" >&2
    exit 2
fi
VENV=$1
PY=${PY:-python3}
# 2026.10.11549 embeds llama.cpp build 11549 (the version's last part; the wheel's own BUILD_INFO says 0)
VERSION=${XLLAMACPP_VERSION:-2026.10.11549}
HERE=$(cd "$(dirname "$0")/.." && pwd)
WRAPPER=$HERE/lib/vllm_lab/engines/xllamacpp_server.py
START=$(date +%s)

log() { echo "[install-llamacpp] +$(($(date +%s) - START))s $*"; }

install_entry_point() {
    # the venv's python as the interpreter: the entry point runs with xllamacpp whatever PATH says
    { echo "#!$(cd "$VENV" && pwd)/bin/python"; cat "$WRAPPER"; } >"$VENV/bin/llama-server.tmp"
    chmod 755 "$VENV/bin/llama-server.tmp"
    mv "$VENV/bin/llama-server.tmp" "$VENV/bin/llama-server"
}

installed_ok() {
    [[ -x "$VENV/bin/python" ]] || return 1
    "$VENV/bin/python" -c "import sys, xllamacpp; sys.exit(xllamacpp.__version__ != sys.argv[1])" "$VERSION" \
        >/dev/null 2>&1
}

if installed_ok; then
    install_entry_point
    log "xllamacpp $VERSION already installed in $VENV; entry point refreshed"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV with $PY ($("$PY" --version 2>&1))"
    "$PY" -m venv "$VENV"
fi
log "pip install xllamacpp==$VERSION (about 35 MB)"
# this machine's find-links config makes pip print many "is ignored" lines: drop them, keep pip's status
set +e
"$VENV/bin/python" -m pip install -q "xllamacpp==$VERSION" 2>&1 | grep -v 'is ignored'
rc=${PIPESTATUS[0]}
set -e
if [[ $rc -ne 0 ]]; then
    log "ERROR: pip install xllamacpp==$VERSION failed (exit $rc)" >&2
    exit 1
fi
install_entry_point

log "verifying"
# read the whole output first: `| grep -q` would stop reading at the match and, under pipefail, fail the check
version=$("$VENV/bin/llama-server" --version 2>&1 || true)
if ! installed_ok || [[ "$version" != *"version: "* ]]; then
    log "ERROR: $VENV/bin/llama-server --version does not run: ${version:0:300}" >&2
    exit 1
fi
echo "${version%%$'\n'*}"
log "done in $(($(date +%s) - START)) s; launch with: $VENV/bin/llama-server -m MODEL.gguf -c 4096 --port 8080"
