"""GGUF memory model (issue 23): KV bytes against what a real llama-server printed, to the hundredth of a MiB."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from vllm_lab import memory_gguf as mg
from vllm_lab.engines.llamacpp_log import scan_log

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / ".cache" / "models" / "tiny-qwen2.gguf"
RUNS = ROOT / "tests" / "fixtures" / "logs" / "llamacpp" / "kv-runs"
SERVER = ROOT / ".venv-llamacpp" / "bin" / "llama-server"

# config name -> (-c, -np, -kvu, cache type, flash attention)
CONFIGS = {
    "c1000_np1": (1000, 1, False, "f16", None),
    "c4096_np1": (4096, 1, False, "f16", None),
    "c8192_np1_faoff": (8192, 1, False, "f16", False),
    "c8192_np1_faon": (8192, 1, False, "f16", True),
    "c32768_np1_faoff": (32768, 1, False, "f16", False),
    "c32768_np1_faon": (32768, 1, False, "f16", True),
    "c4096_q8": (4096, 1, False, "q8_0", True),
    "c4096_q4": (4096, 1, False, "q4_0", True),
    "c1000_np3": (1000, 3, False, "f16", None),
    "c40960_np4": (40960, 4, False, "f16", None),
    "c1024_np4kvu": (1024, 4, True, "f16", None),
}

# The tiny model's shape, as its GGUF says (written by `vllm-lab tiny-model --gguf`)
TINY_FACTS = mg.GgufFacts(
    arch="qwen2", n_layer=2, n_head=4, n_head_kv=(2, 2), head_dim_k=32, head_dim_v=32, n_ctx_train=40960,
    n_embd=128, n_ff=256, n_vocab=512, weights_bytes=725504,
)  # fmt: skip


def test_runs_cover_every_config():
    assert {p.stem for p in RUNS.glob("*.txt")} == set(CONFIGS)


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kv_prediction_matches_what_llamacpp_printed(name):
    # pinned from real runs of llama.cpp build 11549 (xllamacpp) on the tiny GGUF, read by our own log scanner
    c, np_, kvu, cache, _ = CONFIGS[name]
    printed = scan_log((RUNS / f"{name}.txt").read_text())
    est = mg.kv_bytes(TINY_FACTS, c, np_, kvu, cache, cache)
    assert f"{est.mib:.2f}" == f"{printed.kv_cache_mib:.2f}"
    assert (est.n_ctx, est.n_ctx_slot) == (printed.n_ctx, printed.n_ctx_slot)
    assert printed.n_slots == np_


@pytest.mark.unit
@pytest.mark.parametrize("name", ["c8192_np1_faoff", "c8192_np1_faon", "c32768_np1_faoff", "c32768_np1_faon"])
def test_compute_buffer_estimate_is_within_a_mib_on_the_cpu_runs(name):
    c, _, _, _, fa = CONFIGS[name]
    printed = float(re.search(r"compute buffer size = +([\d.]+) MiB", (RUNS / f"{name}.txt").read_text())[1])
    est = mg.compute_buffer_bytes(TINY_FACTS, c, fa) / mg.MIB
    assert abs(est - printed) < 1.0, (est, printed)


@pytest.mark.unit
def test_rounding_and_slots():
    assert mg.context_cells(1000) == (1024, 1024)
    assert mg.context_cells(1000, 3) == (1536, 512)  # llama.cpp: "rounding down to 1536"
    assert mg.context_cells(40960, 4) == (40960, 10240)
    assert mg.context_cells(1000, 3, kv_unified=True) == (1024, 1024)
    with pytest.raises(ValueError, match="divisible by 32"):
        mg.cache_row_bytes("q8_0", 48)


@pytest.mark.unit
def test_read_gguf_tiny_model():
    if not TINY.exists():
        pytest.skip("no tiny GGUF: run `vllm-lab tiny-model --gguf`")
    facts = mg.read_gguf(TINY)
    assert facts.n_layer == 2 and facts.n_head_kv == (2, 2) and facts.head_dim_k == 32
    assert facts.weights_bytes == TINY_FACTS.weights_bytes  # the tensor table's sum, not the file size
    assert facts.weights_bytes < TINY.stat().st_size


@pytest.mark.unit
def test_qwen3_8b_q4_k_m_on_a_p40():
    q = mg.qwen3_8b_q4_k_m()
    # 36 layers x 8 KV heads x 128 x (K+V): 144 KiB/token in f16; 34/64 of it in q8_0
    assert mg.kv_bytes_per_token(q) == 147456
    assert mg.kv_bytes_per_token(q, "q8_0", "q8_0") == 78336
    # llama-server's own figures for this shape at -c 8192 (a public ground truth): 1152 / 612 MiB
    assert mg.kv_bytes(q, 8192).mib == 1152.0
    assert mg.kv_bytes(q, 8192, cache_k="q8_0", cache_v="q8_0").mib == 612.0
    f16 = mg.fit(q, 24576, 40960)
    q8 = mg.fit(q, 24576, 40960, cache_k="q8_0", cache_v="q8_0", flash_attn=True)
    assert f16.kv_gib == 5.625 and round(q8.kv_gib, 2) == 2.99
    assert f16.fits and q8.fits
    with pytest.raises(ValueError, match="flash attention"):
        mg.fit(q, 24576, 40960, cache_v="q8_0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.llamacpp
def test_real_llama_server_prints_the_predicted_kv(tmp_path):
    if not SERVER.exists() or not TINY.exists():
        pytest.skip("needs .venv-llamacpp (scripts/install-llamacpp.sh) and the tiny GGUF")
    log = tmp_path / "server.log"
    argv = [str(SERVER), "-m", str(TINY), "-c", "1000", "-np", "3", "--port", str(_free_port()), "-lv", "4"]
    argv += ["-t", "1", "--no-warmup"]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "n_slots =" not in log.read_text() and proc.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)
    printed = scan_log(log.read_text())
    est = mg.kv_bytes(mg.read_gguf(TINY), 1000, 3)
    assert f"{est.mib:.2f}" == f"{printed.kv_cache_mib:.2f}" and printed.n_ctx == est.n_ctx == 1536


@pytest.mark.unit
def test_preflight_p40_gains_predicted_llamacpp_rows(capsys):
    from vllm_lab import predict
    from vllm_lab.cli import main

    pf = predict.preflight("Qwen3-8B-AWQ", "p40")
    rows = {(r["cache_k"], r["flash_attn"]): r for r in pf.llamacpp}
    assert set(rows) == {("f16", False), ("f16", True), ("q8_0", True)}
    assert all(r["prediction"] and r["c"] == 40960 and r["fits"] for r in rows.values())
    assert round(rows["f16", True]["weights_gib"], 2) == 4.68 and rows["f16", True]["kv_gib"] == 5.625
    assert round(rows["q8_0", True]["kv_gib"], 2) == 2.99
    assert main(["preflight", "--model", "Qwen3-8B-AWQ", "--gpu", "p40"]) == 0
    out = capsys.readouterr().out
    assert "llama.cpp (GGUF Q4_K_M), PREDICTED (no launch): -c 40,960 (the model's full context)" in out
    assert main(["predict", "--model", "Qwen3-8B-AWQ", "--gpu", "p40", "--engine", "llamacpp"]) == 0
    assert "q8_0       on     4.68 GiB   2.99 GiB" in capsys.readouterr().out
    assert main(["predict", "--model", "Qwen3-8B-AWQ", "--engine", "llamacpp"]) == 2
    assert "give the card" in capsys.readouterr().err
