"""Memory arithmetic for llama.cpp (GGUF): weights, KV cache per cache type, context rounding, slots, and an
estimate of the compute buffer. Pure: reads only a GGUF file's header and tensor table (the `gguf` reader).

What llama.cpp does (src/llama-context.cpp, llama-kv-cache.cpp; checked against a real llama-server,
xllamacpp build 11549, on the tiny GGUF: tests/test_memory_gguf.py pins its printed sizes):
- `-c N` is padded up to a multiple of 256. With `-np S` and no `--kv-unified`, each slot gets n_ctx/S,
  padded to 256, and n_ctx becomes slot * S (`-c 1000 -np 3` -> 3 x 512 = 1536 cells). With `-kvu` the
  slots share all n_ctx cells.
- The KV cache holds n_ctx cells on every attention layer: K rows of n_head_kv * head_dim_k elements and V
  rows of n_head_kv * head_dim_v, each in its cache type: f16 2 bytes, q8_0 34 bytes per 32, q4_0 18 per 32.
  Sliding-window layers get their own cache of min(n_ctx, pad256(n_swa * streams + n_ubatch)) cells.
- The compute buffer is an ESTIMATE fitted on llama.cpp's CPU backend (tiny model, n_ubatch 512):
  per KV cell of one slot, n_ubatch * (4 * n_head + 4) bytes without flash attention (the f32 KQ scores and
  mask) and n_ubatch * 2 bytes with it, plus n_ubatch * 4 * (n_vocab + n_ff) for logits and activations.
  Measured 81.76 / 321.76 MiB (FA off) and 10.27 / 34.27 MiB (FA on) at -c 8192 / 32768; CUDA graphs differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = [
    "CACHE_TYPES",
    "GgufFacts",
    "KvEstimate",
    "LlamacppFit",
    "cache_row_bytes",
    "compute_buffer_bytes",
    "context_cells",
    "fit",
    "kv_bytes",
    "kv_bytes_per_token",
    "model_facts_from_config",
    "qwen3_8b_q4_k_m",
    "read_gguf",
]

MIB = 1024**2
GIB = 1024**3
PAD = 256  # llama.cpp pads -c and each slot's share to this
N_UBATCH = 512  # -ub default

# cache type -> (bytes, elements) per block (ggml type traits)
CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (4, 1),
    "f16": (2, 1),
    "bf16": (2, 1),
    "q8_0": (34, 32),
    "q5_1": (24, 32),
    "q5_0": (22, 32),
    "q4_1": (20, 32),
    "q4_0": (18, 32),
    "iq4_nl": (18, 32),
}


@dataclass(frozen=True)
class GgufFacts:
    """What the memory model needs from a GGUF file (or, without one, from a config and a published size)."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer (llama.cpp allows a per-layer array)
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int
    n_embd: int
    n_ff: int
    n_vocab: int
    weights_bytes: int
    n_swa: int = 0  # sliding window; 0 = none
    swa_layers: tuple[bool, ...] = ()  # per layer; empty = no sliding-window layer
    file_type: str | None = None
    source: str = ""  # where the numbers came from


def _pad(n: int, to: int = PAD) -> int:
    return (n + to - 1) // to * to


def cache_row_bytes(cache_type: str, n_elements: int) -> int:
    """Bytes of one row of `n_elements` in a cache type; a quantized type's block must divide the row."""
    if cache_type not in CACHE_TYPES:
        raise ValueError(f"cache type {cache_type!r} is not one of {', '.join(CACHE_TYPES)}")
    size, block = CACHE_TYPES[cache_type]
    if n_elements % block:
        raise ValueError(f"cache type {cache_type} needs a row length divisible by {block}, not {n_elements}")
    return n_elements // block * size


