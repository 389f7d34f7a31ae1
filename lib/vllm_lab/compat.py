"""What vLLM would refuse at start, and the message it would print (reference/vllm-facts.md sections 1 and 4).

Each rule returns a `Verdict` (can_start, failure kind, vLLM's own message with the values filled in).
`evaluate_launch` runs them in the order vLLM checks them (ModelConfig: max_model_len, quantization flag vs
config; VllmConfig: quantization capability and dtype; worker: bf16 on the device; first kernel: the GPU
itself) and reports the first failure. Pure: no GPU, no vLLM needed.

Versions: rules differ before/after a few releases. When no version is given the 0.11-0.21 behaviour is
assumed (say so in output); `ASSUMED_VERSION` names it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_lab.memory import ModelFacts, parse_vllm_version

FAILURE_KINDS = (
    "quantization_mismatch",
    "quantization_unsupported_gpu",
    "dtype_unsupported_gpu",
    "gpu_unsupported",
    "max_len_exceeds_model",
)
ASSUMED_VERSION = (0, 11, 0)  # when --vllm-version is not given
NEW_QUANT_NAMES_FROM = (0, 33, 0)  # awq/awq_marlin -> auto_awq, gptq/gptq_marlin -> auto_gptq
VLLM_MIN_CC_75_FROM = (0, 20, 0)  # documented minimum compute capability 7.5 (7.0 up to 0.18)
AUTO_DTYPE_FALLBACK_FROM = (
    0,
    10,
    0,
)  # --dtype auto falls back to fp16 with a warning (raised before; ~0.9.x)
BF16_MSG_SPACE_FIXED_FROM = (0, 7, 0)  # 0.6.x prints "setting the`dtype`" (no space)
QUANT_DTYPE_STRICT_UNTIL = (0, 21, 99)  # awq/gptq accept float16 only (facts: up to 0.21)

# get_min_capability(), 0.6-0.21 and 0.33 (facts section 4); methods not listed are not checked.
MIN_CAPABILITY_OLD = {"awq": 75, "awq_marlin": 80, "gptq": 60, "gptq_marlin": 80, "gguf": 60, "fp8": 80,
                      "bitsandbytes": 70, "marlin": 80, "gptq_marlin_24": 80, "compressed-tensors": 70}  # fmt: skip
MIN_CAPABILITY_033 = {
    "auto_awq": 75,
    "auto_gptq": 60,
    "fp8": 75,
    "marlin": 75,
    "gguf": 60,
    "bitsandbytes": 70,
}
_NEW_NAMES = {"awq": "auto_awq", "awq_marlin": "auto_awq", "auto_awq": "auto_awq",
              "gptq": "auto_gptq", "gptq_marlin": "auto_gptq", "auto_gptq": "auto_gptq"}  # fmt: skip
_ONLINE_METHODS = {
    "fp8",
    "bitsandbytes",
    "experts_int8",
    "deepspeedfp",
    "ptpc_fp8",
}  # need no checkpoint config
_FP16_ONLY = {"awq", "gptq"}


@dataclass
class Verdict:
    rule: str
    can_start: bool
    kind: str | None = None
    message: str = ""  # what vLLM would print (empty when the rule passes)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _v(vllm_version) -> tuple[int, int, int]:
    return parse_vllm_version(vllm_version) or ASSUMED_VERSION


def cc_int(cc: str | float | int | None) -> int | None:
    """'6.1' / 6.1 / 61 -> 61; None stays None."""
    if cc is None:
        return None
    if isinstance(cc, int):
        return cc
    major, _, minor = str(cc).partition(".")
    return int(major) * 10 + int(minor or 0)


def cc_str(cc: int) -> str:
    return f"{cc // 10}.{cc % 10}"


def legacy_quantization_flag(model_name: str | None) -> str | None:
    """The older launcher's flag, derived from the model NAME only: awq -> awq_marlin, gguf -> gguf, gptq -> gptq."""
    if not model_name:
        return None
    name = Path(str(model_name).rstrip("/")).name.lower()
    if "awq" in name:
        return "awq_marlin"
    if "gguf" in name:
        return "gguf"
    if "gptq" in name:
        return "gptq"
    return None


