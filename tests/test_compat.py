"""compat.py: each start-up rule, per vLLM version, with the exact message vLLM prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vllm_lab import compat, memory

pytestmark = pytest.mark.unit

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
AWQ = memory.load_model("Qwen3-8B-AWQ")
MISMATCH = (
    "Quantization method specified in the model config (awq) does not match the quantization method specified "
    "in the `quantization` argument (awq_marlin)."
)


def plain(name: str = "qwen3-14b", **over) -> memory.ModelFacts:
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    return memory.facts_from_config({**cfg, **over}, name=name)


@pytest.mark.parametrize(
    ("name", "flag"),
    [("Qwen3-8B-AWQ", "awq_marlin"), ("/models/qwen2.5-7b-instruct-awq/", "awq_marlin"), ("Qwen/Qwen3-8B-GGUF", "gguf"),
     ("TheBloke/Llama-2-7B-GPTQ", "gptq"), ("Qwen3-8B", None), ("tiny-qwen2", None), (None, None)],
)  # fmt: skip
def test_legacy_flag_comes_from_the_name_only(name, flag):
    assert compat.legacy_quantization_flag(name) == flag


def test_failure_kinds_are_the_fixed_names():
    assert set(compat.FAILURE_KINDS) == {"quantization_mismatch", "quantization_unsupported_gpu",
                                          "dtype_unsupported_gpu", "gpu_unsupported", "max_len_exceeds_model"}  # fmt: skip


# --------------------------------------------------------------------------------------------- quantization


@pytest.mark.parametrize(
    ("cc", "flag", "effective", "ok"),
    [
        (80, None, "awq_marlin", True),  # upgraded by itself on Marlin-capable GPUs
        (80, "awq_marlin", "awq_marlin", True),
        (80, "awq", "awq", True),  # forced plain awq
        (75, None, "awq", True),  # no Marlin on Turing: plain awq
        (75, "awq_marlin", "awq_marlin", False),  # the config-mismatch error
        (61, "awq_marlin", "awq_marlin", False),
        (None, "awq_marlin", "awq_marlin", False),  # no CUDA GPU known (the CPU build): no Marlin either
        (80, "gptq", "gptq", False),
    ],
)
def test_awq_checkpoint_flag_resolution_up_to_021(cc, flag, effective, ok):
    r = compat.resolve_quantization("awq", flag, cc, "0.11.0")
    assert (r.effective, r.verdict.can_start) == (effective, ok)
    if not ok:
        assert r.verdict.kind == "quantization_mismatch"
        assert r.verdict.message == (
            f"Quantization method specified in the model config (awq) does not match the quantization method "
            f"specified in the `quantization` argument ({flag})."
        )


def test_gptq_checkpoint_gets_gptq_marlin_only_on_80():
    assert compat.resolve_quantization("gptq", None, 86, "0.19.0").effective == "gptq_marlin"
    assert compat.resolve_quantization("gptq", None, 70, "0.19.0").effective == "gptq"
    bad = compat.resolve_quantization("gptq", "gptq_marlin", 70, "0.19.0").verdict
    assert bad.kind == "quantization_mismatch" and "(gptq) does not match" in bad.message


def test_033_maps_awq_names_to_auto_awq():
    r = compat.resolve_quantization("awq", "awq_marlin", 61, "0.33.0")
    assert r.verdict.can_start and r.effective == "auto_awq"
    cap = compat.check_quant_capability(r.effective, 61, "0.33.0")
    assert cap.message == (
        "The quantization method auto_awq is not supported for the current GPU. Minimum capability: 75. "
        "Current capability: 61."
    )
    assert compat.check_quant_capability("auto_awq", 75, "0.33.0").can_start
    assert compat.check_quant_capability("fp8", 75, "0.33.0").can_start  # fp8 75 in 0.33
    assert not compat.check_quant_capability("fp8", 75, "0.21.0").can_start  # fp8 80 up to 0.21


@pytest.mark.parametrize(
    ("method", "cc", "ok"),
    [("awq", 61, False), ("awq", 75, True), ("awq_marlin", 75, False), ("awq_marlin", 80, True), ("gptq", 61, True),
     ("gptq", 60, True), ("gptq_marlin", 75, False), ("gguf", 61, True), ("bitsandbytes", 61, False),
     ("bitsandbytes", 70, True), ("fp8", 89, True)],
)  # fmt: skip
def test_min_capability_table_up_to_021(method, cc, ok):
    v = compat.check_quant_capability(method, cc, "0.19.0")
    assert v.can_start is ok
    if not ok:
        assert v.kind == "quantization_unsupported_gpu" and f"Current capability: {cc}." in v.message


def test_unquantized_checkpoint_with_a_flag():
    missing = compat.resolve_quantization(None, "awq", 80, "0.11.0").verdict
    assert not missing.can_start and missing.message == "Cannot find the config file for awq"
    online = compat.resolve_quantization(None, "fp8", 89, "0.11.0")
    assert online.verdict.can_start and online.effective == "fp8"
    assert compat.resolve_quantization(None, None, 80).effective is None


# --------------------------------------------------------------------------------------------- dtype


def test_bf16_explicit_on_pre_ampere_is_an_error_with_vllms_text():
    v = compat.evaluate_launch(plain(), cc=75, gpu_name="Tesla T4", dtype="bfloat16", vllm_version="0.11.0")
    assert (v.can_start, v.kind) == (False, "dtype_unsupported_gpu")
    assert v.message == (
        "Bfloat16 is only supported on GPUs with compute capability of at least 8.0. Your Tesla T4 GPU has compute "
        "capability 7.5. You can use float16 instead by explicitly setting the `dtype` flag in CLI, for example: "
        "--dtype=half."
    )
    old = compat.evaluate_launch(plain(), cc=75, gpu_name="Tesla T4", dtype="bfloat16", vllm_version="0.6.6")
    assert "setting the`dtype` flag" in old.message  # 0.6.6 misses the space


def test_bf16_auto_falls_back_on_new_versions_and_fails_on_old():
    new = compat.evaluate_launch(
        plain(), cc=70, gpu_name="Tesla V100-SXM2-32GB", dtype="auto", vllm_version="0.11.0"
    )
    assert new.can_start and new.effective_dtype == "float16"
    assert any("Falling back to torch.float16" in n for n in new.notes)
    old = compat.evaluate_launch(
        plain(), cc=70, gpu_name="Tesla V100-SXM2-32GB", dtype="auto", vllm_version="0.8.5"
    )
    assert (
        old.kind == "dtype_unsupported_gpu"
        and "Your Tesla V100-SXM2-32GB GPU has compute capability 7.0" in old.message
    )
    assert compat.evaluate_launch(plain(), cc=80, dtype="auto").effective_dtype == "bfloat16"


def test_awq_kernels_take_float16_only_up_to_021():
    v = compat.evaluate_launch(AWQ, cc=80, launcher="explicit", quantization="awq", dtype="bfloat16",
                               vllm_version="0.19.0")  # fmt: skip
    assert v.kind == "dtype_unsupported_gpu"
    assert (
        v.message
        == "torch.bfloat16 is not supported for quantization method awq. Supported dtypes: [torch.float16]"
    )
    marlin = compat.evaluate_launch(AWQ, cc=80, launcher="head", dtype="bfloat16", vllm_version="0.19.0")
    assert marlin.can_start and marlin.effective_quantization == "awq_marlin"


# --------------------------------------------------------------------------------------------- GPU and length


@pytest.mark.parametrize(
    ("cc", "version", "ok"),
    [(61, "0.11.0", False), (60, "0.6.6", False), (70, "0.18.0", True), (70, "0.20.0", False), (75, "0.20.0", True),
     (75, None, True), (90, "0.33.0", True)],
)  # fmt: skip
def test_vllm_minimum_compute_capability_by_version(cc, version, ok):
    v = compat.check_gpu(cc, version, "card")
    assert v.can_start is ok
    if not ok:
        assert v.kind == "gpu_unsupported" and "no kernel image is available" in v.message


def test_pascal_cannot_run_even_an_unquantized_fp16_model():
    v = compat.evaluate_launch(
        plain(), cc="6.1", gpu_name="Tesla P40", dtype="float16", vllm_version="0.11.0"
    )
    assert v.kind == "gpu_unsupported" and any("Pascal" in n for n in v.notes)


def test_max_model_len_above_the_models_limit():
    v = compat.evaluate_launch(AWQ, cc=80, max_model_len=50000)
    assert v.kind == "max_len_exceeds_model"
    assert v.message == (
        "User-specified max_model_len (50000) is greater than the derived max_model_len (max_position_embeddings="
        "40960 or model_max_length=None in model's config.json). To allow overriding this maximum, set the env var "
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1."
    )
    assert compat.evaluate_launch(AWQ, cc=80, max_model_len=40960).can_start


def test_rules_fire_in_vllms_order():
    # On a P40 a too-long max_model_len is reported before the flag mismatch, which comes before the GPU.
    first = compat.evaluate_launch(AWQ, cc=61, gpu_name="Tesla P40", launcher="legacy", max_model_len=65536)
    assert first.kind == "max_len_exceeds_model"
    second = compat.evaluate_launch(AWQ, cc=61, gpu_name="Tesla P40", launcher="legacy")
    assert (
        second.kind == "quantization_mismatch" and second.message == MISMATCH and second.flag == "awq_marlin"
    )
    third = compat.evaluate_launch(AWQ, cc=61, gpu_name="Tesla P40", launcher="head")
    assert third.kind == "quantization_unsupported_gpu" and third.flag is None
    assert third.message.endswith("Minimum capability: 75. Current capability: 61.")
    kinds = [c.kind for c in third.checks if not c.can_start]
    assert kinds == ["quantization_unsupported_gpu", "gpu_unsupported"]  # the GPU itself fails later too


def test_launchers_on_a_t4_and_an_a100():
    t4 = {
        lz: compat.evaluate_launch(AWQ, cc=75, gpu_name="Tesla T4", launcher=lz) for lz in ("legacy", "head")
    }
    assert t4["legacy"].kind == "quantization_mismatch" and t4["head"].can_start
    assert t4["head"].effective_quantization == "awq"
    a100 = compat.evaluate_launch(AWQ, cc=80, launcher="legacy")
    assert a100.can_start and a100.effective_quantization == "awq_marlin"


def test_awq_path_exists():
    assert not compat.awq_path_exists("6.1")
    assert not compat.awq_path_exists(61, "0.33.0")
    assert compat.awq_path_exists(75, "0.11.0") and not compat.awq_path_exists(70, "0.19.0")
    assert compat.awq_path_exists(None)
