"""Launch the real vLLM server for one trial, watch it, and stop its whole process tree.

Modelled on vLLM's own tests/utils.py RemoteOpenAIServer: a free port, the log streamed to a file (never
an unread pipe), readiness that also checks the process is alive, terminate -> wait -> kill. Beyond that:
fail fast on the first fatal log line, its own session per launch (so EngineCore and every other child can
be found and ended), a pid file per live server (so a later run can refuse to start beside a survivor and
`vllm-lab reap` can end it), and secrets redacted in the log copy.

A `docker run` / `podman run` command starts a container the client does not own: ending the client leaves
it (and its GPU memory) behind. So the launcher names it (`--name vllm-lab-...`), publishes the port, stops
it by name (`stop -t N`, then `kill`) and records the name in the pid file for `vllm-lab reap`.
The Hugging Face cache and vLLM's compile cache are the user's (shared across trials; a trial can ask for
a private compile cache with VLLM_LAB_ISOLATE_CACHE=1); only TMPDIR (ZMQ sockets, the raw log) is private.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from vllm_lab import commands, engines, warden
from vllm_lab.engines.vllm import legacy_quantization_flag, quantization_flag  # noqa: F401  (their old home)
from vllm_lab.proctree import STOP_GRACE_S, stop_tree  # stop_tree: others import it from here too
from vllm_lab.redact import redact_argv, redact_text
from vllm_lab.spec import SpecError, Trial, split_cmd

POLL_S = 0.05
READ_CHUNK_BYTES = 4 << 20
MAX_LOG_COPY_BYTES = 64 << 20
OWNER_ENV = "VLLM_LAB_OWNER"  # set in every launched server's environment: which process launched it
HEALTH_POLL_S = 0.5  # /health is polled even without uvicorn's log line (other log configs, containers)
ISOLATE_CACHE_ENV = "VLLM_LAB_ISOLATE_CACHE"  # =1 in a trial's env: a private vLLM compile cache


class LaunchRefused(SpecError):
    """The launch cannot start (port taken, survivor alive): one line with the fix."""


BATCH_PID_ENV = "VLLM_LAB_BATCH_PID"  # set by the batch for the kernels it starts


def _server_preexec(memory_limit: int | None):
    """What runs in the server's child before exec: die with the parent; the trial's address-space limit."""

    def preexec() -> None:
        _die_with_parent()
        if memory_limit is not None:  # inherited by every process the server starts
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    return preexec


def _die_with_parent() -> None:
    """SIGTERM this process when its parent dies (kill -9 of a kernel or of the batch).

    Called in each server before exec: vLLM's API server ends its EngineCore on SIGTERM; anything left is
    found by `vllm-lab reap` or --resume.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def bind_kernel_to_batch() -> None:
    """A kernel started by `vllm-lab run` dies with the batch (ipykernel does not notice its parent's death).

    No effect in JupyterLab or under plain papermill: only where the batch's pid is our parent.
    """
    if os.environ.get(BATCH_PID_ENV) == str(os.getppid()):
        _die_with_parent()


def container_name(trial: Trial) -> str:
    """Unique per launch, and a valid container name (letters, digits, _.-)."""
    safe = (
        "".join(c if c.isalnum() or c in "_.-" else "-" for c in trial.trial_id)[:60].strip("-.") or "trial"
    )
    return f"vllm-lab-{safe}-{uuid.uuid4().hex[:6]}"


def container_args(trial: Trial, port: int, name: str) -> list[str]:
    """What goes right after `docker run`: a name to stop it by, the port, the trial's env, --rm."""
    c = commands.analyse(trial.vllm_cmd)
    opts = c.options
    out = [] if "--name" in opts else ["--name", name]
    if "--rm" not in opts:
        out.append("--rm")  # a stopped trial leaves no container behind
    if not c.host_network:
        publish = "127.0.0.1" if trial.host == "localhost" else trial.host  # the host side binds where asked
        out += ["-p", f"{publish}:{port}:{port}"]
    for k in trial.env:  # by name only: the value comes from the client's environment, never the argv
        out += ["-e", k]
    return out


