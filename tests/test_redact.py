"""vLLM's --api-key takes several keys (list[str], nargs='+'): every one of them is a secret."""

from vllm_lab.redact import MASK, redact_argv, redact_obj, redact_text

A, B = "sk-firstkey-0123456789abcdef", "second-key-plain"


def test_every_value_of_a_multi_key_flag_is_hidden_in_argv():
    shown = redact_argv(["vllm", "serve", "/m", "--api-key", A, B, "--port", "8000"])
    assert A not in shown and B not in shown
    assert shown == ["vllm", "serve", "/m", "--api-key", MASK, MASK, "--port", "8000"]


def test_single_value_flags_still_keep_what_follows():
    assert redact_argv(["--hf-token", "x", "/model"]) == ["--hf-token", MASK, "/model"]


def test_every_key_is_hidden_in_text_forms():
    for text in (
        f"python -m vllm.entrypoints.openai.api_server --api-key {A} {B} --port 8000",
        f"argv: ['--api-key', '{A}', '{B}', '--port', '8000']",
        f"non-default args: {{'api_key': ['{A}', '{B}'], 'max_num_batched_tokens': 2048}}",
    ):
        out = redact_text(text)
        assert A not in out and B not in out, out
        assert "8000" in out or "2048" in out  # what follows the keys survives


def test_records_hide_every_key():
    rec = {"argv": ["vllm", "serve", "--api-key", A, B], "note": f"--api-key={A}"}
    assert A not in str(redact_obj(rec)) and B not in str(redact_obj(rec))


def test_the_keys_end_where_the_text_around_them_goes_on():
    row = f"| t1 | --api-key {A} {B} | ready | 16384 |"
    out = redact_text(row)
    assert A not in out and B not in out
    assert out.endswith("| ready | 16384 |"), out  # a table row keeps its cells
    assert redact_text(f"(--api-key {A}); next").endswith("); next")
