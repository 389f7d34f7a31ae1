"""The memory model: KV bytes per token, weight size, KV capacity and the largest max_model_len.

Pure: it reads only a model folder (config.json, an optional model.yaml, safetensors index/headers; never a
tensor). The arithmetic follows vLLM V1 (reference/vllm-facts.md section 3):

    requested    = total_gpu_memory x gpu_memory_utilization
    available_kv = requested - (weights + non-KV overhead)          (or the --kv-cache-memory-bytes budget)
    num_blocks   = floor(available_kv / bytes_per_block)           bytes_per_block = block_size x KV bytes/token
    max_model_len (largest that starts) = num_blocks x block_size  ((num_blocks - 1) x block_size from 0.32,
                                                                     which keeps one null block back)

capped at the model's own derived limit. The non-KV overhead (activation peak, non-torch memory, CUDA graphs)
is not knowable from the config, so a GPU prediction carries a band (default 0.5-2.0 GiB) and `calibrate()`
turns one observed "Available KV cache memory" or "GPU KV cache size" line into the overhead to use next.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vllm_lab.errors import SpecError  # not spec: the engines import memory, and spec imports the engines
from vllm_lab.paths import params_dir

GIB = 1 << 30
MIB = 1 << 20
DEFAULT_BLOCK_SIZE = 16
DEFAULT_OVERHEAD_BAND_GIB = (
    0.5,
    2.0,
)  # non-KV memory besides weights on a GPU (activations, non-torch, graphs)
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048  # what sliding-window layers add to the window (chunked prefill)
DEFAULT_MODEL_MAX_LEN = 2048  # vLLM's fallback when config.json names no length
# vLLM keeps one KV block back from this version on. The facts file reads it in 0.33's source; its own CPU
# 0.32 run shows it too: 1,000,000 bytes at 512 B/token in 128-token blocks -> 15 blocks -> (15 - 1) x 128 = 1792.
NULL_BLOCK_FROM = (0, 32, 0)
CPU_BLOCK_SIZE = 128  # the CPU backend's default block size (GPU: 16)

_DTYPE_BYTES = {
    "float32": 4, "float": 4, "fp32": 4,
    "float16": 2, "half": 2, "fp16": 2,
    "bfloat16": 2, "bf16": 2,
    "int8": 1, "uint8": 1,
}  # fmt: skip
_MLA_MODEL_TYPES = {"deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_mtp", "kimi_k2", "kimi_linear",
                    "longcat_flash", "pangu_ultra_moe"}  # fmt: skip
_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
             "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")  # fmt: skip


# --------------------------------------------------------------------------------------------- versions


def parse_vllm_version(v: str | tuple | None) -> tuple[int, int, int] | None:
    """'0.10.2rc1.dev3+gabc' -> (0, 10, 2); 'v0.8.5.post1' -> (0, 8, 5); None -> None."""
    if v is None or v == "":
        return None
    if isinstance(v, tuple):
        return tuple([*v, 0, 0, 0][:3])  # type: ignore[return-value]
    m = re.match(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(v))
    if not m:
        raise SpecError(f"vllm_version: {v!r} is not a version; use e.g. 0.11.0")
    return (int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0))


def null_blocks(vllm_version: str | tuple | None) -> int:
    """KV blocks vLLM keeps back: 1 from 0.32 on, 0 before (and when the version is not given)."""
    v = parse_vllm_version(vllm_version)
    return 1 if v is not None and v >= NULL_BLOCK_FROM else 0


def dtype_bytes(name: str) -> int:
    n = str(name).lower().replace("torch.", "")
    if n.startswith("fp8") or n.startswith("float8"):
        return 1
    if n in _DTYPE_BYTES:
        return _DTYPE_BYTES[n]
    raise SpecError(
        f"kv_cache_dtype: {name!r} is unknown; use auto, fp8 (fp8_e4m3, fp8_e5m2), float16 or bfloat16"
    )


# --------------------------------------------------------------------------------------------- model facts


@dataclass
class QuantInfo:
    method: str | None = None  # config.json quantization_config.quant_method, lower-cased
    bits: int | None = None
    group_size: int | None = None
    zero_point: bool | None = None

    @property
    def marlin_compatible(self) -> bool:
        """AWQ/GPTQ layouts vLLM's Marlin kernels accept (bits 4/8, group -1/32/64/128, zero point known)."""
        if self.method not in ("awq", "gptq") or self.bits not in (4, 8):
            return False
        if self.group_size not in (-1, 32, 64, 128):
            return False
        return not (self.method == "awq" and self.zero_point is None)


