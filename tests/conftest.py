"""Shared fixtures. Every launch in tests gets its own run folder under tmp_path (never a shared path)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from vllm_lab.launcher import OWNER_ENV
from vllm_lab.spec import Trial

ROOT = Path(__file__).resolve().parents[1]
FAKE_CMD = f"{sys.executable} -m vllm_lab.testing.fake_vllm"
VLLM_VENV_PY = ROOT / ".venv-vllm" / "bin" / "python"
REAL_CMD = f"{VLLM_VENV_PY} -m vllm.entrypoints.openai.api_server"
TINY_MODEL = ROOT / ".cache" / "models" / "tiny-qwen2"
TINY_AWQ_MODEL = ROOT / ".cache" / "models" / "tiny-qwen2-awq"

# A test run started in the background without job control (`nohup make test &`, a CI runner's shell) inherits
# SIGINT ignored, and so would every process it starts: the Ctrl-C tests (the load's, a Ray task's cancel,
# which Ray delivers as SIGINT) would test nothing. A Ctrl-C in a terminal is never ignored; restore that.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

FAKE_OLLAMA = f"{sys.executable} -m vllm_lab.testing.fake_ollama serve"  # the Ollama stand-in
OLLAMA_MODEL = "qwen3:8b-q4_K_M"
OLLAMA_MODEL_BYTES = 5_027_783_488  # its model layer (Qwen3-8B Q4_K_M): what the stand-in sizes it by


def ollama_store(root: Path, model: str = OLLAMA_MODEL, blob: Path | None = None) -> Path:
    """A model store holding ``model`` as `ollama pull` leaves it (the manifest is what counts); with ``blob``,
    its model layer is that GGUF file (blobs/sha256-...), as the search reads it."""
    from vllm_lab.engines.ollama import manifest_path

    digest = "sha256:" + "ab" * 32
    m = manifest_path(root, model)
    m.parent.mkdir(parents=True)
    layer = {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": OLLAMA_MODEL_BYTES}
    m.write_text(json.dumps({"schemaVersion": 2, "layers": [layer]}))
    if blob is not None:
        (root / "blobs").mkdir(exist_ok=True)
        (root / "blobs" / digest.replace(":", "-")).write_bytes(blob.read_bytes())
    return root


# A config like the tiny model's (512 bytes of KV per token), enough for the fake, which reads only config.json.
FAKE_MODEL_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 40960,
    "vocab_size": 1000, "torch_dtype": "float16",
}  # fmt: skip


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    d = tmp_path / "models" / "tiny-fake"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(FAKE_MODEL_CONFIG))
    return d


@pytest.fixture
def fake_awq_model(tmp_path: Path) -> Path:
    d = tmp_path / "models" / "Qwen3-8B-AWQ"
    d.mkdir(parents=True)
    cfg = {**FAKE_MODEL_CONFIG, "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d


def fake_trial(model, **kw) -> Trial:
    """A short trial of the fake vLLM: small KV budget, a 30 s start-up limit."""
    kw.setdefault("vllm_cmd", FAKE_CMD)
    kw.setdefault("max_model_len", 1024)
    kw.setdefault("kv_cache_memory_bytes", 8 * 2**20)
    kw.setdefault("startup_timeout_s", 30)
    return Trial(model=str(model), **kw)


def fake_env(**knobs) -> dict[str, str]:
    return {f"FAKE_VLLM_{k.upper()}": str(v) for k, v in knobs.items()}


def wait_until(cond, timeout: float = 30.0, step: float = 0.2):
    """cond()'s first truthy value within the timeout, else its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(step)
    return cond()


def processes_in_session(sid: int) -> list[int]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (psutil.Error, OSError):
            pass
    return out


# Servers launched by this test run (also from notebook kernels, which inherit this) carry our pid.
os.environ[OWNER_ENV] = str(os.getpid())
# The batch lock is machine-wide (/tmp): each test process (an xdist worker) gets its own, so two workers'
# batches, or a user's real run on this machine, never refuse each other. Lock tests set theirs.
os.environ["VLLM_LAB_LOCK_DIR"] = tempfile.mkdtemp(prefix="vllm-lab-lock-")


def _ray_own(p: psutil.Process) -> bool:
    """Ray's own processes (raylet, gcs, idle workers) live as long as a test class's cluster; the cluster
    fixtures check that they end with it. A vLLM server a Ray task started is not one of them."""
    # Ray's agents run as `python -u .../site-packages/ray/dashboard/agent.py`, some in their own session.
    return p.name().startswith("ray::") or any("/site-packages/ray/" in part for part in p.cmdline()[:4])


def launched_by_this_run() -> list[psutil.Process]:
    """Live processes whose environment says this pytest process (or a kernel it started) launched them."""
    mine = {str(os.getpid())}
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(OWNER_ENV) in mine and p.status() != psutil.STATUS_ZOMBIE and not _ray_own(p):
                found.append(p)
        except (psutil.Error, OSError):
            pass
    return found


# What runs one at a time under `make test`'s two workers (pytest -n 2 --dist loadgroup): the real servers use
# both cores, a Ray cluster times out beside another, the browser tests start JupyterLab. Everything else mostly
# waits on a fake server or a kernel and runs beside them.
HEAVY_FILES = {"test_ray_cluster.py", "test_ray.py", "test_lab.py", "test_vllm_cpu.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (
            item.get_closest_marker("vllm")
            or item.get_closest_marker("llamacpp")
            or item.path.name in HEAVY_FILES
        ):
            item.add_marker(pytest.mark.xdist_group("heavy"))


@pytest.fixture(autouse=True)
def no_leftover_vllm(request):
    """After every test, no server launched by this test run may survive (other sessions' servers are left alone)."""
    before = {p.pid for p in launched_by_this_run()}
    yield
    # a warden sees within seconds that the session it guarded was ended by a reap: not a leak
    left = psutil.wait_procs([p for p in launched_by_this_run() if p.pid not in before], timeout=5)[1]
    seen = []
    for p in left:
        with contextlib.suppress(psutil.Error):
            seen.append(
                f"{p.pid} (parent {p.ppid()}, session {os.getsid(p.pid)}): {' '.join(p.cmdline())[:160]}"
            )
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not left, f"processes survived {request.node.name}: {seen or [p.pid for p in left]}"
