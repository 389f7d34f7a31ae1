"""Launch the real vLLM server for one trial, watch it, and stop its whole process tree.

Modelled on vLLM's own tests/utils.py RemoteOpenAIServer: a free port, the log streamed to a file (never
an unread pipe), readiness that also checks the process is alive, terminate -> wait -> kill. Beyond that:
fail fast on the first fatal log line, its own session per launch (so EngineCore and every other child can
be found and ended), a pid file per live server (so a later run can refuse to start beside a survivor and
`vllm-lab reap` can end it), and secrets redacted in the log copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from vllm_lab import logscan
from vllm_lab.compat import legacy_quantization_flag  # the older launcher: flag from the model NAME
from vllm_lab.redact import redact_argv, redact_text
from vllm_lab.spec import SpecError, Trial, split_cmd

POLL_S = 0.05
READ_CHUNK_BYTES = 4 << 20
MAX_LOG_COPY_BYTES = 64 << 20
OWNER_ENV = "VLLM_LAB_OWNER"  # set in every launched server's environment: which process launched it
STOP_GRACE_S = 8.0


class LaunchRefused(SpecError):
    """The launch cannot start (port taken, survivor alive): one line with the fix."""


def quantization_flag(trial: Trial) -> str | None:
    if trial.launcher == "legacy":
        return legacy_quantization_flag(trial.model)
    if trial.launcher == "explicit":
        return trial.quantization
    return None  # head: let vLLM read the model's config.json


BATCH_PID_ENV = "VLLM_LAB_BATCH_PID"  # set by the batch for the kernels it starts


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


def build_argv(trial: Trial, port: int) -> list[str]:
    cmd = split_cmd(trial.vllm_cmd)
    # `vllm serve MODEL` takes the model positionally; the api_server module takes --model.
    argv = [*cmd, trial.model] if cmd[-1] == "serve" else [*cmd, "--model", trial.model]
    quant = quantization_flag(trial)
    if quant:
        argv += ["--quantization", quant]
    if trial.max_model_len is not None:
        argv += ["--max-model-len", str(trial.max_model_len)]
    if trial.kv_cache_memory_bytes is not None:
        argv += ["--kv-cache-memory-bytes", str(trial.kv_cache_memory_bytes)]
    elif trial.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(trial.gpu_memory_utilization)]
    argv += ["--host", trial.host, "--port", str(port), *trial.extra_args]
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


def _write_pidfile(run_dir: Path, trial_id: str, proc: psutil.Process, port: int, tmp: Path) -> Path:
    path = _pid_dir(run_dir) / f"{trial_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "pid": proc.pid,
        "create_time": proc.create_time(),
        "port": port,
        "tmp": str(tmp),
        "trial_id": trial_id,
    }
    path.write_text(json.dumps(info))
    return path


def live_servers(run_dir: str | Path) -> list[dict]:
    """Servers recorded in pid files whose process (same pid AND start time) is still alive."""
    alive = []
    for path in sorted(_pid_dir(Path(run_dir)).glob("*.json")):
        try:
            info = json.loads(path.read_text())
            proc = psutil.Process(info["pid"])
            if abs(proc.create_time() - info["create_time"]) < 1 and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append({**info, "pidfile": str(path)})
                continue
        except (psutil.Error, OSError, ValueError, KeyError):
            pass
        path.unlink(missing_ok=True)  # stale: that server is gone
    return alive


def reap(run_dir: str | Path) -> list[int]:
    """End every server left alive by an earlier run in this folder; return the pids that were ended."""
    ended = []
    for info in live_servers(run_dir):
        survivors = stop_tree(info["pid"])
        if survivors:
            raise RuntimeError(f"could not end pids {survivors}")
        shutil.rmtree(info["tmp"], ignore_errors=True)
        Path(info["pidfile"]).unlink(missing_ok=True)
        ended.append(info["pid"])
    return ended


def cli_reap(args) -> int:
    ended = reap(args.run_dir)
    print(f"ended {len(ended)} server(s): {ended}" if ended else "no live server recorded in " + args.run_dir)
    return 0


# --- stopping a tree ------------------------------------------------------------------------------------------


def _session_members(sid: int) -> list[psutil.Process]:
    """Every process in session `sid`: children that were re-parented to init are found this way too."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == sid:
                found.append(p)
    return found


