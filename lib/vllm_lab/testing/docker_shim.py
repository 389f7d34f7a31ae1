"""A `docker` (and `podman`) client stand-in for tests; no container runtime runs here.

Like the real client, `run` starts the "container" detached from the client (double fork, its own session,
not a descendant of the client), streams its output, and exits with its code; ending the client leaves
the container running. `stop -t N`, `kill`, `inspect --format {{.State.Running}}`, `ps` and `rm -f` work
by name; `info` fails as without a daemon when DOCKER_SHIM_NO_DAEMON=1. `install(bin_dir, state_dir)` writes `docker` and `podman` executables that run this module.

Images: `fake-vllm` runs vllm_lab.testing.fake_vllm, `standin` runs vllm_lab.testing.standin; any other
image fails as an unknown one does (exit 125). The container's environment is the client's PATH/HOME/LANG
plus each `-e NAME[=value]` (and the test run's owner mark, so leftovers are caught), as with a real one.
State lives in $DOCKER_SHIM_STATE: <name>.json (running container), <name>.log, <name>.exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

IMAGES = {
    "fake-vllm": [sys.executable, "-m", "vllm_lab.testing.fake_vllm"],
    "standin": [sys.executable, "-m", "vllm_lab.testing.standin"],
}
PASS_THROUGH = ("PATH", "HOME", "LANG", "VLLM_LAB_OWNER", "PYTHONPATH")


def install(bin_dir: Path, state_dir: Path) -> Path:
    """Write `docker` and `podman` into bin_dir (prepend it to PATH); returns the docker path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name in ("docker", "podman"):
        exe = bin_dir / name
        exe.write_text(
            f"#!/bin/sh\nDOCKER_SHIM_STATE=${{DOCKER_SHIM_STATE:-{state_dir}}} "
            f'exec {sys.executable} -m vllm_lab.testing.docker_shim "$@"\n'
        )
        exe.chmod(0o755)
    return bin_dir / "docker"


def _state() -> Path:
    d = Path(os.environ["DOCKER_SHIM_STATE"])
    d.mkdir(parents=True, exist_ok=True)
    return d


