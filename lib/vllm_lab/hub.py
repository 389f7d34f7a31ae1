"""A hub model (`model: Qwen/Qwen3-8B-AWQ`) is downloaded once, before the first trial, into the user's cache.

vLLM downloads a hub id itself at start-up, inside the trial's start-up timeout. The launcher leaves the
user's Hugging Face cache alone (HF_HOME, XDG_CACHE_HOME), so one download serves every trial; the entry
points (`vllm-lab run`, `search`, `launch`) call `prefetch` once so that download happens up front, with
its progress bars, and no timeout. It runs `huggingface_hub.snapshot_download` in the vLLM command's own
python (its huggingface_hub, HF_HOME, HF_TOKEN); where that python cannot be told (a container, a runner,
a wrapper) or the hub is offline, it says so in one line and leaves the download to vLLM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

from vllm_lab import commands
from vllm_lab.redact import redact_text
from vllm_lab.spec import SpecError, Trial, flag_values, split_cmd

_TRUE = ("1", "true", "yes", "on")

# Runs in the vLLM command's python. Progress goes to stderr (the terminal); one JSON line to stdout.
_DOWNLOAD = """
import json, sys
try:
    from huggingface_hub import HfApi, snapshot_download
except ImportError:
    print(json.dumps({"status": "missing"}))
    sys.exit(0)
repo, rev = sys.argv[1], sys.argv[2] or None
try:
    files = HfApi().list_repo_files(repo, revision=rev)
    ignore = ["original/*", "*.pth", "*.pt"]
    if any(f.endswith(".safetensors") for f in files):  # as vLLM loads: safetensors only when present
        ignore += ["*.bin", "*.h5", "*.msgpack", "*.onnx", "*.ot", "*.gguf"]
    path = snapshot_download(repo, revision=rev, ignore_patterns=ignore)
except Exception as e:
    print(json.dumps({"status": "failed", "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"}))
    sys.exit(0)
print(json.dumps({"status": "ok", "path": str(path)}))
"""


def _download(python: str, model: str, revision: str | None, env: Mapping[str, str]) -> dict:
    """{"status": ok|missing|failed, "path" | "error"}: one snapshot_download in that python."""
    try:
        r = subprocess.run([python, "-c", _DOWNLOAD, model, revision or ""], stdout=subprocess.PIPE, text=True,
                           env=dict(env))  # fmt: skip
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError) as e:
        return {"status": "failed", "error": f"{python} could not run the download ({type(e).__name__})"}


def prefetch(
    model: str,
    vllm_cmd: str | list[str],
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    *,
    out: TextIO | None = None,
) -> str | None:
    """Download a hub model before the first trial; return (and print) one line saying what happened.

    None for a local model folder. Raises SpecError (one line) when the hub says no: a wrong id, a gated
    model without HF_TOKEN, no network.
    """
    if commands.is_local_model(model):
        return None
    out = out or sys.stderr
    full_env = {**os.environ, **(env or {})}
    c = commands.analyse(vllm_cmd)
    if any(str(full_env.get(k, "")).lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        note = (
            f"model {model}: the hub is offline (HF_HUB_OFFLINE=1): vLLM uses the Hugging Face cache as it is"
        )
    elif c.runtime:
        note = (f"model {model}: not downloaded here: the container downloads it on the first launch (mount "
                "your cache, e.g. -v ~/.cache/huggingface:/root/.cache/huggingface, so it happens once)")  # fmt: skip
    elif not c.python:
        first = (split_cmd(vllm_cmd) or ["?"])[0]
        note = (
            f"model {model}: cannot tell which python {first} runs, so vLLM downloads it in the first trial"
        )
    else:
        print(f"downloading {model} into the Hugging Face cache, once, before the first trial ...", file=out,
              flush=True)  # fmt: skip
        res = _download(c.python, model, (flag_values(list(extra_args), "--revision") or [None])[0], full_env)
        status = res.get("status")
        if status == "ok":
            note = f"model {model}: in the Hugging Face cache ({res.get('path')})"
        elif status == "missing":
            note = (
                f"model {model}: {c.python} has no huggingface_hub, so vLLM downloads it in the first trial"
            )
        else:
            raise SpecError(
                f"model: {model} could not be downloaded ({redact_text(str(res.get('error')))}); check the id, "
                "set HF_TOKEN for a gated model, or point model at a local folder"
            )
    print(note, file=out, flush=True)
    return note


def prefetch_trial(trial: Trial, *, out: TextIO | None = None) -> str | None:
    """prefetch() for a trial's model, command, env and extra args."""
    from vllm_lab import engines

    if not engines.get(trial.engine).hub_models:  # e.g. Ollama: a name in its own store, checked by validate
        return None
    return prefetch(trial.model, trial.vllm_cmd, trial.env, trial.extra_args, out=out)