@dataclass
class ModelFacts:
    name: str
    config_path: str | None
    model_dir: str | None
    model_type: str
    architectures: list[str]
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int | None
    vocab_size: int | None
    tie_word_embeddings: bool
    dtype: str  # config torch_dtype / dtype ("float16", "bfloat16", ...)
    max_len: int  # vLLM's derived max_model_len
    max_len_key: str
    max_len_display: str  # as vLLM prints it in the "derived max_model_len (key=value ...)" message
    mla: bool = False
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    sliding_window: int | None = None
    layer_kinds: list[str] = field(default_factory=list)  # per layer: full | sliding | none (no KV pages)
    quant: QuantInfo = field(default_factory=QuantInfo)
    param_count: float | None = None
    param_source: str | None = None
    has_gguf: bool = False
    config: dict = field(default_factory=dict, repr=False)

    @property
    def full_layers(self) -> int:
        return sum(k == "full" for k in self.layer_kinds)

    @property
    def sliding_layers(self) -> int:
        return sum(k == "sliding" for k in self.layer_kinds)

    def kv_heads_per_rank(self, tensor_parallel_size: int = 1) -> int:
        if self.mla:
            return 1
        return max(1, self.num_kv_heads // max(1, int(tensor_parallel_size)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("config", None)
        d["full_layers"], d["sliding_layers"] = self.full_layers, self.sliding_layers
        return d


def known_model_names(models_root: Path | None = None) -> list[str]:
    root = models_root or params_dir() / "models"
    return sorted(p.parent.name for p in root.glob("*/config.json")) if root.is_dir() else []


def resolve_model_path(model: str | os.PathLike, models_root: Path | None = None) -> Path:
    """config.json for a model directory, a config.json path, or a name under params/models.

    Names match case-insensitively, also as the last part of a hub id ("Qwen/Qwen3-8B-AWQ").
    """
    s = str(model)
    p = Path(s).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, Path(__file__).resolve().parents[2] / p]
    for c in candidates:
        if c.is_file() and c.name.endswith(".json"):
            return c
        if c.is_dir() and (c / "config.json").is_file():
            return c / "config.json"
    root = models_root or params_dir() / "models"
    want = s.rstrip("/").split("/")[-1].lower()
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.name.lower() == want and (d / "config.json").is_file():
                return d / "config.json"
    known = ", ".join(known_model_names(root)) or "(none)"
    raise SpecError(
        f"model: {s!r} is not a model directory, a config.json, or a name under params/models "
        f"(known: {known}); point --model at a folder holding config.json"
    )


def _text_config(cfg: dict) -> dict:
    """Multimodal configs keep the LM under text_config; quantization and dtype may sit at the top."""
    tc = cfg.get("text_config")
    if isinstance(tc, dict) and "num_hidden_layers" not in cfg:
        merged = dict(tc)
        for k in ("quantization_config", "torch_dtype", "dtype"):
            if k not in merged and k in cfg:
                merged[k] = cfg[k]
        merged.setdefault("model_type", cfg.get("model_type", ""))
        merged.setdefault("architectures", cfg.get("architectures", []))
        return merged
    return cfg


def _rope(cfg: dict) -> dict | None:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    return rs if isinstance(rs, dict) and rs else None


def derived_max_len(cfg: dict) -> tuple[int, str, str]:
    """vLLM's derived max_model_len: the smallest length key, scaled by rope_scaling's factor where vLLM does.

    The one rule for the model's limit (compat, plan checks and the search use it through model_limit).
    As vLLM's _get_and_verify_max_len (0.6-0.11 read the same): model_max_length wins when set; rope types
    su/longrope/llama3 and gemma3 models are not scaled; every other type with a factor (linear, dynamic,
    yarn, ...) multiplies it, yarn starting from original_max_position_embeddings. Returns (length, key, the
    value as vLLM prints it in the max_len error).
    """
    cfg = _text_config(cfg)
    best: float = math.inf
    key = ""
    for k in _LEN_KEYS:
        v = cfg.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool):
            if v < best:
                key = k
            best = min(best, v)
    if cfg.get("model_max_length"):
        key, best = "model_max_length", cfg["model_max_length"]
    if best == math.inf:
        return DEFAULT_MODEL_MAX_LEN, "default", str(DEFAULT_MODEL_MAX_LEN)
    rope = _rope(cfg)
    if rope is not None and "gemma3" not in str(cfg.get("model_type", "")):
        rtype = str(rope.get("rope_type", rope.get("type", "default")))
        if rtype not in ("su", "longrope", "llama3") and rope.get("factor") is not None:
            if rtype == "yarn" and rope.get("original_max_position_embeddings"):
                best = rope["original_max_position_embeddings"]
            best = float(best) * float(rope["factor"])
            return int(best), key, repr(float(best))
    return int(best), key, str(int(best)) if float(best).is_integer() else repr(best)