def _info(name: str) -> dict | None:
    try:
        return json.loads((_state() / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def _running(info: dict | None) -> bool:
    if not info:
        return False
    try:
        import psutil

        p = psutil.Process(info["pid"])
        return abs(p.create_time() - info["create_time"]) < 1 and p.status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


def _no_such(name: str) -> int:
    print(f"Error response from daemon: No such container: {name}", file=sys.stderr)
    return 1


def cmd_run(args: list[str]) -> int:
    from vllm_lab.commands import container_options

    argv = ["docker", "run", *args]
    opts, image_at = container_options(argv, 1)
    if image_at is None:
        print('"docker run" requires at least 1 argument.', file=sys.stderr)
        return 125
    image, rest = argv[image_at], argv[image_at + 1 :]
    if image not in IMAGES:
        print(f"Unable to find image '{image}' locally", file=sys.stderr)
        return 125
    name = (opts.get("--name") or [f"shim_{uuid.uuid4().hex[:8]}"])[-1]
    if _running(_info(name)):
        print(f'docker: Error response from daemon: Conflict. The container name "/{name}" is already in use.',
              file=sys.stderr)  # fmt: skip
        return 125
    env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
    for e in opts.get("--env", []):
        k, eq, v = e.partition("=")
        if eq:
            env[k] = v
        elif k in os.environ:
            env[k] = os.environ[k]
    state = _state()
    (state / f"{name}.exit").unlink(missing_ok=True)
    spec = {"name": name, "argv": [*IMAGES[image], *rest], "env": env, "rm": "--rm" in opts,
            "publish": opts.get("--publish", []), "network": opts.get("--network", [])}  # fmt: skip
    (state / f"{name}.spec").write_text(json.dumps(spec))
    # Double fork: the container is not the client's child, as with a real daemon.
    subprocess.run([sys.executable, "-m", "vllm_lab.testing.docker_shim", "_spawn", name], check=True)
    return _follow(name)


def _follow(name: str) -> int:
    """Stream the container's log until it exits; its exit code is ours."""
    state = _state()
    log, exit_file = state / f"{name}.log", state / f"{name}.exit"
    deadline = time.monotonic() + 10
    while _info(name) is None and not exit_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    info = _info(name)
    pos = 0
    out = sys.stdout.buffer
    while True:
        if log.exists():
            with open(log, "rb") as f:
                f.seek(pos)
                data = f.read()
            if data:
                out.write(data)
                out.flush()
                pos += len(data)
        if exit_file.exists():
            code = int(exit_file.read_text() or 137)
            exit_file.unlink(missing_ok=True)
            return code
        if not _running(info):
            return 137  # killed with its supervisor (docker kill)
        time.sleep(0.05)


def _spawn(name: str) -> int:
    subprocess.Popen([sys.executable, "-m", "vllm_lab.testing.docker_shim", "_supervise", name],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, close_fds=True)  # fmt: skip
    return 0


def _supervise(name: str) -> int:
    """The container: its main process as a child, in this session; writes the exit code when it ends."""
    import psutil

    state = _state()
    spec = json.loads((state / f"{name}.spec").read_text())
    with open(state / f"{name}.log", "wb") as log:
        child = subprocess.Popen(spec["argv"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=spec["env"])  # fmt: skip
    me = psutil.Process()
    info = {"name": name, "pid": me.pid, "create_time": me.create_time(), "main_pid": child.pid,
            "sid": os.getsid(0), "argv": spec["argv"], "publish": spec["publish"]}  # fmt: skip
    (state / f"{name}.json").write_text(json.dumps(info))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # `stop` signals the main process, as docker does
    code = child.wait()
    code = 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as docker reports it
    (state / f"{name}.exit").write_text(str(code))
    (state / f"{name}.json").unlink(missing_ok=True)  # exited (kept only as `ps -a` would; not needed here)
    return 0


def _killpg(info: dict) -> None:
    with contextlib.suppress(OSError):
        os.killpg(info["sid"], signal.SIGKILL)


def cmd_stop(args: list[str]) -> int:
    grace = 10.0
    names = []
    i = 0
    while i < len(args):
        if args[i] in ("-t", "--time", "--timeout"):
            grace = float(args[i + 1])
            i += 2
        elif args[i].startswith(("--time=", "--timeout=")):
            grace = float(args[i].split("=", 1)[1])
            i += 1
        else:
            names.append(args[i])
            i += 1
    rc = 0
    for name in names:
        info = _info(name)
        if not info:
            rc = _no_such(name)
            continue
        if _running(info):
            with contextlib.suppress(OSError):
                os.kill(info["main_pid"], signal.SIGTERM)
            deadline = time.monotonic() + grace
            while _running(info) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _running(info):
                _killpg(info)
        print(name)
    return rc


def cmd_kill(args: list[str]) -> int:
    rc = 0
    for name in [a for a in args if not a.startswith("-")]:
        info = _info(name)
        if not _running(info):
            rc = _no_such(name)
            continue
        _killpg(info)
        print(name)
    return rc


def cmd_rm(args: list[str]) -> int:
    for name in [a for a in args if not a.startswith("-")]:
        info = _info(name)
        if _running(info):
            _killpg(info)
        (_state() / f"{name}.json").unlink(missing_ok=True)
        print(name)
    return 0


def cmd_inspect(args: list[str]) -> int:
    names = [a for i, a in enumerate(args) if not a.startswith("-") and args[i - 1] not in ("-f", "--format")]
    rc = 0
    for name in names:
        info = _info(name)
        if info is None:
            print(f"Error: No such object: {name}", file=sys.stderr)
            rc = 1
            continue
        print("true" if _running(info) else "false")
    return rc


def cmd_ps(args: list[str]) -> int:
    want = None
    for i, a in enumerate(args):
        if a == "--filter" and i + 1 < len(args) and args[i + 1].startswith("name="):
            want = args[i + 1][5:].strip("^$")
        elif a.startswith("--filter=name="):
            want = a[len("--filter=name=") :].strip("^$")
    for path in sorted(_state().glob("*.json")):
        info = _info(path.stem)
        if _running(info) and (want is None or want in info["name"]):
            print(info["name"])
    return 0


def cmd_info(args: list[str]) -> int:
    """As the real client: client facts on stdout; without a daemon (DOCKER_SHIM_NO_DAEMON=1) an error, exit 1."""
    print("Client:\n Version: shim")
    if os.environ.get("DOCKER_SHIM_NO_DAEMON") == "1":
        print("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?",
              file=sys.stderr)  # fmt: skip
        return 1
    print("Server:\n Server Version: shim")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["container"]:
        args = args[1:]
    if not args:
        print("Usage:  docker [OPTIONS] COMMAND", file=sys.stderr)
        return 1
    cmd, rest = args[0], args[1:]
    table = {"run": cmd_run, "stop": cmd_stop, "kill": cmd_kill, "rm": cmd_rm, "inspect": cmd_inspect,
             "ps": cmd_ps, "info": cmd_info}  # fmt: skip
    if cmd == "_spawn":
        return _spawn(rest[0])
    if cmd == "_supervise":
        return _supervise(rest[0])
    if cmd not in table:
        print(f"docker: '{cmd}' is not a docker command (shim).", file=sys.stderr)
        return 1
    return table[cmd](rest)


if __name__ == "__main__":
    sys.exit(main())