def build_argv(trial: Trial, port: int, container: str | None = None) -> list[str]:
    """The engine's argv for the trial; a container's options spliced in right after its `run`."""
    c = commands.analyse(trial.vllm_cmd)
    host = trial.host
    if c.run_at is not None and not c.host_network:
        host = "0.0.0.0"  # inside the container; the published port is bound on the host side only
    argv = engines.get(trial.engine).argv(trial, port, host)
    if c.run_at is not None:
        name = (c.options.get("--name") or [container or container_name(trial)])[-1]
        argv = [*argv[: c.run_at + 1], *container_args(trial, port, name), *argv[c.run_at + 1 :]]
    return argv


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_owner(port: int) -> str:
    with contextlib.suppress(psutil.Error, OSError):
        for c in psutil.net_connections("inet"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                return f"pid {c.pid} ({psutil.Process(c.pid).name()})"
    return "another program"


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise LaunchRefused(
                f"port: {host}:{port} is in use by {port_owner(port)}; stop it or leave port unset for a free one"
            ) from None


# --- pid files: one per live server, so survivors of a killed run can be found -----------------------------


def _pid_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "servers"


def _write_pidfile(
    run_dir: Path, trial_id: str, proc: psutil.Process, port: int, tmp: Path, container: dict | None = None
) -> Path:
    path = _pid_dir(run_dir) / f"{trial_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "pid": proc.pid,
        "create_time": proc.create_time(),
        "port": port,
        "tmp": str(tmp),
        "trial_id": trial_id,
        **(container or {}),  # {"container": name, "runtime": path of the docker/podman client}
    }
    path.write_text(json.dumps(info))
    return path


def _pid_alive(info: dict) -> bool:
    try:
        proc = psutil.Process(info["pid"])
        return abs(proc.create_time() - info["create_time"]) < 1 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, OSError, ValueError, KeyError, TypeError):
        return False