# --------------------------------------------------------------------------------------------- rules


def check_max_len(facts: ModelFacts, max_model_len: int | None) -> Verdict:
    if max_model_len is None or max_model_len <= facts.max_len:
        return Verdict("max_len", True)
    msg = (
        f"User-specified max_model_len ({max_model_len}) is greater than the derived max_model_len "
        f"({facts.max_len_key}={facts.max_len_display} or model_max_length="
        f"{facts.config.get('model_max_length')} in model's config.json). To allow overriding this maximum, "
        "set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1."
    )
    return Verdict("max_len", False, "max_len_exceeds_model", msg,
                   [f"the model's own limit is {facts.max_len}; ask for at most that"])  # fmt: skip


def mismatch_message(config_method: str, flag: str) -> str:
    return (
        f"Quantization method specified in the model config ({config_method}) does not match the quantization "
        f"method specified in the `quantization` argument ({flag})."
    )


@dataclass
class QuantResolution:
    effective: str | None  # the method vLLM ends up with (None: unquantized)
    verdict: Verdict


def resolve_quantization(
    config_method: str | None,
    flag: str | None,
    cc: int | None,
    vllm_version=None,
    marlin_layout_ok: bool = True,
) -> QuantResolution:
    """vLLM's _verify_quantization: which method runs, or the mismatch error.

    Up to 0.21 an AWQ/GPTQ checkpoint is upgraded to awq_marlin/gptq_marlin (no flag, or the marlin flag)
    only where Marlin can run (a CUDA GPU with cc >= 8.0 and a Marlin-compatible layout); elsewhere an
    explicit marlin flag is a mismatch. From 0.33 awq/awq_marlin/auto_awq are one auto_awq (same for GPTQ).
    cc None means no CUDA GPU known (the CPU build, or a prediction without a GPU profile): no Marlin.
    """
    v = _v(vllm_version)
    cfg = (config_method or "").lower() or None
    flag = (flag or "").lower() or None
    if v >= NEW_QUANT_NAMES_FROM:
        c, f = _NEW_NAMES.get(cfg, cfg) if cfg else None, _NEW_NAMES.get(flag, flag) if flag else None
        if cfg is None:
            return _no_config(flag)
        if f is None or f == c:
            return QuantResolution(
                c, Verdict("quantization", True, notes=[f"{cfg} runs as {c} (vLLM >= 0.33 names)"])
            )
        return QuantResolution(
            f, Verdict("quantization", False, "quantization_mismatch", mismatch_message(c, f))
        )
    if cfg is None:
        return _no_config(flag)
    marlin_ok = cc is not None and cc >= 80 and marlin_layout_ok
    if cfg in ("awq", "gptq"):
        marlin = f"{cfg}_marlin"
        if flag in (None, marlin, "marlin"):
            if marlin_ok:
                return QuantResolution(marlin, Verdict("quantization", True, notes=[
                    f"The model is convertible to {marlin} during runtime. Using {marlin} kernel."]))  # fmt: skip
            if flag is None:
                why = "no CUDA GPU known" if cc is None else f"compute capability {cc_str(cc)} < 8.0"
                return QuantResolution(cfg, Verdict("quantization", True, notes=[
                    f"no Marlin upgrade ({why}): runs the plain {cfg} kernels"]))  # fmt: skip
            why = (
                "no CUDA GPU known"
                if cc is None
                else f"Marlin needs compute capability 8.0, this GPU is {cc_str(cc)}"
            )
            return QuantResolution(flag, Verdict("quantization", False, "quantization_mismatch",
                                                 mismatch_message(cfg, flag), [why]))  # fmt: skip
        if flag == cfg:
            notes = (
                [f"quantization={cfg} given explicitly: forcing {cfg} (Marlin would be faster)"]
                if marlin_ok
                else []
            )
            return QuantResolution(cfg, Verdict("quantization", True, notes=notes))
        return QuantResolution(
            flag, Verdict("quantization", False, "quantization_mismatch", mismatch_message(cfg, flag))
        )
    if flag is None or flag == cfg:
        return QuantResolution(cfg, Verdict("quantization", True))
    return QuantResolution(
        flag, Verdict("quantization", False, "quantization_mismatch", mismatch_message(cfg, flag))
    )


