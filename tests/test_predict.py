"""predict.py: the CLI (predict, preflight), the P40/AWQ verdict, predict_trial_outcome, and the notebook."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_lab import gpu, predict
from vllm_lab.cli import main

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


class _NoDriver:
    class NVMLError_LibraryNotFound(Exception):
        pass

    def nvmlInit(self):
        raise self.NVMLError_LibraryNotFound("NVML Shared Library Not Found")


@pytest.fixture
def no_gpu():
    previous = gpu.set_nvml(_NoDriver())
    yield
    gpu.set_nvml(previous)


# --------------------------------------------------------------------------------------------- CLI predict


def test_cli_predict_json_has_the_keys_and_the_inputs(capsys):
    assert main(["predict", "--model", "Qwen3-8B-AWQ", "--gpu", "p40", "--gpu-memory-utilization", "0.85",
                 "--json"]) == 0  # fmt: skip
    d = json.loads(capsys.readouterr().out)
    assert d["kv_bytes_per_token"] == 147456
    assert {
        "kv_cache_tokens",
        "max_model_len",
        "inputs",
        "band",
        "weights_estimated",
        "available_kv_gib",
    } <= set(d)
    assert d["inputs"]["gpu"] == "Tesla P40" and d["inputs"]["gpu_memory_gib"] == 24.0
    assert d["inputs"]["gpu_memory_utilization"] == 0.85 and d["weights_estimated"] is True
    lo, hi = d["band"]["kv_cache_tokens"]
    assert lo <= d["kv_cache_tokens"] <= hi and d["max_model_len"] == 40960


def test_cli_predict_with_a_kv_budget_needs_no_gpu(capsys):
    assert main(["predict", "--model", "qwen3-8b-awq", "--kv-cache-gib", "2", "--kv-cache-dtype", "fp8",
                 "--vllm-version", "0.33.0", "--json"]) == 0  # fmt: skip
    d = json.loads(capsys.readouterr().out)
    assert d["kv_bytes_per_token"] == 73728
    assert d["kv_cache_tokens"] == (2 * 2**30 // (73728 * 16) - 1) * 16  # 0.32+ keep one null block back


def test_cli_predict_text_says_weights_were_estimated(capsys):
    assert (
        main(["predict", "--model", "Qwen3-14B-AWQ", "--gpu-memory-gib", "24", "--overhead-gib", "1.5"]) == 0
    )
    out = capsys.readouterr().out
    assert "ESTIMATED" in out and "largest max_model_len that starts" in out and "163,840 KV bytes" in out


def test_cli_bad_input_is_one_line_and_exit_2(capsys):
    assert main(["predict", "--model", "Qwen3-8B-AWQ"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vllm-lab predict: gpu:") and "\n" not in err
    assert main(["predict", "--model", "no-such-model", "--gpu", "p40"]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert main(["preflight", "--model", "Qwen3-8B-AWQ", "--gpu", "gtx1080"]) == 2
    assert "not a known GPU profile" in capsys.readouterr().err


def test_gpu_auto_without_a_gpu_says_pass_gpu_name(no_gpu, capsys):
    assert main(["preflight", "--model", "Qwen3-8B-AWQ", "--gpu", "auto"]) == 2
    err = capsys.readouterr().err
    assert "no NVIDIA GPU" in err and "pass --gpu NAME" in err and "p40" in err


# --------------------------------------------------------------------------------------------- preflight


def test_p40_awq_preflight_says_no_awq_path_and_what_works():
    pf = predict.preflight("Qwen3-8B-AWQ", "p40")
    assert not pf.any_can_start and len(pf.rows) == 12
    text = " ".join(pf.summary)
    assert "has no AWQ path on Tesla P40 (compute capability 6.1) whatever the flag" in text
    assert "awq needs 7.5, awq_marlin 8.0" in text
    alt = " ".join(pf.alternatives)
    assert "fp16 (unquantized) checkpoint" in alt and "fits" in alt and "GPTQ" in alt
    assert "GGUF" in alt and "llama.cpp or Ollama" in alt
    legacy = [r for r in pf.rows if r.launcher == "legacy"]
    assert {r.failure for r in legacy} == {"quantization_mismatch"} and legacy[0].quantization == "awq_marlin"
    assert legacy[0].message.startswith(
        "Quantization method specified in the model config (awq) does not match"
    )
    head = [r for r in pf.rows if r.launcher == "head"]
    assert {r.failure for r in head} == {"quantization_unsupported_gpu"}
    assert head[0].message.endswith("Minimum capability: 75. Current capability: 61.")
    assert {(r.launcher, r.quantization) for r in pf.rows} >= {
        ("explicit", "awq"),
        ("explicit", "awq_marlin"),
    }
    assert {r.dtype for r in pf.rows} == {"auto", "float16", "bfloat16"}
    assert all(r.max_model_len_085 is None for r in pf.rows)  # nothing starts: no capacity claimed per row


def test_a100_preflight_starts_with_capacity_at_085_and_095():
    pf = predict.preflight("Qwen3-32B-AWQ", "a100-40gb", "0.19.0")
    ok = [r for r in pf.rows if r.can_start]
    assert {(r.launcher, r.dtype) for r in ok} >= {("legacy", "auto"), ("head", "auto"), ("head", "bfloat16")}
    assert all(r.effective_quantization == "awq_marlin" for r in ok if r.launcher != "explicit")
    explicit_bf16 = next(
        r for r in pf.rows if (r.launcher, r.quantization, r.dtype) == ("explicit", "awq", "bfloat16")
    )
    assert explicit_bf16.failure == "dtype_unsupported_gpu"
    r = ok[0]
    assert 0 < r.max_model_len_085 <= r.max_model_len_095 <= 40960
    assert pf.alternatives == []


def test_cli_preflight_text_and_json(capsys):
    assert main(["preflight", "--model", "Qwen3-8B-AWQ", "--gpu", "p40"]) == 0
    out = capsys.readouterr().out
    assert "launcher" in out and "awq_marlin" in out and "no AWQ path" in out and "llama.cpp" in out
    assert (
        main(["preflight", "--model", "Qwen3-8B-AWQ", "--gpu", "t4", "--vllm-version", "0.11.0", "--json"])
        == 0
    )
    d = json.loads(capsys.readouterr().out)
    assert d["any_can_start"] is True and d["gpu"]["cc_int"] == 75 and d["vllm_version"] == "0.11.0"
    head_auto = next(r for r in d["rows"] if r["launcher"] == "head" and r["dtype"] == "auto")
    assert head_auto["can_start"] and head_auto["effective_quantization"] == "awq"
    assert head_auto["max_model_len_085"] and head_auto["max_model_len_095"]


# --------------------------------------------------------------------------------------------- the notes' card

NOTES_KV_TOKENS = 22256  # "GPU KV cache size: 22,256 tokens" (the rollback notes, RTX 3060 12 GB, 0.85)


def test_rtx3060_profile_is_the_card_the_notes_measured_on():
    card = gpu.load_gpu_profile("rtx3060-12gb")
    assert round(card.memory_gib, 2) == 11.76 and card.cc_int == 86 and card.bf16
    assert gpu.load_gpu_profile("NVIDIA GeForce RTX 3060").name == card.name


def test_predict_on_rtx3060_lands_within_1pct_of_the_notes_kv_size(capsys):
    assert main(["predict", "--model", "Qwen3-8B-AWQ", "--gpu", "rtx3060-12gb", "--gpu-memory-utilization", "0.85",
                 "--json"]) == 0  # fmt: skip
    d = json.loads(capsys.readouterr().out)
    assert d["kv_bytes_per_token"] == 36 * 8 * 128 * 2 * 2  # 144 KiB
    assert abs(d["kv_cache_tokens"] - NOTES_KV_TOKENS) <= 0.01 * NOTES_KV_TOKENS, d["kv_cache_tokens"]
    # the overhead comes from the notes' "Available KV cache memory: 3.06 GiB", not from the token count
    assert d["overhead_source"].startswith("observed on GeForce RTX 3060 12GB: 0.85 x 11.76 GiB")
    assert "'Available KV cache memory: 3.06 GiB'" in d["overhead_source"]
    assert d["available_kv_gib"] == pytest.approx(3.06, abs=0.005)
    assert d["overhead_gib"] == pytest.approx(0.85 * 11.76 - d["weights_gib"] - 3.06, abs=1e-3)
    assert d["max_model_len"] >= 16384  # the notes' 16384 started


def test_observed_overhead_yields_to_a_given_one_and_to_other_cards(capsys):
    assert main(["predict", "--model", "Qwen3-8B-AWQ", "--gpu", "rtx3060", "--gpu-memory-utilization", "0.85",
                 "--overhead-gib", "2", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["overhead_source"] == "given"
    p = predict.predict_for("Qwen3-8B-AWQ", "rtx-3090", gpu_memory_utilization=0.85)
    assert p.overhead_source.startswith("default band")  # observed on the 3060 only


def test_from_vllm_021_the_notes_cuda_graphs_come_out_of_the_kv_budget():
    before = predict.predict_for(
        "Qwen3-8B-AWQ", "rtx3060-12gb", gpu_memory_utilization=0.85, vllm_version="0.20.0"
    )
    after = predict.predict_for(
        "Qwen3-8B-AWQ", "rtx3060-12gb", gpu_memory_utilization=0.85, vllm_version="0.21.0"
    )
    assert after.overhead_gib == pytest.approx(before.overhead_gib + 1.38)
    assert (
        "CUDA graphs 1.38 GiB" in after.overhead_source
        and after.kv_cache_tokens < 16384 < before.kv_cache_tokens
    )


def test_preflight_rtx3060_refutes_h1_and_names_the_suspects_at_095(capsys):
    assert main(["preflight", "--model", "Qwen3-8B-AWQ", "--gpu", "rtx3060-12gb"]) == 0
    out = capsys.readouterr().out
    assert ("H1 (the --quantization flag is needed) is refuted on GeForce RTX 3060 12GB (compute capability 8.6): "
            "both launchers start, the legacy one (--quantization awq_marlin) and the head one (no flag); with no "
            "flag vLLM turns the awq checkpoint into awq_marlin by itself.") in out  # fmt: skip
    assert "0.95 x 11.76 = 11.17 GiB requested leaves 0.59 GiB, less than the 1.38 GiB of CUDA graphs" in out
    assert "--enforce-eager" in out and "--gpu-memory-utilization 0.88 or lower" in out
    assert (
        "Free memory on device ... is less than desired GPU memory utilization" in out
        and "free the GPU" in out
    )
    assert main(["preflight", "--model", "Qwen3-8B-AWQ", "--gpu", "rtx3060-12gb", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["h1"] == "refuted"
    assert d["launchers"]["legacy"] == {"flag": "awq_marlin", "can_start": True, "failure": None,
                                        "effective_quantization": "awq_marlin"}  # fmt: skip
    assert d["launchers"]["head"]["flag"] is None and d["launchers"]["head"]["can_start"] is True
    assert d["launchers"]["head"]["effective_quantization"] == "awq_marlin"
    graphs, others = d["suspects"]
    assert (
        graphs["name"] == "cuda_graphs_outside_budget" and others["name"] == "memory_held_by_other_processes"
    )
    assert graphs["numbers"] == {"gpu_memory_utilization": 0.95, "total_gib": 11.76, "requested_gib": 11.17,
                                 "left_gib": 0.59, "cuda_graph_gib": 1.38, "highest_utilization_with_graphs": 0.88}  # fmt: skip
    assert "--enforce-eager" in graphs["knob"] and "free the GPU" in others["knob"]


def test_preflight_p40_says_neither_launcher_starts_and_names_no_memory_suspect(capsys):
    assert main(["preflight", "--model", "Qwen3-8B-AWQ", "--gpu", "p40"]) == 0
    out = capsys.readouterr().out
    assert "cannot be the cause on Tesla P40 (compute capability 6.1): neither launcher starts" in out
    assert "suspects" not in out
    assert main(["preflight", "--model", "Qwen3-8B-AWQ", "--gpu", "p40", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["h1"] == "neither_starts" and d["suspects"] == []
    assert {k: v["can_start"] for k, v in d["launchers"].items()} == {"legacy": False, "head": False}


def test_suspects_follow_the_vllm_version():
    late = predict.preflight("Qwen3-8B-AWQ", "rtx3060-12gb", "0.21.0")
    assert [x["name"] for x in late.suspects] == [
        "memory_held_by_other_processes"
    ]  # graphs inside the budget
    early = predict.preflight("Qwen3-8B-AWQ", "rtx3060-12gb", "0.8.5")
    assert "does not check free memory at start" in early.suspects[-1]["why"]
    roomy = predict.preflight("Qwen3-8B-AWQ", "a100-80gb")  # 4 GiB left at 0.95: the graphs fit
    assert [x["name"] for x in roomy.suspects] == ["memory_held_by_other_processes"]
    plain = predict.preflight("Qwen3-8B-AWQ", "rtx-3090")
    assert (
        plain.h1 == "refuted"
        and "measured for this model on GeForce RTX 3060 12GB" in plain.suspects[0]["why"]
    )
    assert "cuda_graph_gib" not in plain.suspects[1]["numbers"]


# --------------------------------------------------------------------------------------------- one trial


def _model(tmp_path: Path, name: str, awq: bool) -> Path:
    d = tmp_path / name
    d.mkdir()
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 40960,
           "vocab_size": 1000, "torch_dtype": "float16"}  # fmt: skip
    if awq:
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    ("max_len", "budget", "outcome", "failure"),
    [(16384, 10 * 2**20, "ready", None), (22256, 10 * 2**20, "failed", "kv_cache_insufficient"),
     (32768, 20 * 2**20, "ready", None), (65536, 20 * 2**20, "failed", "max_len_exceeds_model")],
)  # fmt: skip
def test_trial_outcome_from_a_kv_budget_without_a_gpu(tmp_path, max_len, budget, outcome, failure):
    d = _model(tmp_path, "tiny-qwen2", awq=False)
    out = predict.predict_trial_outcome(d, None, "head", None, max_len, None, budget, block_size=16)
    assert (out["outcome"], out["failure"]) == (outcome, failure)
    assert set(out) == {
        "outcome",
        "failure",
        "reason",
        "predicted_kv_cache_tokens",
        "predicted_max_model_len",
    }
    assert out["predicted_kv_cache_tokens"] == budget // (512 * 16) * 16


def test_trial_outcome_without_a_gpu_assumes_the_cpu_builds_blocks(tmp_path):
    d = _model(tmp_path, "tiny-qwen2", awq=False)
    out = predict.predict_trial_outcome(d, None, "head", None, 4096, None, 1_000_000, vllm_version="0.32.0")
    assert (out["outcome"], out["failure"]) == ("failed", "kv_cache_insufficient")
    assert (
        out["predicted_max_model_len"] == 1792 and "estimated maximum model length is 1792" in out["reason"]
    )
    assert "MiB" in out["reason"]


def test_trial_outcome_legacy_awq_name_without_marlin(tmp_path):
    d = _model(tmp_path, "tiny-qwen2-awq", awq=True)
    out = predict.predict_trial_outcome(d, None, "legacy", None, 16384, None, 10 * 2**20)
    assert (out["outcome"], out["failure"]) == ("failed", "quantization_mismatch")
    assert "(awq_marlin)" in out["reason"]
    head = predict.predict_trial_outcome(d, None, "head", None, 16384, None, 10 * 2**20)
    assert head["outcome"] == "ready"


def test_trial_outcome_on_gpu_profiles():
    p40 = predict.predict_trial_outcome("Qwen/Qwen3-8B-AWQ", "p40", "legacy", None, 16384, 0.85, None)
    assert (p40["outcome"], p40["failure"]) == ("failed", "quantization_mismatch")
    assert p40["predicted_max_model_len"] == 40960  # memory alone would allow it
    a100 = predict.predict_trial_outcome("Qwen3-8B-AWQ", "a100-80gb", "head", None, 32768, 0.85, None)
    assert a100["outcome"] == "ready" and "starts" in a100["reason"]
    tight = predict.predict_trial_outcome("Qwen3-32B-AWQ", "rtx4090", "head", None, 40960, 0.9, None,
                                          vllm_version="0.19.0", overhead_gib=3.0)  # fmt: skip
    assert (tight["outcome"], tight["failure"]) == ("failed", "kv_cache_insufficient")
    assert tight["predicted_max_model_len"] < 40960
    full = predict.predict_trial_outcome("Qwen3-32B-AWQ", "t4", "head", None, None, 0.9, None)
    assert full["failure"] == "no_kv_memory"  # 32B at 4 bits does not leave KV room on 15 GiB


# --------------------------------------------------------------------------------------------- notebook


@pytest.mark.notebook
def test_preflight_notebook_runs_under_papermill(tmp_path):
    from vllm_lab.record import read_glued

    out = tmp_path / "00_preflight.ipynb"
    papermill = [sys.executable, "-m", "papermill"]
    cmd = [*papermill, str(ROOT / "notebooks" / "00_preflight.ipynb"), str(out), "-k", "python3",
           "-p", "RUN_DIR", str(tmp_path / "run"), "-y", "UTILIZATIONS: [0.5, 0.85, 0.95]"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    g = read_glued(out)
    assert g["kv_bytes_per_token"] == 147456 and g["weights_estimated"] is True
    assert g["gpu_profile"]["name"] == "Tesla P40" and g["any_can_start"] is False
    assert any("no AWQ path" in s for s in g["summary"])
    assert g["h1"] == "neither_starts" and g["suspects"] == []  # the card itself is the cause
    assert len(g["verdicts"]) == 12 and {v["launcher"] for v in g["verdicts"]} == {
        "legacy",
        "head",
        "explicit",
    }
    assert [p["gpu_memory_utilization"] for p in g["predicted_max_model_len"]] == [0.5, 0.85, 0.95]
    assert all(p["low"] <= p["max_model_len"] <= p["high"] for p in g["predicted_max_model_len"])
    assert (tmp_path / "run" / "00_preflight_predicted_max_model_len.png").stat().st_size > 1000
    import nbformat

    shown = [
        o
        for c in nbformat.read(out, as_version=4).cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    ]
    assert any("image/png" in o.get("data", {}) for o in shown)  # the figure shows in the notebook itself
    plot_cell = next(c for c in nbformat.read(ROOT / "notebooks" / "00_preflight.ipynb", as_version=4).cells
                     if "preflight_figure" in c.source)  # fmt: skip
    assert len(plot_cell.source.splitlines()) <= 10  # the figure lives in plots.py (it was 47 lines)


@pytest.mark.notebook
def test_preflight_notebook_is_committed_clean():
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "00_preflight.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c for c in code if "parameters" in c.metadata.get("tags", [])] == [code[0]]
    assert all(not c.outputs and c.execution_count is None for c in code)
    src = "\n".join(c.source for c in code)
    assert "scrapbook" not in src and "glue(" in code[-1].source
    params = [ln.split("=")[0].strip() for ln in code[0].source.splitlines() if "=" in ln]
    assert params and all(p.isupper() for p in params)
    assert all("#" in ln for ln in code[0].source.splitlines() if "=" in ln)