def live_servers(run_dir: str | Path) -> list[dict]:
    """Servers recorded in pid files whose process (same pid AND start time) or container is still alive."""
    alive = []
    for path in sorted(_pid_dir(Path(run_dir)).glob("*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            info = {}
        if isinstance(info, dict) and (
            _pid_alive(info)
            or (info.get("container") and container_alive(info["runtime"], info["container"]))
        ):
            alive.append({**info, "pidfile": str(path)})
            continue
        path.unlink(missing_ok=True)  # stale: that server is gone
    return alive


def reap_all(run_dir: str | Path) -> list[dict]:
    """End every server (and container) left alive by an earlier run in this folder; their pid-file facts."""
    ended = []
    for info in live_servers(run_dir):
        if info.get("container") and not stop_container(info["runtime"], info["container"]):
            raise RuntimeError(f"could not end container {info['container']}")
        survivors = stop_tree(info["pid"])
        if survivors:
            raise RuntimeError(f"could not end pids {survivors}")
        shutil.rmtree(info["tmp"], ignore_errors=True)
        Path(info["pidfile"]).unlink(missing_ok=True)
        ended.append(info)
    return ended


def reap(run_dir: str | Path) -> list[int]:
    """End every server left alive by an earlier run in this folder; return the pids that were ended."""
    return [info["pid"] for info in reap_all(run_dir)]


def cli_reap(args) -> int:
    ended = reap_all(args.run_dir)
    names = [
        f"pid {i['pid']}" + (f" (container {i['container']})" if i.get("container") else "") for i in ended
    ]
    print(
        f"ended {len(ended)} server(s): {', '.join(names)}"
        if ended
        else "no live server recorded in " + args.run_dir
    )
    return 0


# --- containers: stopped by name, since ending the client leaves them running ------------------------------


def _runtime_call(runtime: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run([runtime, *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None


def container_alive(runtime: str, name: str) -> bool:
    r = _runtime_call(runtime, "inspect", "--format", "{{.State.Running}}", name)
    return bool(r and r.returncode == 0 and r.stdout.strip().lower() == "true")


def stop_container(runtime: str, name: str, grace_s: float = STOP_GRACE_S) -> bool:
    """`stop -t N name`, then `kill name` if it still runs; True when it no longer runs."""
    _runtime_call(runtime, "stop", "-t", str(max(1, round(grace_s))), name, timeout=grace_s + 30)
    if container_alive(runtime, name):
        _runtime_call(runtime, "kill", name)
        deadline = time.monotonic() + 10
        while container_alive(runtime, name) and time.monotonic() < deadline:
            time.sleep(0.2)
    return not container_alive(runtime, name)


# --- the server -----------------------------------------------------------------------------------------------


@dataclass
class LaunchResult:
    outcome: str  # ready | failed | timeout
    seconds_to_outcome: float
    argv: list[str]  # redacted
    log_path: str
    port: int
    base_url: str
    backend: str  # vllm-cuda | vllm-cpu | fake | unknown: from the command's environment, never its log
    failure: str | None = None
    evidence: str | None = None
    remedy: str | None = None
    served_max_model_len: int | None = None
    exit_code: int | None = None  # only when the server ended by itself (not by our stop)
    exit_signal: str | None = None  # e.g. SIGKILL
    scan: dict = field(default_factory=dict)  # logscan facts (kv tokens, version, ...)


def backend_of_command(
    cmd: tuple[str, ...] | list[str] | str, env: dict | None = None, engine: str | None = None
) -> str:
    """Which build the command runs, from its environment's installed packages; never raises."""
    return engines.get(engine).backend(cmd, env)


OOM_KILLER_EVIDENCE = (
    "the server was killed by SIGKILL and its log names no cause: likely the kernel's OOM killer "
    "(host memory ran out); see `dmesg` or `journalctl -k`"
)
OOM_KILLER_REMEDY = (
    "free host memory (other programs, a smaller --swap-space or --cpu-offload-gb; on the CPU build a smaller "
    "KV budget), then launch again"
)


def _unexplained_exit(code: int | None, sig: str | None, log_text: str) -> tuple[str, str]:
    """A start that ended with no cause vLLM's log names (a wrapper or a container client failed first)."""
    how = f"was killed by {sig}" if sig else f"exited with code {code}" if code is not None else "stopped"
    last = next((line.strip() for line in reversed(log_text.splitlines()) if line.strip()), None)
    said = f"; its last line: {last[:300]}" if last else "; it printed nothing"
    return (
        f"the server {how} before it was ready and its log names no known cause{said}",
        "read the log (log_path); run vllm_cmd by hand to see it fail",
    )


def exit_facts(code: int | None, container: bool = False) -> tuple[int | None, str | None]:
    """(exit code, signal name): -9 -> SIGKILL; a container client's 137 (128 + 9) -> SIGKILL too."""
    if code is None:
        return None, None
    sig = -code if code < 0 else (code - 128 if container and 128 < code < 160 else None)
    try:
        return code, signal.Signals(sig).name if sig else None
    except ValueError:
        return code, None


class VllmServer:
    """One vLLM server for one trial. Use as a context manager: the tree is always stopped on exit."""

    def __init__(self, trial: Trial, run_dir: str | Path):
        self.trial = trial
        self.engine = engines.get(trial.engine)
        self.run_dir = Path(run_dir)
        self.proc: subprocess.Popen | None = None
        self._warden: warden.Warden | None = None
        self.pidfile: Path | None = None
        self.tmp: Path | None = None
        self.port = trial.port or free_port(trial.host)
        self.base_url = f"http://{trial.host if trial.host != '0.0.0.0' else '127.0.0.1'}:{self.port}"
        self.log_path = self.run_dir / "logs" / f"{trial.trial_id}.log"
        self._raw_log: Path | None = None
        self._read = 0  # bytes of the raw log already read
        self._copied = 0  # bytes written to the redacted copy
        self.survivors: list[int] = []
        self._gpus: list[int] = []  # physical GPUs this trial can see (its CUDA_VISIBLE_DEVICES)
        self._gpu_baseline: dict[int, float] = {}
        self.gpu_note: str | None = None  # set by stop() when NVML still shows the memory held
        self.stop_note: str | None = None  # set by stop(): it had died by itself, or a container was left
        self._stopped = False
        self._own_exit: int | None = None  # return code when the server ended by itself
        self.result: LaunchResult | None = None
        cmd = commands.analyse(trial.vllm_cmd)
        self.runtime = (shutil.which(cmd.argv[0]) or cmd.argv[0]) if cmd.run_at is not None else None
        self.container = (cmd.options.get("--name") or [container_name(trial)])[-1] if self.runtime else None

    def _new_log_path(self) -> Path:
        """logs/<trial_id>.log, or -2, -3 ... when taken: an older record may still point to that log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        stem = self.trial.trial_id
        for n in range(1, 10_000):
            path = self.log_path.parent / (f"{stem}.log" if n == 1 else f"{stem}-{n}.log")
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                return path
            except FileExistsError:
                continue
        raise LaunchRefused(f"logs: {self.log_path.parent} holds 10000 logs of {stem}; use a new run folder")

    # The raw log lives in the launch's private TMPDIR (0700); the run folder only gets the redacted copy.
    # A flooding server must not fill the run folder: the copy stops at MAX_LOG_COPY_BYTES (lines are still
    # scanned for fatal causes), and each read takes at most READ_CHUNK_BYTES.
    def _copy_log(self, *, final: bool = False) -> list[str]:
        if not self._raw_log or not self._raw_log.exists():
            return []
        lines: list[str] = []
        while True:
            with open(self._raw_log, "rb") as f:
                f.seek(self._read)
                chunk = f.read(READ_CHUNK_BYTES)
            cut = chunk.rfind(b"\n") + 1  # only whole lines; the rest waits for the next read
            if final and len(chunk) < READ_CHUNK_BYTES:
                cut = len(chunk)
            if not cut:
                return lines
            text = chunk[:cut].decode(errors="replace")
            self._read += cut
            self._write_copy(text)
            lines += text.splitlines()
            if not final:
                return lines

    def _write_copy(self, text: str) -> None:
        room = MAX_LOG_COPY_BYTES - self._copied
        if room <= 0:
            return
        data = redact_text(text)
        if len(data) > room:
            data = data[:room] + f"\n[vllm-lab: log copy stopped at {MAX_LOG_COPY_BYTES} bytes]\n"
        with open(self.log_path, "a") as out:
            out.write(data)
        self._copied += len(data)

    def _env(self) -> dict[str, str]:
        """The server's environment: the user's caches (HF, vLLM compile cache) shared, TMPDIR private."""
        env = {**os.environ, **self.engine.env(self.trial), **self.trial.env, "TMPDIR": str(self.tmp),
               "PYTHONUNBUFFERED": "1", OWNER_ENV: os.environ.get(OWNER_ENV, str(os.getpid()))}  # fmt: skip
        if env.get(ISOLATE_CACHE_ENV) == "1":  # on request only: a cold torch.compile on every launch
            env["VLLM_CACHE_ROOT"] = str(self.tmp / "vllm-cache")
        if commands.is_local_model(self.trial.model):
            env.setdefault("HF_HUB_OFFLINE", "1")
        return env

    def start(self) -> LaunchResult:
        refuse_if_survivors(self.run_dir)
        check_port_free(self.trial.host, self.port)
        self._gpus = visible_gpus(self.trial)
        self._gpu_baseline = _gpu_used_now(self._gpus)
        argv = build_argv(self.trial, self.port, self.container)
        self.tmp = Path(tempfile.mkdtemp(prefix="vllm-lab-"))  # short path: ZMQ ipc sockets live here
        env = self._env()
        self.log_path = self._new_log_path()
        self._raw_log = self.tmp / "vllm.log"
        t0 = time.monotonic()
        with open(self._raw_log, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=_server_preexec(self.trial.memory_limit_bytes),
            )
        # Ends the server's session if this process dies before stop() (a killed worker, kernel or batch).
        self._warden = warden.start(self.proc.pid, STOP_GRACE_S)
        with contextlib.suppress(psutil.Error):
            where = {"container": self.container, "runtime": self.runtime} if self.container else None
            self.pidfile = _write_pidfile(
                self.run_dir, self.trial.trial_id, psutil.Process(self.proc.pid), self.port, self.tmp, where
            )
        outcome, fatal = self._wait_ready(t0)
        seconds = time.monotonic() - t0
        if outcome != "ready":
            self.stop()
        else:
            self._copy_log()
        text = self.log_path.read_text(errors="replace")
        facts = self.engine.scan(text).to_json()
        failure = facts.get("failure") or (fatal if outcome == "failed" else None)
        if outcome == "failed" and not failure:
            failure = "other"
        code, sig = exit_facts(self._own_exit, bool(self.container))
        evidence, remedy = facts.get("evidence"), facts.get("remedy")
        if outcome == "failed" and sig == "SIGKILL" and not facts.get("failure"):
            evidence, remedy = OOM_KILLER_EVIDENCE, OOM_KILLER_REMEDY
        elif outcome == "failed" and not evidence:
            evidence, remedy = _unexplained_exit(code, sig, text)
        self.result = LaunchResult(
            outcome=outcome,
            seconds_to_outcome=round(seconds, 3),
            argv=redact_argv(argv),
            log_path=str(self.log_path),
            port=self.port,
            base_url=self.base_url,
            backend=backend_of_command(tuple(split_cmd(self.trial.vllm_cmd)), env, self.trial.engine),
            failure=failure if outcome == "failed" else None,
            evidence=evidence if outcome == "failed" else None,
            remedy=remedy if outcome == "failed" else None,
            served_max_model_len=self._served_max_len() if outcome == "ready" else None,
            exit_code=code,
            exit_signal=sig,
            scan=facts,
        )
        return self.result

    def _wait_ready(self, t0: float) -> tuple[str, str | None]:
        deadline = t0 + self.trial.startup_timeout_s
        marker_seen = False
        next_health = t0
        while time.monotonic() < deadline:
            marker = self.engine.ready_marker
            for line in self._copy_log():
                kind = self.engine.fatal(line)
                if kind:
                    return "failed", kind  # fail fast: do not wait for the process to wind down
                marker_seen = marker_seen or bool(marker and marker in line)
            if self.proc.poll() is not None:
                self._own_exit = self.proc.returncode
                for line in self._copy_log(final=True):
                    kind = self.engine.fatal(line)
                    if kind:
                        return "failed", kind
                return "failed", None
            # the engine's ready line, or /health on its own every HEALTH_POLL_S (a log without that line)
            if (marker_seen or time.monotonic() >= next_health) and self._healthy():
                return "ready", None
            if time.monotonic() >= next_health:
                next_health = time.monotonic() + HEALTH_POLL_S
            time.sleep(POLL_S)
        return "timeout", None

    def _healthy(self) -> bool:
        try:  # our own loopback server: never through HTTP(S)_PROXY
            url = f"{self.base_url}{self.engine.health_path}"
            return httpx.get(url, timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def _served_max_len(self) -> int | None:
        try:
            key = self.trial.api_key()  # /v1/* needs the key when the server has one
            auth = {"Authorization": f"Bearer {key}"} if key else None
            data = httpx.get(f"{self.base_url}/v1/models", headers=auth, timeout=5, trust_env=False).json()[
                "data"
            ]
            return int(data[0]["max_model_len"])
        except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError):
            return None

    @property
    def live_log(self) -> Path | None:
        """The log the server is writing now (the run folder's redacted copy lags until the stop); for reading
        only: whatever is quoted from it goes through the record's redaction."""
        return self._raw_log

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> list[int]:
        """End the whole tree (and container) and verify none survives; where NVML exists, wait for the
        trial's GPUs to be back at their baseline. Once only: a failed start stops, and so does __exit__."""
        if self.proc is None or self._stopped:
            return self.survivors
        self._stopped = True
        if self._own_exit is None and self.proc.poll() is not None:
            self._note_own_exit(self.proc.returncode)  # it died by itself (after ready, mid-request)
        left = bool(self.container) and not stop_container(self.runtime, self.container)
        if left:  # keep its pid file: `vllm-lab reap` stops it by name
            self._add_note(f"container {self.container} still runs after `stop` and `kill`")
        self.survivors = stop_tree(self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1)
        warden.release(self._warden)
        self._copy_log(final=True)
        if not self.survivors and not left:
            if self.pidfile:
                self.pidfile.unlink(missing_ok=True)
            if self.tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)
        self.gpu_note = _wait_gpu_memory_released(self._gpu_baseline)
        return self.survivors

    def _note_own_exit(self, code: int) -> None:
        self._own_exit = code
        exit_code, sig = exit_facts(code, bool(self.container))
        if self.result is not None:
            self.result.exit_code, self.result.exit_signal = exit_code, sig
        self._add_note(
            OOM_KILLER_EVIDENCE
            if sig == "SIGKILL"
            else f"the server exited by itself ({sig or f'code {exit_code}'})"
        )

    def _add_note(self, text: str) -> None:
        self.stop_note = f"{self.stop_note}; {text}" if self.stop_note else text

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def refuse_if_survivors(run_dir: Path) -> None:
    alive = live_servers(run_dir)
    if alive:
        first = alive[0]
        raise LaunchRefused(
            f"server: a vLLM server from an earlier run is still alive (pid {first['pid']}"
            + (f", container {first['container']}" if first.get("container") else "")
            + f", trial {first['trial_id']}, port {first['port']}); run `vllm-lab reap {run_dir}` to stop it"
        )


def trial_gpu_env(trial: Trial) -> dict[str, str]:
    """The environment that decides which GPUs a trial's server sees: its env over ours; for a container,
    its `--gpus` (none without it)."""
    c = commands.analyse(trial.vllm_cmd)
    if c.run_at is None:
        return {**os.environ, **trial.env}
    cvd = commands.container_gpu_env(c.options)
    return {} if cvd is None else {"CUDA_VISIBLE_DEVICES": cvd}


def visible_gpus(trial: Trial) -> list[int]:
    """Physical (NVML) indices of the GPUs the trial's server can use ([] without NVML)."""
    from vllm_lab import gpu

    return gpu.visible_physical_indices(env=trial_gpu_env(trial))


def _gpu_used_now(devices: list[int]) -> dict[int, float]:
    """Used MiB per visible GPU before a launch ({} without NVML): the level to come back to after the stop."""
    from vllm_lab import gpu

    return gpu.used_mib(devices) if devices else {}


def _wait_gpu_memory_released(baseline: dict[int, float]) -> str | None:
    """The next launch must not start while the GPU still holds this server's memory; None when freed."""
    if not baseline:
        return None
    from vllm_lab import gpu

    waited = gpu.wait_for_memory_free(list(baseline), baseline)
    return None if waited else f"GPU memory not released after the stop: {getattr(waited, 'reason', '')}"
