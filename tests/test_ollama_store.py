"""An Ollama model from a GGUF file (blob upload + /api/create after ready) and a pull only on request
(Trial.pull, progress printed), over real HTTP against the stand-in (testing/fake_ollama.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT, ollama_store
from vllm_lab.engines import ollama, ollama_gguf
from vllm_lab.errors import SpecError
from vllm_lab.probe import run_trial
from vllm_lab.spec import Trial

FAKE_OLLAMA = f"{sys.executable} -m vllm_lab.testing.fake_ollama serve"
MODEL = "qwen3:8b-q4_K_M"
TINY_GGUF = ROOT / ".cache" / "models" / "tiny-qwen2.gguf"
MISSING = "llama3.1:8b"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return ollama_store(tmp_path / "ollama-models", MODEL)


def ollama_trial(store: Path, ctx: int = 2048, **knobs: str) -> Trial:
    return Trial(model=MODEL, engine="ollama", vllm_cmd=FAKE_OLLAMA, max_model_len=ctx,
                 env={"OLLAMA_MODELS": str(store), **knobs}, startup_timeout_s=60, request_timeout_s=60)  # fmt: skip


def gguf_trial(store: Path, model: Path, **kw) -> Trial:
    t = ollama_trial(store, **kw)
    t.model = str(model)
    t.trial_id = t.default_id()
    return t


def one_line(trial: Trial) -> str:
    with pytest.raises(SpecError) as e:
        trial.validate()
    assert "\n" not in str(e.value)
    return str(e.value)


# ------------------------------------------------------------------------------------------------ a GGUF file


@pytest.mark.skipif(not TINY_GGUF.is_file(), reason="make models builds .cache/models/tiny-qwen2.gguf")
def test_a_gguf_file_is_created_in_the_store_loaded_and_ready_then_its_blob_reused(store, run_dir, capsys):
    t = gguf_trial(store, TINY_GGUF)
    name = ollama_gguf.created_name(TINY_GGUF)
    digest = ollama_gguf.file_digest(TINY_GGUF)
    assert name == f"vllm-lab-tiny-qwen2:{digest[7:19]}" and t.served_model_name() == name
    rec = run_trial(t, run_dir)
    assert rec["outcome"] == "ready", rec
    assert rec["model"] == str(TINY_GGUF) and rec["chat_ok"] is True and rec["long_request_ok"] is True
    made = rec["ollama_store"]
    assert (made["action"], made["model"], made["digest"], made["blob_uploaded"]) == (
        "created",
        name,
        digest,
        True,
    )
    assert (store / "blobs" / digest.replace(":", "-")).stat().st_size == TINY_GGUF.stat().st_size
    assert ollama.manifest_path(store, name).is_file()  # in the store: listed and loadable by name
    out = capsys.readouterr().out
    assert f"ollama create {name}: uploading tiny-qwen2.gguf" in out
    assert (
        f"ollama create {name}: using existing layer {digest}" in out
        and f"ollama create {name}: success" in out
    )

    again = run_trial(gguf_trial(store, TINY_GGUF, ctx=1024), run_dir)  # a second trial of the same file
    assert again["outcome"] == "ready", again
    assert again["ollama_store"]["blob_uploaded"] is False and again["ollama_store"]["model"] == name
    assert "uploading" not in capsys.readouterr().out


def test_two_different_files_get_two_names(tmp_path):
    a, b = tmp_path / "a" / "Model_Q4.gguf", tmp_path / "b" / "Model_Q4.gguf"
    for f, body in ((a, b"GGUF\x03one"), (b, b"GGUF\x03two")):
        f.parent.mkdir()
        f.write_bytes(body)
    assert ollama_gguf.created_name(a).startswith("vllm-lab-model_q4:")
    assert ollama_gguf.created_name(a) != ollama_gguf.created_name(b)


def test_a_file_that_is_not_gguf_is_one_line_before_any_launch(store, tmp_path, run_dir):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    msg = one_line(gguf_trial(store, f))
    assert "not a GGUF file" in msg and str(f) in msg
    with pytest.raises(SpecError):
        run_trial(gguf_trial(store, f), run_dir)
    assert not (run_dir / "trials.jsonl").exists()


def test_a_gguf_path_that_does_not_exist_is_one_line(store, tmp_path):
    assert "is not a file" in one_line(gguf_trial(store, tmp_path / "nowhere.gguf"))


# ------------------------------------------------------------------------------------------------ a pull


def test_a_model_not_in_the_store_without_pull_is_one_line_naming_the_knob(store):
    t = ollama_trial(store)
    t.model = MISSING
    msg = one_line(t)
    assert f"`ollama pull {MISSING}`" in msg and "pull: true" in msg


def test_pull_is_in_the_trial_id_only_when_asked(store):
    t = ollama_trial(store)
    asked = Trial(**{**t.to_dict(), "pull": True, "trial_id": ""})
    assert t.trial_id != asked.trial_id and t.trial_id == ollama_trial(store).trial_id  # old ids kept
    assert one_line(Trial(model="m", pull=True)).startswith("pull: ")  # vLLM has no store to pull into


def test_with_pull_the_model_is_pulled_with_progress_and_the_trial_is_ready(store, run_dir, capsys):
    t = ollama_trial(store)
    t.model, t.pull = MISSING, True
    t.validate()  # no refusal: the pull happens after ready
    rec = run_trial(t, run_dir, long=False)
    assert rec["outcome"] == "ready", rec
    assert rec["ollama_store"]["action"] == "pulled" and rec["ollama_store"]["bytes"] == 5_027_783_488
    assert ollama.manifest_path(store, MISSING).is_file()
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith(f"ollama pull {MISSING}: ")]
    assert lines[0].endswith("pulling manifest") and lines[-1].endswith("success")
    progress = [x for x in lines if "%" in x]
    assert 2 <= len(progress) <= 11 and progress[-1].split(": pulling ")[1].split()[1] == "100%"
    assert any(x.endswith("verifying sha256 digest") for x in lines)


def test_with_pull_a_model_already_in_the_store_is_not_pulled(store, run_dir, capsys):
    t = ollama_trial(store)
    t.pull = True
    rec = run_trial(t, run_dir, long=False)
    assert rec["outcome"] == "ready" and rec["ollama_store"] == {"action": "present", "model": MODEL}
    assert "pulling manifest" not in capsys.readouterr().out


def test_a_pull_that_fails_is_a_failed_trial_with_ollamas_message(store, run_dir):
    t = ollama_trial(store, FAKE_OLLAMA_PULL_FAILS="1")
    t.model, t.pull = MISSING, True
    rec = run_trial(t, run_dir, long=False)
    assert (rec["outcome"], rec["failure"]) == ("failed", "model_not_found"), rec
    assert "pull model manifest: file does not exist" in rec["evidence"]
    assert rec["ollama_store"]["action"] == "pull failed"


def test_an_engines_entry_may_ask_for_a_pull(tmp_path, store):
    from vllm_lab.engine_compare import check_entries, template
    from vllm_lab.steps import StepParams

    e = {"name": "ollama", "engine": "ollama", "model": MISSING, "pull": True, "vllm_cmd": FAKE_OLLAMA,
         "env": {"OLLAMA_MODELS": str(store)}}  # fmt: skip
    check_entries([e])
    t = template(StepParams(run_dir=str(tmp_path), step="engines", model="m"), e, 1024, 2048)
    assert (t.model, t.pull) == (MISSING, True) and t.validate()
    with pytest.raises(SpecError, match="pull: 'yes' must be true or false"):
        template(StepParams(run_dir=str(tmp_path), step="engines", model="m"), {**e, "pull": "yes"}, 1024,
                 2048).validate()  # fmt: skip


def test_vllm_lab_launch_pull_pulls_a_missing_model(store, run_dir):
    import os
    import subprocess

    env = {**os.environ, "OLLAMA_MODELS": str(store)}
    args = ["launch", "--engine", "ollama", "--model", MISSING, "--max-model-len", "2048", "--vllm-cmd", FAKE_OLLAMA,
            "--out", str(run_dir), "--json"]  # fmt: skip
    cli = [sys.executable, "-m", "vllm_lab.cli"]
    refused = subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and "--pull" in refused.stderr
    out = subprocess.run([*cli, *args, "--pull"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert (rec["outcome"], rec["ollama_store"]["action"]) == ("ready", "pulled")
    assert f"ollama pull {MISSING}: pulling manifest" in out.stdout


def test_the_dry_run_asks_no_pull_for_a_gguf_or_a_pull_entry(store):
    from vllm_lab.engine_compare import _entry_trial, _ollama_store_note

    def note(entry: dict, model: str) -> str:
        return _ollama_store_note(_entry_trial(entry, model))

    env = {"OLLAMA_MODELS": str(store)}
    assert "`ollama pull" in note({"engine": "ollama", "env": env}, MISSING)
    assert note({"engine": "ollama", "env": env, "pull": True}, MISSING) == ""
    assert note({"engine": "ollama", "env": env}, str(TINY_GGUF)) == ""  # created at run time