def _no_config(flag: str | None) -> QuantResolution:
    if flag is None:
        return QuantResolution(None, Verdict("quantization", True))
    if flag in _ONLINE_METHODS:
        return QuantResolution(
            flag, Verdict("quantization", True, notes=[f"{flag}: quantized on the fly at load"])
        )
    return QuantResolution(flag, Verdict(
        "quantization", False, "quantization_mismatch", f"Cannot find the config file for {flag}",
        ["the checkpoint is not quantized (no quantization_config in config.json) but a method was passed"],
    ))  # fmt: skip


def min_capability(method: str | None, vllm_version=None) -> int | None:
    if method is None:
        return None
    table = MIN_CAPABILITY_033 if _v(vllm_version) >= NEW_QUANT_NAMES_FROM else MIN_CAPABILITY_OLD
    return table.get(method)


def check_quant_capability(method: str | None, cc: int | None, vllm_version=None) -> Verdict:
    need = min_capability(method, vllm_version)
    if method is None or cc is None or need is None:
        notes = [] if method is None else [f"capability for {method} not checked (" + (
            "no GPU known)" if cc is None else "no minimum on record)")]  # fmt: skip
        return Verdict("quantization_capability", True, notes=notes)
    if cc >= need:
        return Verdict("quantization_capability", True)
    return Verdict(
        "quantization_capability", False, "quantization_unsupported_gpu",
        f"The quantization method {method} is not supported for the current GPU. Minimum capability: {need}. "
        f"Current capability: {cc}.",
    )  # fmt: skip


def resolve_dtype(
    facts: ModelFacts, dtype: str = "auto", cc: int | None = None, vllm_version=None, gpu_name: str = "NVIDIA"
) -> tuple[str, list[str]]:
    """The torch dtype vLLM picks (as 'float16' / 'bfloat16' / 'float32') and any warning it logs."""
    d = (dtype or "auto").lower()
    if d != "auto":
        return {"half": "float16", "float": "float32"}.get(d, d), []
    cfg = facts.dtype.lower()
    bf16_ok = cc is None or cc >= 80
    if cfg in ("float32", "float"):
        return ("bfloat16" if (cc is not None and cc >= 80 and _v(vllm_version) >= AUTO_DTYPE_FALLBACK_FROM)
                else "float16"), []  # fmt: skip
    if cfg == "bfloat16" and not bf16_ok and _v(vllm_version) >= AUTO_DTYPE_FALLBACK_FROM:
        return "float16", [
            f"Your device '{gpu_name}' (with compute capability {cc_str(cc)}) doesn't support torch.bfloat16. "
            "Falling back to torch.float16 for compatibility."
        ]
    return cfg, []


def bf16_message(gpu_name: str, cc: int, vllm_version=None) -> str:
    sep = "" if _v(vllm_version) < BF16_MSG_SPACE_FIXED_FROM else " "
    return (
        "Bfloat16 is only supported on GPUs with compute capability of at least 8.0. "
        f"Your {gpu_name} GPU has compute capability {cc_str(cc)}. You can use float16 instead by explicitly "
        f"setting the{sep}`dtype` flag in CLI, for example: --dtype=half."
    )


