"""Where things live: the repo's notebooks and outputs, and relative paths that work from any cwd.

A notebook rerun in JupyterLab runs in notebooks/, papermill from the repo root runs in the root; a
relative path in a parameter or a plan is tried against the cwd, then the given base, then the repo root.
A run folder (RUN_DIR) is written to, so it may not exist yet: a relative one always means the repo root's.
"""

from __future__ import annotations

import os
from pathlib import Path

from vllm_lab.record import TRIALS_FILE

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
OUTPUTS_DIR = REPO_ROOT / "outputs"


def resolve_path(p: str, base: Path | None = None) -> str:
    path = Path(p).expanduser()
    if path.is_absolute():
        return str(path)
    for root in (Path.cwd(), base, REPO_ROOT):
        if root is not None and (root / path).exists():
            return os.path.abspath(
                root / path
            )  # not resolve(): a venv's bin/python is a symlink that must stay
    return str(path)  # let validation name it as missing


def resolve_run_dir(run_dir: str | Path, cwd: Path | None = None) -> Path:
    """RUN_DIR as an absolute folder: relative ones from the repo root (outputs/adhoc means the repo's, never
    notebooks/outputs/adhoc), absolute ones as given.

    An executed notebook lives in <run>/notebooks/ and JupyterLab runs it there: when its absolute RUN_DIR
    holds no record but the folder above the notebook does (the run was moved or unpacked from a zip),
    that folder is the run.
    """
    path = Path(run_dir).expanduser()
    if not path.is_absolute():
        return REPO_ROOT / path
    cwd = Path.cwd() if cwd is None else cwd
    here = cwd.parent
    if cwd.name == "notebooks" and not (path / TRIALS_FILE).is_file() and (here / TRIALS_FILE).is_file():
        print(f"RUN_DIR {path} holds no {TRIALS_FILE}; using the run folder of this notebook: {here}")
        return here
    return path


def params_dir() -> Path:
    """params/ of this checkout (VLLM_LAB_PARAMS overrides): GPU profiles and model config facts."""
    env = os.environ.get("VLLM_LAB_PARAMS")
    if env:
        return Path(env)
    repo = REPO_ROOT / "params"
    return repo if repo.is_dir() else Path.cwd() / "params"


def resolve_cmd(cmd: str | list[str], base: Path | None = None) -> str | list[str]:
    """A relative interpreter in a command (.venv-vllm/bin/python) resolves like any path; same type back."""
    parts = cmd.split() if isinstance(cmd, str) else list(cmd)
    if parts and "/" in parts[0] and not parts[0].startswith("/"):
        parts[0] = resolve_path(parts[0], base=base)
    return " ".join(parts) if isinstance(cmd, str) else parts


# Command-line options that name a run folder or a plan (vllm-lab <cmd> --out ..., reap RUN_DIR, ...).
CLI_PATH_OPTIONS = ("out", "resume", "run_dir", "plan", "out_dir")


def absolute_cli_paths(args) -> None:
    """Make every path option absolute against the caller's cwd, once, before any subcommand runs.

    Notebooks run with the repo root as cwd; the batch's progress bar, reap and report run in the
    caller's: a relative --out would otherwise split one run over two folders. A --model that exists as a
    path becomes absolute too (a hub id or a params/models name stays as given).
    """
    for name in CLI_PATH_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            setattr(args, name, os.path.abspath(os.path.expanduser(value)))
    model = getattr(args, "model", None)
    if isinstance(model, str) and Path(model).expanduser().exists():
        args.model = os.path.abspath(os.path.expanduser(model))
    cmd = getattr(args, "vllm_cmd", None)
    if isinstance(cmd, str) and cmd:
        args.vllm_cmd = resolve_cmd(cmd)