def stop_tree(pid: int, grace_s: float = STOP_GRACE_S) -> list[int]:
    """Terminate, wait, kill: the process, its descendants and its whole session. Returns survivor pids.

    Every server is started as the leader of its own session (sid == pid), so the session is swept even
    when the leader is already gone and its children were re-parented to init.
    """
    procs: dict[int, psutil.Process] = {p.pid: p for p in _session_members(pid)}
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        procs[root.pid] = root
        procs.update({c.pid: c for c in root.children(recursive=True)})
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _gone, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    _gone, alive = psutil.wait_procs(alive, timeout=5)
    late = [p for p in _session_members(pid) if p.pid not in procs]  # anything spawned during the kill
    for p in late:
        with contextlib.suppress(psutil.Error):
            p.kill()
    alive += psutil.wait_procs(late, timeout=5)[1]
    return [p.pid for p in alive if _really_alive(p)]


def _really_alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --- the server -----------------------------------------------------------------------------------------------


@dataclass
class LaunchResult:
    outcome: str  # ready | failed | timeout
    seconds_to_outcome: float
    argv: list[str]  # redacted
    log_path: str
    port: int
    base_url: str
    backend: str | None
    failure: str | None = None
    evidence: str | None = None
    remedy: str | None = None
    served_max_model_len: int | None = None
    exit_code: int | None = None
    scan: dict = field(default_factory=dict)  # logscan facts (kv tokens, version, ...)


def detect_backend(log_text: str) -> str | None:
    """From what the server printed, never assumed: None where the log does not say (it died too early)."""
    if "FAKE vLLM" in log_text:
        return "fake"
    low = log_text.lower()
    if any(
        m in low
        for m in ("detected platform cpu", "cpu kv cache size", "cpu memory utilization", "on node 0")
    ):
        return "vllm-cpu"
    if any(m in low for m in ("detected platform cuda", "gpu kv cache size", "cuda", "# gpu blocks")):
        return "vllm-cuda"
    return None


@functools.cache
def backend_of_command(cmd: tuple[str, ...]) -> str | None:
    """Which vLLM build the command runs, from its environment's installed packages (no vLLM import)."""
    if any("fake_vllm" in part for part in cmd):
        return "fake"
    python = cmd[0] if "-m" in cmd else _shebang_python(cmd[0])
    if not python:
        return None
    code = ("import importlib.metadata as m\nnames={d.metadata['Name'].lower() for d in m.distributions()}\n"
            "print('vllm-cpu' if 'vllm-cpu' in names else 'vllm-cuda' if 'vllm' in names else '')")  # fmt: skip
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out or None


def _shebang_python(exe: str) -> str | None:
    path = shutil.which(exe)
    try:
        first = Path(path).read_bytes()[:200].split(b"\n", 1)[0].decode() if path else ""
    except OSError:
        return None
    return first[2:].strip().split()[0] if first.startswith("#!") else None