def context_cells(c: int, slots: int = 1, kv_unified: bool = False) -> tuple[int, int]:
    """(n_ctx, n_ctx per slot) that llama.cpp uses for `-c c -np slots` (c = 0 is the caller's n_ctx_train)."""
    if c <= 0 or slots <= 0:
        raise ValueError("-c and -np must be positive here")
    n_ctx = _pad(c)
    if kv_unified or slots == 1:
        return n_ctx, n_ctx
    per_slot = _pad(n_ctx // slots)
    return per_slot * slots, per_slot


def kv_bytes_per_token(
    facts: GgufFacts, cache_k: str = "f16", cache_v: str = "f16", swa: bool = False
) -> int:
    """KV bytes per cell over the full-attention layers (swa=True: over the sliding-window layers)."""
    total = 0
    for il in range(facts.n_layer):
        is_swa = bool(facts.swa_layers) and facts.swa_layers[il]
        if is_swa != swa:
            continue
        heads = facts.n_head_kv[il]
        if heads == 0:  # a layer without attention (recurrent / MoE-only)
            continue
        total += cache_row_bytes(cache_k, heads * facts.head_dim_k)
        total += cache_row_bytes(cache_v, heads * facts.head_dim_v)
    return total


@dataclass(frozen=True)
class KvEstimate:
    n_ctx: int  # cells of the full-attention cache (all slots)
    n_ctx_slot: int
    slots: int
    swa_cells: int  # cells of the sliding-window cache (0: none)
    bytes: int

    @property
    def mib(self) -> float:
        return self.bytes / MIB

    @property
    def gib(self) -> float:
        return self.bytes / GIB


def kv_bytes(
    facts: GgufFacts,
    c: int,
    slots: int = 1,
    kv_unified: bool = False,
    cache_k: str = "f16",
    cache_v: str = "f16",
    swa_full: bool = False,
    n_ubatch: int = N_UBATCH,
) -> KvEstimate:
    """What llama.cpp allocates for the KV cache at `-c c -np slots` (c = 0: the model's n_ctx_train)."""
    n_ctx, per_slot = context_cells(c or facts.n_ctx_train, slots, kv_unified)
    full = kv_bytes_per_token(facts, cache_k, cache_v) * n_ctx
    swa_cells = 0
    if facts.swa_layers and any(facts.swa_layers):
        # llama-kv-cache-iswa.cpp: per stream, the window (every slot's, when unified) plus one ubatch,
        # padded, never above the full cache's cells; one stream per slot unless unified
        streams = 1 if kv_unified else slots
        size_base = n_ctx if kv_unified else per_slot
        window = facts.n_swa * (slots if kv_unified else 1) + n_ubatch
        per_stream = size_base if swa_full else _pad(min(size_base, window))
        swa_cells = per_stream * streams
    swa = kv_bytes_per_token(facts, cache_k, cache_v, swa=True) * swa_cells
    return KvEstimate(n_ctx, per_slot, slots, swa_cells, full + swa)


def compute_buffer_bytes(
    facts: GgufFacts, n_ctx_slot: int, flash_attn: bool, n_ubatch: int = N_UBATCH
) -> int:
    """An ESTIMATE of llama.cpp's compute buffer (see the module doc: fitted on the CPU backend)."""
    per_cell = n_ubatch * (2 if flash_attn else 4 * facts.n_head + 4)
    return n_ctx_slot * per_cell + n_ubatch * 4 * (facts.n_vocab + facts.n_ff)


# --------------------------------------------------------------------------------------------------
# Reading a GGUF file (header and tensor table only)
# --------------------------------------------------------------------------------------------------


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def read_gguf(path: str | Path) -> GgufFacts:
    """The memory facts of a GGUF file: hyperparameters from its metadata, weights from its tensor table."""
    from gguf import GGUFReader  # the only module that needs the package

    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if not arch:
        raise ValueError(f"{path}: no general.architecture in the GGUF metadata")
    n_layer = int(_field(reader, f"{arch}.block_count"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    kv = _field(reader, f"{arch}.attention.head_count_kv", n_head)
    n_head_kv = tuple(int(x) for x in kv) if isinstance(kv, list) else (int(kv),) * n_layer
    n_embd = int(_field(reader, f"{arch}.embedding_length"))
    head_k = int(_field(reader, f"{arch}.attention.key_length", n_embd // n_head))
    head_v = int(_field(reader, f"{arch}.attention.value_length", n_embd // n_head))
    n_swa = int(_field(reader, f"{arch}.attention.sliding_window", 0) or 0)
    swa_layers: tuple[bool, ...] = ()
    if n_swa:
        pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
        if isinstance(pattern, list):
            swa_layers = tuple(bool(x) for x in pattern)
        elif pattern:
            # llama.cpp's set_swa_pattern: every n-th layer is a full-attention layer
            swa_layers = tuple(il % int(pattern) < int(pattern) - 1 for il in range(n_layer))
        # no pattern in the file: counted as full-attention layers (an upper bound)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens.data) if tokens is not None else 0
    file_type = _field(reader, "general.file_type")
    if file_type is not None:
        from gguf import LlamaFileType

        names = {t.value: t.name.removeprefix("MOSTLY_") for t in LlamaFileType}
        file_type = names.get(int(file_type), file_type)  # 15 -> "Q4_K_M"
    return GgufFacts(
        arch=arch,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_k,
        head_dim_v=head_v,
        n_ctx_train=int(_field(reader, f"{arch}.context_length", 0) or 0),
        n_embd=n_embd,
        n_ff=int(_field(reader, f"{arch}.feed_forward_length", 0) or 0),
        n_vocab=n_vocab,
        weights_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        n_swa=n_swa,
        swa_layers=swa_layers,
        file_type=None if file_type is None else str(file_type),
        source=f"GGUF header and tensor table of {Path(path).name}",
    )


# --------------------------------------------------------------------------------------------------
# Without the file: a Hugging Face config.json plus a published file size
# --------------------------------------------------------------------------------------------------


def model_facts_from_config(config: dict, weights_bytes: int, file_type: str, source: str) -> GgufFacts:
    """GgufFacts for a model whose GGUF is not here: its config.json and the GGUF's published size."""
    n_layer = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    return GgufFacts(
        arch=str(config.get("model_type", "?")),
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=(int(config.get("num_key_value_heads", n_head)),) * n_layer,
        head_dim_k=head_dim,
        head_dim_v=head_dim,
        n_ctx_train=int(config.get("max_position_embeddings", 0)),
        n_embd=int(config["hidden_size"]),
        n_ff=int(config.get("intermediate_size", 0)),
        n_vocab=int(config.get("vocab_size", 0)),
        weights_bytes=weights_bytes,
        n_swa=int(window or 0),
        file_type=file_type,
        source=source,
    )


# Qwen/Qwen3-8B-GGUF's Qwen3-8B-Q4_K_M.gguf: about 5.03 GB on its Hugging Face file list, i.e. ~4.68 GiB
# for 8.19B parameters (print_info: model params = 8.19 B). Cross-checks: other Qwen3-8B GGUF repos list
# Q4_0 at 4.77 GB and Q6_K at 6.73 GB; a public KV-sizing test for an 8B Qwen3 Q4_K_M uses 4.68 too. The
# file itself is not here: this number is a published size, not read from a tensor table.
QWEN3_8B_Q4_K_M_GIB = 4.68
_ROOT = Path(__file__).resolve().parents[2]


def qwen3_8b_q4_k_m(config_path: str | Path | None = None) -> GgufFacts:
    """Qwen3-8B Q4_K_M without the file: params/models/Qwen3-8B-AWQ/config.json (the same architecture:
    36 layers, 8 KV heads, head_dim 128, 40960 positions) and the published Q4_K_M size."""
    path = Path(config_path) if config_path else _ROOT / "params" / "models" / "Qwen3-8B-AWQ" / "config.json"
    config = json.loads(Path(path).read_text())
    facts = model_facts_from_config(
        config,
        weights_bytes=round(QWEN3_8B_Q4_K_M_GIB * GIB),
        file_type="Q4_K_M",
        source="config.json of Qwen3-8B + the published Q4_K_M file size (~4.68 GiB, not read from a file)",
    )
    return replace(facts, arch="qwen3")


# --------------------------------------------------------------------------------------------------
# Does it fit a card
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamacppFit:
    """One predicted llama.cpp start: weights + KV + compute against a card's memory (a prediction)."""

    c: int
    slots: int
    cache_k: str
    cache_v: str
    flash_attn: bool
    weights_gib: float
    kv_gib: float
    compute_gib: float  # estimate
    total_gib: float
    card_gib: float
    fits: bool
    n_ctx: int
    n_ctx_slot: int


# Reserved on the card besides the buffers: the CUDA context and cuBLAS workspace (about 300-500 MiB)
CUDA_OVERHEAD_GIB = 0.5


def fit(
    facts: GgufFacts,
    card_mib: int,
    c: int | None = None,
    slots: int = 1,
    cache_k: str = "f16",
    cache_v: str = "f16",
    flash_attn: bool = False,
    kv_unified: bool = False,
) -> LlamacppFit:
    """Whether `-c c -np slots -ngl all` with these cache types fits a card of `card_mib` (a prediction)."""
    if cache_v != "f16" and cache_v != "f32" and not flash_attn:
        raise ValueError("a quantized V cache needs flash attention (-fa on)")
    kv = kv_bytes(facts, c or facts.n_ctx_train, slots, kv_unified, cache_k, cache_v)
    compute = compute_buffer_bytes(facts, kv.n_ctx_slot, flash_attn)
    weights_gib = facts.weights_bytes / GIB
    total = weights_gib + kv.gib + compute / GIB + CUDA_OVERHEAD_GIB
    card_gib = card_mib / 1024
    return LlamacppFit(
        c=c or facts.n_ctx_train,
        slots=slots,
        cache_k=cache_k,
        cache_v=cache_v,
        flash_attn=flash_attn,
        weights_gib=weights_gib,
        kv_gib=kv.gib,
        compute_gib=compute / GIB,
        total_gib=total,
        card_gib=card_gib,
        fits=total <= card_gib,
        n_ctx=kv.n_ctx,
        n_ctx_slot=kv.n_ctx_slot,
    )