def _layer_kinds(cfg: dict, n: int) -> tuple[list[str], int | None]:
    window = cfg.get("sliding_window")
    window = (
        int(window)
        if isinstance(window, int | float) and not isinstance(window, bool) and window > 0
        else None
    )
    lt = cfg.get("layer_types")
    if isinstance(lt, list) and len(lt) == n:
        kinds = []
        for t in lt:
            t = str(t).lower()
            if "sliding" in t or t in ("local", "local_attention"):
                kinds.append("sliding" if window else "full")
            elif t in ("full_attention", "attention", "global", "full", "global_attention"):
                kinds.append("full")
            else:
                kinds.append("none")  # linear attention / mamba: no paged KV (hybrid models are approximate)
        return kinds, window
    mt = str(cfg.get("model_type", ""))
    if window is None or cfg.get("use_sliding_window") is False:
        return ["full"] * n, None
    if mt.startswith("qwen"):
        if not cfg.get("use_sliding_window", False):
            return ["full"] * n, None
        mwl = int(cfg.get("max_window_layers", n))
        return ["sliding" if i >= mwl else "full" for i in range(n)], window
    if mt == "gemma2":
        return ["sliding" if i % 2 == 0 else "full" for i in range(n)], window
    if mt in ("gemma3", "gemma3_text"):
        pattern = int(cfg.get("sliding_window_pattern", 6) or 6)
        return ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(n)], window
    return ["sliding"] * n, window  # Mistral-7B-v0.1 style: every layer windowed


def _load_model_yaml(model_dir: Path | None) -> dict:
    if model_dir is None or not (model_dir / "model.yaml").is_file():
        return {}
    import yaml

    return yaml.safe_load((model_dir / "model.yaml").read_text()) or {}