def check_quant_dtype(method: str | None, torch_dtype: str, vllm_version=None) -> Verdict:
    if method in _FP16_ONLY and torch_dtype != "float16" and _v(vllm_version) <= QUANT_DTYPE_STRICT_UNTIL:
        return Verdict(
            "quantization_dtype", False, "dtype_unsupported_gpu",
            f"torch.{torch_dtype} is not supported for quantization method {method}. Supported dtypes: [torch.float16]",
            ["pass --dtype float16 (half)"],
        )  # fmt: skip
    return Verdict("quantization_dtype", True)


def check_bf16(torch_dtype: str, cc: int | None, gpu_name: str = "NVIDIA", vllm_version=None) -> Verdict:
    if torch_dtype == "bfloat16" and cc is not None and cc < 80:
        return Verdict("dtype", False, "dtype_unsupported_gpu", bf16_message(gpu_name, cc, vllm_version))
    return Verdict("dtype", True)


def vllm_min_capability(vllm_version=None) -> int:
    return 75 if _v(vllm_version) >= VLLM_MIN_CC_75_FROM else 70


def check_gpu(cc: int | None, vllm_version=None, gpu_name: str = "this GPU") -> Verdict:
    """Mainline vLLM's CUDA builds: sm_6x never targeted; minimum 7.0 (<= 0.18) or 7.5 (>= 0.20)."""
    if cc is None:
        return Verdict("gpu", True, notes=["no GPU known: GPU support not checked"])
    need = vllm_min_capability(vllm_version)
    if cc >= need:
        return Verdict("gpu", True)
    return Verdict(
        "gpu", False, "gpu_unsupported",
        "CUDA error: no kernel image is available for execution on the device",
        [f"mainline vLLM {'>= 0.20' if need == 75 else '<= 0.19'} supports compute capability >= {cc_str(need)}; "
         f"{gpu_name} is {cc_str(cc)}" + ("; Pascal (sm_6x) was never in vLLM's CUDA build targets" if cc < 70 else "")],
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- one launch


@dataclass
class LaunchVerdict:
    can_start: bool
    kind: str | None
    message: str
    flag: str | None  # the --quantization this launcher passes
    effective_quantization: str | None
    effective_dtype: str | None
    checks: list[Verdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def launcher_flag(launcher: str, model_name: str | None, quantization: str | None) -> str | None:
    """--quantization each launcher generation passes: legacy from the name, head none, explicit as given."""
    if launcher == "legacy":
        return legacy_quantization_flag(model_name)
    if launcher == "explicit":
        return quantization
    return None


def evaluate_launch(
    facts: ModelFacts,
    *,
    cc: int | str | None,
    gpu_name: str = "NVIDIA",
    launcher: str = "head",
    quantization: str | None = None,
    dtype: str = "auto",
    max_model_len: int | None = None,
    vllm_version=None,
    model_name: str | None = None,
) -> LaunchVerdict:
    """All start-up rules in vLLM's order; the first failing one decides."""
    c = cc_int(cc)
    flag = launcher_flag(launcher, model_name or facts.name, quantization)
    checks = [check_max_len(facts, max_model_len)]
    q = resolve_quantization(facts.quant.method, flag, c, vllm_version,
                             marlin_layout_ok=facts.quant.marlin_compatible or facts.quant.method not in ("awq", "gptq"))  # fmt: skip
    checks.append(q.verdict)
    checks.append(check_quant_capability(q.effective, c, vllm_version))
    torch_dtype, dtype_notes = resolve_dtype(facts, dtype, c, vllm_version, gpu_name)
    checks.append(check_quant_dtype(q.effective, torch_dtype, vllm_version))
    checks.append(check_bf16(torch_dtype, c, gpu_name, vllm_version))
    checks.append(check_gpu(c, vllm_version, gpu_name))
    notes = list(dtype_notes)
    if parse_vllm_version(vllm_version) is None:
        notes.append(f"vLLM version not given: rules of {'.'.join(map(str, ASSUMED_VERSION))}-0.21 assumed")
    for chk in checks:
        notes.extend(chk.notes)
    first = next((chk for chk in checks if not chk.can_start), None)
    return LaunchVerdict(
        can_start=first is None, kind=first.kind if first else None, message=first.message if first else "",
        flag=flag, effective_quantization=q.effective, effective_dtype=torch_dtype, checks=checks, notes=notes,
    )  # fmt: skip


def awq_path_exists(cc: int | str | None, vllm_version=None) -> bool:
    """Whether any AWQ kernel of mainline vLLM runs at this compute capability (whatever the flag)."""
    c = cc_int(cc)
    if c is None:
        return True
    need = min(v for k, v in (MIN_CAPABILITY_033 if _v(vllm_version) >= NEW_QUANT_NAMES_FROM
                              else MIN_CAPABILITY_OLD).items() if "awq" in k)  # fmt: skip
    return c >= need and c >= vllm_min_capability(vllm_version)


# ------------------------------------------------------------------------------------------------ Ollama
# reference/gguf-facts.md section 5. Ollama picks the context of a model loaded without num_ctx or
# OLLAMA_CONTEXT_LENGTH by total VRAM (since 0.15.5); since 0.30 it runs llama-server itself, needs driver 570+
# on Pascal, and gates flash attention (so a q8_0 KV cache, which needs it) off below cc 7.0 until 0.31.2.
OLLAMA_CONTEXT_BY_VRAM = ((47, 262144), (23, 32768), (0, 4096))  # (total GiB at least, context)
OLLAMA_PASCAL_DRIVER = 570
OLLAMA_DRIVER_FROM = (0, 30, 0)
OLLAMA_FA_GATED = ((0, 30, 0), (0, 31, 1))  # cc < 7: flash attention off in these versions, both included


def ollama_default_context(total_mib: float) -> int:
    gib = total_mib / 1024
    return next(ctx for floor, ctx in OLLAMA_CONTEXT_BY_VRAM if gib >= floor)


def ollama_facts(cc: int | str | None, total_mib: float, ecc_total_mib: float | None = None,
                 ollama_version: str | None = None) -> dict:  # fmt: skip
    """What Ollama does on this card: its default context (and with ECC on, where the card reports less),
    the driver Pascal needs, whether flash attention and a q8_0 KV cache are available (None: depends on
    the version, which was not given). `lines` says it in words."""
    c = cc_int(cc)
    v = parse_vllm_version(ollama_version) if ollama_version else None
    default = ollama_default_context(total_mib)
    ecc = ollama_default_context(ecc_total_mib) if ecc_total_mib else None
    old_gpu = c is not None and c < 70
    driver = OLLAMA_PASCAL_DRIVER if old_gpu and (v is None or v >= OLLAMA_DRIVER_FROM) else None
    lo, hi = OLLAMA_FA_GATED
    if not old_gpu:
        fa = True
    elif v is None:
        fa = None
    else:
        fa = not (lo <= v <= hi)
    with_ecc = (
        f"; {ecc} with ECC on (the card reports {ecc_total_mib / 1024:.1f} GiB)"
        if ecc and ecc != default
        else ""
    )
    lines = [
        f"default context without num_ctx / OLLAMA_CONTEXT_LENGTH: {default} ({total_mib / 1024:.1f} GiB total)"
        f"{with_ecc}: a trial pins its own (OLLAMA_CONTEXT_LENGTH and num_ctx)"
    ]
    if driver:
        lines.append(
            f"compute capability {cc_str(c)} needs NVIDIA driver {driver} or newer since Ollama 0.30"
        )
    if old_gpu:
        era = "off in Ollama 0.30.0-0.31.1 on cc < 7.0, back from 0.31.2"
        if fa is not None:
            era = f"{'on' if fa else 'OFF'} in Ollama {ollama_version} ({era})"
        lines.append(f"flash attention, and with it a q8_0 KV cache (OLLAMA_KV_CACHE_TYPE): {era}")
    return {"default_context": default, "default_context_ecc": ecc, "min_driver": driver,
            "flash_attention": fa, "kv_q8_0": fa, "lines": lines}  # fmt: skip
