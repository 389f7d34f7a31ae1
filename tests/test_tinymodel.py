"""The tiny offline Qwen2-style model: deterministic bytes, config facts, tokenizer, AWQ layout."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from vllm_lab import tinymodel
from vllm_lab.tinymodel import build_tiny_model, cli_tiny_model

pytestmark = pytest.mark.unit

FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny-qwen2")


@pytest.fixture(scope="module")
def awq(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny-qwen2-awq", awq=True)


def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def _tensors(d: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(d / "model.safetensors"))


def _bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_files_present(plain: Path, awq: Path):
    assert {p.name for p in plain.iterdir()} == FILES
    assert {p.name for p in awq.iterdir()} == FILES


def test_same_seed_same_bytes(plain: Path, tmp_path: Path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert _bytes(again) == _bytes(plain)


def test_different_seed_different_weights(plain: Path, tmp_path: Path):
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (plain / "model.safetensors").read_bytes()
    # only the weights depend on the seed
    for name in FILES - {"model.safetensors"}:
        assert (other / name).read_bytes() == (plain / name).read_bytes()


def test_rebuild_is_idempotent_and_repairs(plain: Path, tmp_path: Path):
    out = build_tiny_model(tmp_path / "m")
    st = out / "model.safetensors"
    ino = st.stat().st_ino
    assert build_tiny_model(out) == out
    assert st.stat().st_ino == ino  # unchanged files are not rewritten
    st.write_bytes(b"broken")
    (out / "stray.txt").write_text("x")
    build_tiny_model(out)
    assert _bytes(out) == _bytes(plain)


def test_cli_prints_path(tmp_path: Path, capsys):
    out = tmp_path / "cli-model"
    assert cli_tiny_model(Namespace(out_dir=str(out), awq=False, seed=0)) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "config.json").is_file()


def test_config_facts(plain: Path):
    cfg = _config(plain)
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["model_type"] == "qwen2"
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert head_dim == 32  # the CPU attention backend rejects 16
    assert cfg["num_key_value_heads"] == 2
    assert cfg["num_hidden_layers"] == 2
    assert cfg["torch_dtype"] == "float16"
    dtype_bytes = {"float16": 2, "bfloat16": 2, "float32": 4}[cfg["torch_dtype"]]
    kv_bytes = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * dtype_bytes
    assert kv_bytes == 512 == tinymodel.KV_BYTES_PER_TOKEN
    assert cfg["max_position_embeddings"] >= 32768  # the demo's largest max_model_len
    assert cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg


def test_tensor_shapes_plain(plain: Path):
    cfg = _config(plain)
    t = _tensors(plain)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    assert t["model.embed_tokens.weight"].shape == (v, h)
    assert "lm_head.weight" not in t  # tied
    assert t["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 32, h)
    assert t["model.layers.1.mlp.down_proj.weight"].shape == (h, cfg["intermediate_size"])
    assert {a.dtype for a in t.values()} == {np.dtype(np.float16)}
    assert all(np.isfinite(a).all() for a in t.values())


def test_tokenizer_round_trip(plain: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(plain / "tokenizer.json"))
    assert tok.get_vocab_size() == _config(plain)["vocab_size"]
    for text in ["Hello world!", "The KV cache holds 32768 tokens.", "naïve 日本語 ✓ \n\ttabs", ""]:
        ids = tok.encode(text).ids
        assert all(0 <= i < 512 for i in ids)
        assert tok.decode(ids) == text
    # merges make common text shorter than its bytes
    assert len(tok.encode("The maximum model length").ids) < len(b"The maximum model length")
    # ChatML specials are single ids, and the config's eos is <|im_end|>
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.token_to_id("<|im_end|>")
    assert _config(plain)["eos_token_id"] == tok.token_to_id("<|im_end|>")


def test_tokenizer_config_and_chat_template(plain: Path):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tc = json.loads((plain / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tc["eos_token"] == "<|im_end|>" and tc["pad_token"] == "<|endoftext|>"
    st = json.loads((plain / "special_tokens_map.json").read_text())
    assert st["eos_token"] == tc["eos_token"]
    gen = json.loads((plain / "generation_config.json").read_text())
    assert _config(plain)["eos_token_id"] in gen["eos_token_id"]
    # rendered as transformers does it
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    tmpl = env.from_string(tc["chat_template"])
    msgs = [{"role": "user", "content": "Hello"}]
    assert tmpl.render(messages=msgs, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tmpl.render(messages=msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    )


def test_awq_config(awq: Path, plain: Path):
    cfg = _config(awq)
    q = cfg["quantization_config"]
    assert (
        q["quant_method"] == "awq" and q["bits"] == 4 and q["version"] == "gemm" and q["zero_point"] is True
    )
    assert cfg["hidden_size"] % q["group_size"] == 0
    assert cfg["torch_dtype"] == "float16"
    assert "awq" in awq.name
    without = {k: v for k, v in cfg.items() if k != "quantization_config"}
    assert without == _config(plain)


def test_awq_tensor_shapes(awq: Path):
    cfg = _config(awq)
    g, pack = cfg["quantization_config"]["group_size"], 32 // cfg["quantization_config"]["bits"]
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], 32
    shapes = {  # name: (in, out)
        "self_attn.q_proj": (h, cfg["num_attention_heads"] * hd),
        "self_attn.k_proj": (h, cfg["num_key_value_heads"] * hd),
        "self_attn.v_proj": (h, cfg["num_key_value_heads"] * hd),
        "self_attn.o_proj": (cfg["num_attention_heads"] * hd, h),
        "mlp.gate_proj": (h, i),
        "mlp.up_proj": (h, i),
        "mlp.down_proj": (i, h),
    }
    t = _tensors(awq)
    for layer in range(cfg["num_hidden_layers"]):
        for name, (n_in, n_out) in shapes.items():
            p = f"model.layers.{layer}.{name}."
            assert t[p + "qweight"].shape == (n_in, n_out // pack) and t[p + "qweight"].dtype == np.int32
            assert t[p + "qzeros"].shape == (n_in // g, n_out // pack) and t[p + "qzeros"].dtype == np.int32
            assert t[p + "scales"].shape == (n_in // g, n_out) and t[p + "scales"].dtype == np.float16
            assert p + "weight" not in t
        assert t[f"model.layers.{layer}.self_attn.q_proj.bias"].dtype == np.float16
    assert t["model.embed_tokens.weight"].dtype == np.float16  # not quantized, as in AutoAWQ


def test_awq_pack_round_trip_and_dequantizes_close():
    rng = np.random.default_rng(7)
    vals = rng.integers(0, 16, size=(4, 64), dtype=np.int32)
    assert np.array_equal(tinymodel.unpack_awq(tinymodel.pack_awq(vals)), vals)
    # nibble order is AutoAWQ's [0, 2, 4, 6, 1, 3, 5, 7]
    one = np.zeros((1, 8), np.int32)
    one[0, 1] = 0xF
    assert int(tinymodel.pack_awq(one).view(np.uint32)[0, 0]) == 0xF << 16

    w = (rng.standard_normal((64, 256)) * 0.02).astype(np.float32)  # [out, in]
    q = tinymodel.quantize_awq(w, group_size=128)
    iw = tinymodel.unpack_awq(q["qweight"]).reshape(2, 128, 64)
    z = tinymodel.unpack_awq(q["qzeros"])[:, None, :]
    s = q["scales"].astype(np.float32)[:, None, :]
    deq = ((iw - z) * s).reshape(256, 64).T
    step = float(q["scales"].astype(np.float32).max())
    assert np.abs(deq - w).max() <= step  # within one quantization step


# ---------------------------------------------------------------- GGUF (llama.cpp)
@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return tinymodel.build_tiny_gguf(tmp_path_factory.mktemp("g") / "tiny-qwen2.gguf")


def _reader(path: Path):
    import gguf

    return gguf.GGUFReader(str(path))


def _field(r, key: str):
    f = r.fields[key]
    return f.contents()


def test_gguf_same_seed_same_bytes_and_folder_target(gguf_file: Path, tmp_path: Path):
    again = tinymodel.build_tiny_gguf(tmp_path)  # a folder: FOLDER/tiny-qwen2.gguf
    assert again == tmp_path / "tiny-qwen2.gguf"
    assert again.read_bytes() == gguf_file.read_bytes()
    other = tinymodel.build_tiny_gguf(tmp_path / "s1.gguf", seed=1)
    assert other.read_bytes() != gguf_file.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1.gguf", "tiny-qwen2.gguf"]  # no temp left


def test_gguf_hyperparameters(gguf_file: Path):
    r = _reader(gguf_file)
    assert _field(r, "general.architecture") == "qwen2"
    assert _field(r, "qwen2.block_count") == tinymodel.NUM_LAYERS
    assert _field(r, "qwen2.embedding_length") == tinymodel.HIDDEN_SIZE
    assert _field(r, "qwen2.attention.head_count") == tinymodel.NUM_HEADS
    assert _field(r, "qwen2.attention.head_count_kv") == tinymodel.NUM_KV_HEADS
    assert _field(r, "qwen2.context_length") == tinymodel.MAX_POSITION_EMBEDDINGS
    assert _field(r, "tokenizer.ggml.pre") == "gpt-2"  # llama.cpp's name; "gpt2" fails to load
    assert _field(r, "tokenizer.chat_template") == tinymodel.CHAT_TEMPLATE


def test_gguf_vocab_is_the_tokenizers(gguf_file: Path):
    r = _reader(gguf_file)
    tokens = _field(r, "tokenizer.ggml.tokens")
    vocab = tinymodel.build_tokenizer().get_vocab(with_added_tokens=True)
    assert len(tokens) == tinymodel.VOCAB_SIZE
    assert all(vocab[t] == i for i, t in enumerate(tokens))
    types = _field(r, "tokenizer.ggml.token_type")
    assert [tokens[i] for i, t in enumerate(types) if t == 3] == list(tinymodel.SPECIAL_TOKENS)
    assert len(_field(r, "tokenizer.ggml.merges")) == tinymodel.NUM_MERGES
    assert _field(r, "tokenizer.ggml.eos_token_id") == tinymodel._special_id(tinymodel.EOS_TOKEN)


def test_gguf_weights_equal_the_checkpoint(gguf_file: Path, plain: Path):
    r = _reader(gguf_file)
    got = {t.name: t for t in r.tensors}
    assert "output.weight" not in got  # tied embeddings, as in the checkpoint
    ref = _tensors(plain)
    assert len(got) == len(ref)
    emb = got["token_embd.weight"]
    assert emb.tensor_type.name == "F16"
    np.testing.assert_array_equal(
        np.asarray(emb.data).reshape(tinymodel.VOCAB_SIZE, tinymodel.HIDDEN_SIZE),
        ref["model.embed_tokens.weight"],
    )
    bias = got["blk.1.attn_k.bias"]
    assert bias.tensor_type.name == "F32"
    np.testing.assert_array_equal(
        np.asarray(bias.data), ref["model.layers.1.self_attn.k_proj.bias"].astype(np.float32)
    )


def test_cli_gguf(tmp_path: Path, capsys):
    out = tmp_path / "m.gguf"
    assert cli_tiny_model(Namespace(out_dir=str(out), awq=False, gguf=True, seed=0)) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.stat().st_size > 700_000
    assert cli_tiny_model(Namespace(out_dir=str(out), awq=True, gguf=True, seed=0)) == 2
    assert "pick one" in capsys.readouterr().err