def facts_from_config(
    config: dict, name: str = "model", config_path: str | None = None, model_dir: str | None = None,
    extra: dict | None = None,
) -> ModelFacts:  # fmt: skip
    """ModelFacts from a config.json dict (and an optional model.yaml dict as `extra`)."""
    extra = extra or {}
    cfg = _text_config(config)
    mt = str(cfg.get("model_type", ""))
    try:
        n_layers = int(cfg.get("num_hidden_layers", cfg.get("n_layer", cfg.get("num_layers"))))
        n_heads = int(cfg.get("num_attention_heads", cfg.get("n_head")))
    except (TypeError, ValueError) as e:
        raise SpecError(
            f"model: {config_path or name} config.json has no num_hidden_layers/num_attention_heads; "
            "is it a decoder LLM config?"
        ) from e
    hidden = int(cfg.get("hidden_size", cfg.get("n_embd", 0)) or 0)
    kv = None
    if cfg.get("multi_query") and not cfg.get("new_decoder_architecture"):
        kv = 1
    for k in ("n_head_kv", "num_kv_heads", "num_key_value_heads", "multi_query_group_num"):
        if kv is None and cfg.get(k) is not None:
            kv = int(cfg[k])
    kv = n_heads if kv is None else kv
    head_dim = cfg.get("head_dim") or cfg.get("hidden_size_per_head") or (hidden // n_heads if n_heads else 0)
    mla = bool(cfg.get("kv_lora_rank")) and (mt in _MLA_MODEL_TYPES or "qk_rope_head_dim" in cfg)
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype") or "float32")
    dtype = dtype.replace("torch.", "")
    qc = cfg.get("quantization_config") or {}
    quant = QuantInfo()
    if isinstance(qc, dict) and qc:
        method = (
            str(qc.get("quant_method", "")).lower().replace("compressed_tensors", "compressed-tensors")
            or None
        )
        bits = qc.get("bits", qc.get("w_bit"))
        quant = QuantInfo(
            method=method, bits=int(bits) if bits is not None else None,
            group_size=qc.get("group_size", qc.get("q_group_size")), zero_point=qc.get("zero_point"),
        )  # fmt: skip
    has_gguf = bool(model_dir) and any(Path(model_dir).glob("*.gguf"))
    if quant.method is None and has_gguf:
        quant = QuantInfo(method="gguf")
    kinds, window = _layer_kinds(cfg, n_layers)
    max_len, key, shown = derived_max_len(cfg)
    params = extra.get("parameters", extra.get("param_count"))
    return ModelFacts(
        name=name, config_path=config_path, model_dir=model_dir, model_type=mt,
        architectures=list(cfg.get("architectures") or []), num_layers=n_layers, num_attention_heads=n_heads,
        num_kv_heads=int(kv), head_dim=int(head_dim), hidden_size=hidden,
        intermediate_size=cfg.get("intermediate_size"), vocab_size=cfg.get("vocab_size"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), dtype=dtype,
        max_len=max_len, max_len_key=key, max_len_display=shown, mla=mla,
        kv_lora_rank=cfg.get("kv_lora_rank") if mla else None,
        qk_rope_head_dim=cfg.get("qk_rope_head_dim") if mla else None,
        sliding_window=window, layer_kinds=kinds, quant=quant,
        param_count=float(params) if params is not None else None,
        param_source="model.yaml" if params is not None else None, has_gguf=has_gguf, config=config,
    )  # fmt: skip


def load_model(model: str | os.PathLike | ModelFacts | dict, models_root: Path | None = None) -> ModelFacts:
    """ModelFacts from a directory, a config.json path, a params/models name, a config dict, or facts."""
    if isinstance(model, ModelFacts):
        return model
    if isinstance(model, dict):
        return facts_from_config(model)
    cfg_path = resolve_model_path(model, models_root)
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpecError(
            f"model: {cfg_path} is not readable JSON ({e}); fix or re-download config.json"
        ) from e
    model_dir = cfg_path.parent
    extra = _load_model_yaml(model_dir)
    name = str(extra.get("name") or (model_dir.name if cfg_path.name == "config.json" else cfg_path.stem))
    return facts_from_config(
        config, name=name, config_path=str(cfg_path), model_dir=str(model_dir), extra=extra
    )


def model_max_len(config: Any) -> int:
    """The model's own limit as vLLM derives it (max_position_embeddings & co., rope-scaled where vLLM does)."""
    return load_model(config).max_len


def model_limit(model: str | os.PathLike) -> tuple[int, str] | None:
    """(limit, how it is derived) for a model folder, config.json or params/models name; None where the
    config is unreadable or names no length (vLLM then accepts any --max-model-len)."""
    try:
        cfg = json.loads(resolve_model_path(model).read_text())
    except (SpecError, OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    n, key, shown = derived_max_len(cfg)
    if key == "default":
        return None
    tc = _text_config(cfg)
    rope = _rope(tc)
    if rope is None or int(tc[key]) == n:
        return n, f"{key}={shown} in config.json"
    rtype = rope.get("rope_type", rope.get("type"))
    return n, f"{key}={tc[key]} x rope_scaling {rtype} factor {rope.get('factor')} in config.json"


# --------------------------------------------------------------------------------------------- KV bytes


def runtime_dtype(facts: ModelFacts, dtype: str = "auto") -> str:
    """The dtype vLLM runs the model in: auto = config dtype, float32 models downcast to 16-bit."""
    d = str(dtype or "auto").lower()
    if d != "auto":
        return {"half": "float16", "float": "float32"}.get(d, d)
    cfg = facts.dtype.lower()
    return "float16" if cfg in ("float32", "float") else cfg


def kv_dtype_bytes(facts: ModelFacts, kv_cache_dtype: str = "auto", dtype: str = "auto") -> int:
    if str(kv_cache_dtype or "auto").lower() == "auto":
        return dtype_bytes(runtime_dtype(facts, dtype))
    return dtype_bytes(kv_cache_dtype)


def kv_bytes_per_token_per_layer(
    facts: ModelFacts, kv_cache_dtype: str = "auto", tensor_parallel_size: int = 1, dtype: str = "auto"
) -> int:
    """One token in one attention layer on one GPU: 2 x kv_heads x head_dim x bytes; MLA: (rank + rope) x bytes."""
    b = kv_dtype_bytes(facts, kv_cache_dtype, dtype)
    if facts.mla:
        return int((facts.kv_lora_rank or 0) + (facts.qk_rope_head_dim or 0)) * b
    return 2 * facts.kv_heads_per_rank(tensor_parallel_size) * facts.head_dim * b


def kv_bytes_per_token(
    config: Any, kv_cache_dtype: str = "auto", tensor_parallel_size: int = 1, dtype: str = "auto"
) -> int:
    """KV bytes one token costs across every layer that keeps KV pages, per GPU."""
    f = load_model(config)
    layers = f.full_layers + f.sliding_layers
    return layers * kv_bytes_per_token_per_layer(f, kv_cache_dtype, tensor_parallel_size, dtype)


def bytes_per_block(
    config: Any, block_size: int = DEFAULT_BLOCK_SIZE, kv_cache_dtype: str = "auto", tensor_parallel_size: int = 1,
    dtype: str = "auto",
) -> int:  # fmt: skip
    return int(block_size) * kv_bytes_per_token(config, kv_cache_dtype, tensor_parallel_size, dtype)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kv_memory_needed(
    facts: ModelFacts, max_model_len: int, per_layer_token_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE,
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
) -> int:  # fmt: skip
    """Bytes one request of max_model_len needs (vLLM V1's max_memory_usage_bytes summed over layers)."""
    page = block_size * per_layer_token_bytes
    full = facts.full_layers * _cdiv(max_model_len, block_size) * page
    sliding = 0
    if facts.sliding_layers and facts.sliding_window:
        tokens = min(facts.sliding_window - 1 + max_num_batched_tokens, max_model_len)
        sliding = facts.sliding_layers * (_cdiv(tokens, block_size) + 1) * page
    return full + sliding


def largest_max_model_len(
    facts: ModelFacts, available_bytes: float, per_layer_token_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE,
    vllm_version: str | tuple | None = None, max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
    cap: int | None = None,
) -> int:  # fmt: skip
    """The largest max_model_len whose one request fits `available_bytes` (0 when not even one token fits)."""
    layers = facts.full_layers + facts.sliding_layers
    if layers == 0 or per_layer_token_bytes <= 0:
        return int(cap or facts.max_len)
    avail = int(available_bytes) - null_blocks(vllm_version) * layers * block_size * per_layer_token_bytes
    hi = int(cap or facts.max_len)
    if avail <= 0:
        return 0
    if facts.sliding_layers == 0:  # uniform: closed form, a multiple of the block size
        blocks = avail // (layers * block_size * per_layer_token_bytes)
        return int(min(blocks * block_size, hi))

    def fits(n: int) -> bool:
        return kv_memory_needed(facts, n, per_layer_token_bytes, block_size, max_num_batched_tokens) <= avail

    if fits(hi):
        return hi
    lo, top = 0, hi
    while lo < top:  # largest n with fits(n)
        mid = (lo + top + 1) // 2
        if fits(mid):
            lo = mid
        else:
            top = mid - 1
    return lo


def kv_tokens_from_bytes(
    facts: ModelFacts, available_bytes: float, per_layer_token_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE,
    vllm_version: str | tuple | None = None,
) -> tuple[int, int]:  # fmt: skip
    """(num_blocks, tokens) as vLLM prints "GPU KV cache size: N tokens" (every KV layer counted as full)."""
    layers = facts.full_layers + facts.sliding_layers
    per_block = layers * block_size * per_layer_token_bytes
    if per_block <= 0 or available_bytes <= 0:
        return 0, 0
    blocks = int(available_bytes // per_block)
    return blocks, max(0, blocks - null_blocks(vllm_version)) * block_size


def predict_kv_tokens_from_budget(
    config: Any, kv_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE, vllm_version: str | tuple | None = None,
    kv_cache_dtype: str = "auto", tensor_parallel_size: int = 1,
) -> int:  # fmt: skip
    """KV tokens a budget of `kv_bytes` holds: floor(budget / bytes_per_block) x block_size (less a null block
    from 0.32). The search module uses this for --kv-cache-memory-bytes runs; pass block_size=128
    (CPU_BLOCK_SIZE) for the CPU build."""
    f = load_model(config)
    per_layer = kv_bytes_per_token_per_layer(f, kv_cache_dtype, tensor_parallel_size)
    return kv_tokens_from_bytes(f, kv_bytes, per_layer, block_size, vllm_version)[1]


# --------------------------------------------------------------------------------------------- weights


@dataclass
class Weights:
    gib: float
    estimated: bool
    source: str


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a .safetensors file: 8-byte little-endian length, then that many bytes of JSON."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SpecError(f"weights: {path} is shorter than a safetensors header; the file is truncated")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * MIB:
            raise SpecError(f"weights: {path} claims a {n}-byte header; not a safetensors file")
        return json.loads(f.read(n))


def safetensors_bytes(model_dir: str | os.PathLike) -> tuple[int, str] | None:
    """Total tensor bytes from the index's metadata.total_size, else from every file's header; None if none."""
    d = Path(model_dir)
    for idx in sorted(d.glob("*.safetensors.index.json")):
        try:
            total = json.loads(idx.read_text()).get("metadata", {}).get("total_size")
        except (OSError, json.JSONDecodeError):
            total = None
        if total:
            return int(total), f"{idx.name} metadata.total_size"
    files = sorted(d.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for p in files:
        for name, t in read_safetensors_header(p).items():
            if name != "__metadata__":
                start, end = t["data_offsets"]
                total += int(end) - int(start)
    return total, f"safetensors headers ({len(files)} file(s))"


def config_param_count(facts: ModelFacts) -> float:
    """Parameters from the config's shapes (dense and simple MoE decoders; an estimate)."""
    cfg = _text_config(facts.config)
    h, n, kv, hd = facts.hidden_size, facts.num_attention_heads, facts.num_kv_heads, facts.head_dim
    attn = h * n * hd * 2 + 2 * h * kv * hd
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0)
    if experts:
        moe_i = int(cfg.get("moe_intermediate_size") or facts.intermediate_size or 0)
        shared = (
            int(cfg.get("shared_expert_intermediate_size") or 0)
            + int(cfg.get("n_shared_experts") or 0) * moe_i
        )
        mlp = 3 * h * (experts * moe_i + shared) + h * experts
    else:
        mlp = 3 * h * int(facts.intermediate_size or 4 * h)
    embed = int(facts.vocab_size or 0) * h
    return float(
        facts.num_layers * (attn + mlp + 2 * h) + embed * (1 if facts.tie_word_embeddings else 2) + h
    )


def estimate_weight_bytes(facts: ModelFacts) -> tuple[float, str]:
    params = facts.param_count
    src = f"{facts.param_source}: {params:.3g} parameters" if params else ""
    if not params:
        params = config_param_count(facts)
        src = f"config shapes: {params:.3g} parameters"
    embed = float(facts.vocab_size or 0) * facts.hidden_size * (1 if facts.tie_word_embeddings else 2)
    bits = facts.quant.bits if facts.quant.method in ("awq", "gptq", "gguf", "compressed-tensors") else None
    if bits:
        group = facts.quant.group_size if facts.quant.group_size and facts.quant.group_size > 0 else 128
        per_weight_bits = bits + (16 + bits) / group  # fp16 scale + packed zero point per group
        body = max(0.0, params - embed) * per_weight_bits / 8
        return body + embed * 2, f"{src} x {per_weight_bits:.2f} bits (embeddings/lm_head 16-bit)"
    b = dtype_bytes(runtime_dtype(facts))
    return params * b, f"{src} x {b} bytes"


def model_weights(model: Any) -> Weights:
    f = load_model(model)
    if f.model_dir:
        found = safetensors_bytes(f.model_dir)
        if found:
            return Weights(found[0] / GIB, False, found[1])
        ggufs = sorted(Path(f.model_dir).glob("*.gguf"))
        if ggufs:
            return Weights(sum(p.stat().st_size for p in ggufs) / GIB, False, "gguf file size")
    nbytes, src = estimate_weight_bytes(f)
    return Weights(nbytes / GIB, True, f"estimated from {src}")


# --------------------------------------------------------------------------------------------- prediction


@dataclass
class Prediction:
    model: str
    kv_bytes_per_token: int
    bytes_per_block: int
    block_size: int
    model_max_len: int
    inputs: dict
    weights_gib: float | None = None
    weights_estimated: bool = False
    weights_source: str = ""
    overhead_gib: float | None = None
    overhead_low_gib: float | None = None
    overhead_high_gib: float | None = None
    overhead_source: str = ""
    requested_gib: float | None = None
    available_kv_gib: float = 0.0
    num_blocks: int = 0
    kv_cache_tokens: int = 0
    max_model_len: int = 0  # the largest max_model_len that starts (capped at the model's limit)
    capped_by_model: bool = False
    band: dict = field(default_factory=dict)  # low/high of available_kv_gib, kv_cache_tokens, max_model_len
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.max_model_len > 0

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}


def _arch_notes(f: ModelFacts) -> list[str]:
    notes = []
    if f.mla:
        notes.append(
            f"MLA: KV per token per layer = kv_lora_rank {f.kv_lora_rank} + qk_rope_head_dim {f.qk_rope_head_dim}"
        )
    if f.sliding_layers:
        notes.append(
            f"{f.sliding_layers} sliding-window layer(s) (window {f.sliding_window}) need at most window-1+"
            "max_num_batched_tokens tokens; the token figure counts every layer as full, like vLLM's log"
        )
    if any(k == "none" for k in f.layer_kinds):
        notes.append(
            "hybrid model (linear-attention/mamba layers): their state is not modelled; figures are approximate"
        )
    return notes


def predict(
    model: Any,
    *,
    gpu_memory_gib: float | None = None,
    gpu_memory_utilization: float = 0.9,
    weights_gib: float | None = None,
    overhead_gib: float | None = None,
    overhead_band_gib: tuple[float, float] = DEFAULT_OVERHEAD_BAND_GIB,
    kv_cache_gib: float | None = None,
    kv_cache_memory_bytes: int | None = None,
    kv_cache_dtype: str = "auto",
    dtype: str = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
    tensor_parallel_size: int = 1,
    vllm_version: str | None = None,
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
    max_model_len_cap: int | None = None,
) -> Prediction:
    """KV capacity and the largest max_model_len for a model on a GPU (or for a KV budget)."""
    f = load_model(model)
    inputs = {
        "model": f.config_path or f.name, "gpu_memory_gib": gpu_memory_gib,
        "gpu_memory_utilization": gpu_memory_utilization, "weights_gib": weights_gib, "overhead_gib": overhead_gib,
        "overhead_band_gib": list(overhead_band_gib), "kv_cache_gib": kv_cache_gib,
        "kv_cache_memory_bytes": kv_cache_memory_bytes, "kv_cache_dtype": kv_cache_dtype, "dtype": dtype,
        "block_size": block_size, "tensor_parallel_size": tensor_parallel_size, "vllm_version": vllm_version,
        "max_num_batched_tokens": max_num_batched_tokens, "max_model_len_cap": max_model_len_cap,
    }  # fmt: skip
    if block_size <= 0:
        raise SpecError(f"block_size: {block_size!r} must be a positive integer, e.g. 16")
    if tensor_parallel_size < 1:
        raise SpecError(f"tensor_parallel_size: {tensor_parallel_size!r} must be >= 1")
    if not 0 < gpu_memory_utilization <= 1:
        raise SpecError(
            f"gpu_memory_utilization: {gpu_memory_utilization!r} must be a fraction in (0, 1], e.g. 0.9"
        )
    per_layer = kv_bytes_per_token_per_layer(f, kv_cache_dtype, tensor_parallel_size, dtype)
    layers = f.full_layers + f.sliding_layers
    limit = min(f.max_len, max_model_len_cap) if max_model_len_cap else f.max_len
    p = Prediction(
        model=f.name, kv_bytes_per_token=per_layer * layers, bytes_per_block=per_layer * layers * block_size,
        block_size=block_size, model_max_len=f.max_len, inputs=inputs, notes=_arch_notes(f),
    )  # fmt: skip
    if kv_cache_gib is not None and kv_cache_memory_bytes is not None:
        raise SpecError("kv_cache_gib: give either kv_cache_gib or kv_cache_memory_bytes, not both")
    budget = kv_cache_memory_bytes if kv_cache_memory_bytes is not None else (
        kv_cache_gib * GIB if kv_cache_gib is not None else None)  # fmt: skip
    if budget is not None:
        if budget <= 0:
            raise SpecError(f"kv_cache_gib: {budget!r} bytes must be > 0")
        levels = {"low": budget, "point": budget, "high": budget}
        p.overhead_source = "KV budget given: weights and overhead do not matter"
    else:
        if gpu_memory_gib is None or gpu_memory_gib <= 0:
            raise SpecError("gpu: give --gpu NAME or --gpu-memory-gib X (or a KV budget with --kv-cache-gib)")
        w = Weights(weights_gib, False, "given") if weights_gib is not None else model_weights(f)
        if tensor_parallel_size > 1 and weights_gib is None:
            w = Weights(w.gib / tensor_parallel_size, w.estimated, w.source + f" / tp {tensor_parallel_size}")
        lo, hi = sorted(overhead_band_gib)
        if overhead_gib is not None:
            point, lo, hi, src = float(overhead_gib), float(overhead_gib), float(overhead_gib), "given"
        else:
            point, src = (lo + hi) / 2, f"default band {lo:g}-{hi:g} GiB (midpoint as the point estimate)"
        requested = gpu_memory_gib * gpu_memory_utilization
        p.weights_gib, p.weights_estimated, p.weights_source = round(w.gib, 4), w.estimated, w.source
        p.overhead_gib, p.overhead_low_gib, p.overhead_high_gib, p.overhead_source = point, lo, hi, src
        p.requested_gib = round(requested, 4)
        levels = {k: (requested - w.gib - o) * GIB for k, o in (("low", hi), ("point", point), ("high", lo))}
        if w.estimated:
            p.notes.append(
                f"weights were estimated ({w.source}); pass --weights-gib or add the safetensors index"
            )
        v = parse_vllm_version(vllm_version)
        if v is not None and v < (0, 10, 0):
            p.notes.append("vLLM < 0.10 (V0) sized activations by max_model_len when chunked prefill was off")
    res = {}
    for k, avail in levels.items():
        blocks, tokens = kv_tokens_from_bytes(f, avail, per_layer, block_size, vllm_version)
        mml = largest_max_model_len(
            f, avail, per_layer, block_size, vllm_version, max_num_batched_tokens, limit
        )
        res[k] = (avail / GIB, blocks, tokens, mml)
    p.available_kv_gib, p.num_blocks, p.kv_cache_tokens, p.max_model_len = res["point"]
    p.available_kv_gib = round(p.available_kv_gib, 4)
    p.capped_by_model = p.max_model_len >= limit
    p.band = {
        "available_kv_gib": [round(res["low"][0], 4), round(res["high"][0], 4)],
        "kv_cache_tokens": [res["low"][2], res["high"][2]],
        "max_model_len": [res["low"][3], res["high"][3]],
    }
    if p.max_model_len <= 0:
        p.notes.append(
            "no KV memory left at this setting: vLLM would stop with 'No available memory for the cache blocks'"
        )
    return p


def repredict(prediction: Prediction, **changes: Any) -> Prediction:
    """The same prediction with some inputs changed, e.g. repredict(p, overhead_gib=calibrate(p, ...))."""
    inputs = {**prediction.inputs, **changes}
    model = inputs.pop("model")
    inputs["overhead_band_gib"] = tuple(inputs["overhead_band_gib"])
    return predict(model, **inputs)


def calibrate(
    prediction: Prediction,
    reported_kv_tokens: int | None = None,
    reported_available_kv_gib: float | None = None,
) -> float:
    """The non-KV overhead (GiB) implied by what vLLM printed for this prediction's inputs.

    From "Available KV cache memory: X GiB" directly; from "GPU KV cache size: N tokens" via the block count
    (the middle of that block, so the error is at most half a block). Feed it back as overhead_gib.
    """
    if prediction.requested_gib is None or prediction.weights_gib is None:
        raise SpecError("calibrate: the prediction came from a KV budget; calibrate a GPU prediction (--gpu)")
    if reported_available_kv_gib is not None:
        avail = float(reported_available_kv_gib)
    elif reported_kv_tokens is not None:
        blocks = reported_kv_tokens / prediction.block_size + null_blocks(
            prediction.inputs.get("vllm_version")
        )
        avail = (blocks + 0.5) * prediction.bytes_per_block / GIB
    else:
        raise SpecError("calibrate: give reported_kv_tokens or reported_available_kv_gib (from vLLM's log)")
    return round(prediction.requested_gib - prediction.weights_gib - avail, 4)


def observations(model: Any) -> list[dict]:
    """What vLLM printed for this model on real cards (model.yaml `observed:`), the inputs calibrate() takes."""
    f = load_model(model)
    seen = _load_model_yaml(Path(f.model_dir) if f.model_dir else None).get("observed") or []
    return [o for o in seen if isinstance(o, dict)]


def with_overhead(prediction: Prediction, overhead_gib: float) -> Prediction:
    """A copy re-predicted at one overhead value (band collapsed)."""
    return repredict(replace(prediction), overhead_gib=overhead_gib)


def predicted_kv_tokens(model: str, kv_cache_memory_bytes: int | None) -> int | None:
    """KV tokens for a model folder and a KV budget: a prediction, never shown as a measurement.

    None where it cannot say (no budget, no readable config.json); it never raises, so it cannot break a
    measurement or a search that asks for it.
    """
    if kv_cache_memory_bytes is None:
        return None
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
        guess = predict_kv_tokens_from_budget(cfg, kv_cache_memory_bytes)
    except Exception:  # a prediction must never break a measurement
        return None
    return int(guess) if isinstance(guess, int | float) and guess > 0 else None


# --------------------------------------------------------------------------------------------- exact limits


def limit_from_blocks(num_blocks: int, block_size: int, vllm_version: str | tuple | None) -> int:
    """The longest max_model_len a V1 pool of `num_blocks` accepts for a full-attention model: every block but
    the null block (0.32 on) times the block size. vLLM's check_enough_kv_cache_memory (0.32: it subtracts
    one block's bytes first) needs cdiv(max_model_len, block_size) blocks per layer."""
    return max(0, int(num_blocks) - null_blocks(vllm_version)) * int(block_size)


def exact_start_limit(
    model: Any, kv_cache_memory_bytes: int, *, block_size: int, vllm_version: str | tuple,
    kv_cache_dtype: str = "auto", tensor_parallel_size: int = 1,
) -> tuple[int, str] | None:  # fmt: skip
    """The largest max_model_len vLLM accepts with this KV budget, to the block, with how it was derived.

    Exact only where vLLM's own arithmetic is closed-form: a budget in bytes (no profiling), a known block
    size and version (the null block), and full attention in every layer (no sliding window, no linear
    attention, no MLA, whose block size the backend picks). None elsewhere: there a prediction is a guess.
    """
    try:
        f = load_model(model)
        if f.mla or any(k != "full" for k in f.layer_kinds) or kv_cache_memory_bytes <= 0:
            return None
        per_layer = kv_bytes_per_token_per_layer(f, kv_cache_dtype, tensor_parallel_size)
        per_block = f.full_layers * block_size * per_layer
        if per_block <= 0:
            return None
        blocks = int(kv_cache_memory_bytes) // per_block
        limit = min(limit_from_blocks(blocks, block_size, vllm_version), f.max_len)
    except (SpecError, OSError, ValueError, TypeError):
        return None
    held = null_blocks(vllm_version)
    why = (f"KV budget {int(kv_cache_memory_bytes):,} B / {per_block:,} B per {block_size}-token block = {blocks} "
           f"blocks" + (f", {held} held back as the null block" if held else "") + f" (vLLM {_vstr(vllm_version)})")  # fmt: skip
    return limit, why


def _vstr(v: str | tuple) -> str:
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
