"""Shared fixtures. Every launch in tests gets its own run folder under tmp_path (never a shared path)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_CMD = f"{sys.executable} -m vllm_lab.testing.fake_vllm"
VLLM_VENV_PY = ROOT / ".venv-vllm" / "bin" / "python"
REAL_CMD = f"{VLLM_VENV_PY} -m vllm.entrypoints.openai.api_server"
TINY_MODEL = ROOT / ".cache" / "models" / "tiny-qwen2"
TINY_AWQ_MODEL = ROOT / ".cache" / "models" / "tiny-qwen2-awq"

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


def fake_env(**knobs) -> dict[str, str]:
    return {f"FAKE_VLLM_{k.upper()}": str(v) for k, v in knobs.items()}


def processes_in_session(sid: int) -> list[int]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (psutil.Error, OSError):
            pass
    return out


@pytest.fixture(autouse=True)
def no_leftover_vllm(request):
    """After every test, no fake or real vLLM started by this test run may survive."""
    before = {p.pid for p in psutil.process_iter()}
    yield
    left = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid in before:
            continue
        cmd = " ".join(p.info.get("cmdline") or [])
        if "fake_vllm" in cmd or "vllm.entrypoints" in cmd:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append((p.pid, cmd[:120]))
                    p.kill()
            except psutil.Error:
                pass
    assert not left, f"processes survived {request.node.name}: {left}"