class VllmServer:
    """One vLLM server for one trial. Use as a context manager: the tree is always stopped on exit."""

    def __init__(self, trial: Trial, run_dir: str | Path):
        self.trial = trial
        self.run_dir = Path(run_dir)
        self.proc: subprocess.Popen | None = None
        self.pidfile: Path | None = None
        self.tmp: Path | None = None
        self.port = trial.port or free_port(trial.host)
        self.base_url = f"http://{trial.host if trial.host != '0.0.0.0' else '127.0.0.1'}:{self.port}"
        self.log_path = self.run_dir / "logs" / f"{trial.trial_id}.log"
        self._raw_log: Path | None = None
        self._read = 0  # bytes of the raw log already read
        self._copied = 0  # bytes written to the redacted copy
        self.survivors: list[int] = []
        self._gpu_baseline: dict[int, float] = {}
        self.gpu_note: str | None = None  # set by stop() when NVML still shows the memory held

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

    def start(self) -> LaunchResult:
        refuse_if_survivors(self.run_dir)
        check_port_free(self.trial.host, self.port)
        self._gpu_baseline = _gpu_used_now()
        argv = build_argv(self.trial, self.port)
        self.tmp = Path(tempfile.mkdtemp(prefix="vllm-lab-"))  # short path: ZMQ ipc sockets live here
        env = {**os.environ, **self.trial.env, "TMPDIR": str(self.tmp),
               "VLLM_CACHE_ROOT": str(self.tmp / "vllm-cache"), "XDG_CACHE_HOME": str(self.tmp / "xdg-cache"),
               "PYTHONUNBUFFERED": "1", OWNER_ENV: os.environ.get(OWNER_ENV, str(os.getpid()))}  # fmt: skip
        if Path(self.trial.model).is_dir():
            env.setdefault("HF_HUB_OFFLINE", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("")
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
                preexec_fn=_die_with_parent,
            )
        with contextlib.suppress(psutil.Error):
            self.pidfile = _write_pidfile(
                self.run_dir, self.trial.trial_id, psutil.Process(self.proc.pid), self.port, self.tmp
            )
        outcome, fatal = self._wait_ready(t0)
        seconds = time.monotonic() - t0
        if outcome != "ready":
            self.stop()
        else:
            self._copy_log()
        text = self.log_path.read_text(errors="replace")
        scan = logscan.scan_log(text)
        facts = scan.to_json()
        failure = facts.get("failure") or (fatal if outcome == "failed" else None)
        if outcome == "failed" and not failure:
            failure = "other"
        return LaunchResult(
            outcome=outcome,
            seconds_to_outcome=round(seconds, 3),
            argv=redact_argv(argv),
            log_path=str(self.log_path),
            port=self.port,
            base_url=self.base_url,
            backend=detect_backend(text) or backend_of_command(tuple(argv[:3])),
            failure=failure if outcome == "failed" else None,
            evidence=facts.get("evidence") if outcome == "failed" else None,
            remedy=facts.get("remedy") if outcome == "failed" else None,
            served_max_model_len=self._served_max_len() if outcome == "ready" else None,
            exit_code=self.proc.returncode,
            scan=facts,
        )

    def _wait_ready(self, t0: float) -> tuple[str, str | None]:
        deadline = t0 + self.trial.startup_timeout_s
        marker_seen = False
        while time.monotonic() < deadline:
            for line in self._copy_log():
                kind = logscan.classify_line(line)
                if kind:
                    return "failed", kind  # fail fast: do not wait for the process to wind down
                marker_seen = marker_seen or logscan.READY_MARKER in line
            if self.proc.poll() is not None:
                for line in self._copy_log(final=True):
                    kind = logscan.classify_line(line)
                    if kind:
                        return "failed", kind
                return "failed", None
            if marker_seen and self._healthy():
                return "ready", None
            time.sleep(POLL_S)
        return "timeout", None

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _served_max_len(self) -> int | None:
        try:
            key = self.trial.api_key()  # /v1/* needs the key when the server has one
            auth = {"Authorization": f"Bearer {key}"} if key else None
            data = httpx.get(f"{self.base_url}/v1/models", headers=auth, timeout=5).json()["data"]
            return int(data[0]["max_model_len"])
        except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError):
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> list[int]:
        """End the whole tree and verify none survives; where NVML exists, wait for its memory to be freed."""
        if self.proc is None:
            return []
        self.survivors = stop_tree(self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1)
        self._copy_log(final=True)
        if not self.survivors:
            if self.pidfile:
                self.pidfile.unlink(missing_ok=True)
            if self.tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)
        self.gpu_note = _wait_gpu_memory_released(self._gpu_baseline)
        return self.survivors

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def refuse_if_survivors(run_dir: Path) -> None:
    alive = live_servers(run_dir)
    if alive:
        first = alive[0]
        raise LaunchRefused(
            f"server: a vLLM server from an earlier run is still alive (pid {first['pid']}, trial "
            f"{first['trial_id']}, port {first['port']}); run `vllm-lab reap {run_dir}` to stop it"
        )


def _gpu_used_now() -> dict[int, float]:
    """Used MiB per GPU before a launch ({} without NVML): the level to come back to after the stop."""
    from vllm_lab import gpu

    return gpu.used_mib()


def _wait_gpu_memory_released(baseline: dict[int, float]) -> str | None:
    """The next launch must not start while the GPU still holds this server's memory; None when freed."""
    if not baseline:
        return None
    from vllm_lab import gpu

    waited = gpu.wait_for_memory_free(list(baseline), baseline)
    return None if waited else f"GPU memory not released after the stop: {getattr(waited, 'reason', '')}"


def signal_name(code: int | None) -> str | None:
    if code is None or code >= 0:
        return None
    return signal.Signals(-code).name
