"""Ollama as an engine, over real HTTP against the stand-in (testing/fake_ollama.py) through probe.run_trial:
one test per trap (a context lowered silently, part of the model on the CPU, a prompt cut silently, a runner
that dies), the tree stopped with its runner, and bad input as one line before any launch."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import psutil
import pytest
from conftest import ollama_store
from vllm_lab import engines
from vllm_lab.engines import ollama, ollama_check, ollama_gguf
from vllm_lab.errors import SpecError
from vllm_lab.probe import run_trial
from vllm_lab.spec import Trial

FAKE_OLLAMA = f"{sys.executable} -m vllm_lab.testing.fake_ollama serve"
MODEL = "qwen3:8b-q4_K_M"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return ollama_store(tmp_path / "ollama-models", MODEL)


def ollama_trial(store: Path, ctx: int = 2048, extra_args=(), **knobs: str) -> Trial:
    env = {"OLLAMA_MODELS": str(store), **knobs}
    return Trial(model=MODEL, engine="ollama", vllm_cmd=FAKE_OLLAMA, max_model_len=ctx, env=env,
                 extra_args=list(extra_args), startup_timeout_s=60, request_timeout_s=60)  # fmt: skip


def log_text(rec: dict) -> str:
    return Path(rec["log_path"]).read_text()


# ------------------------------------------------------------------------------------------------ it works


def test_a_fitting_context_is_ready_with_what_ollama_reports(store, run_dir, tmp_path):
    pidfile = tmp_path / "runner.pid"
    rec = run_trial(ollama_trial(store, FAKE_OLLAMA_RUNNER_PIDFILE=str(pidfile)), run_dir)
    assert rec["outcome"] == "ready", rec
    assert (rec["engine"], rec["backend"], rec["engine_version"]) == ("ollama", "fake", "0.31.2")
    assert rec["context_used"] == 2048 and rec["long_request_ok"] is True
    assert rec["prompt_tokens_counted"] == rec["prompt_tokens_sent"] > 1900
    assert any(a.startswith("OLLAMA_HOST=127.0.0.1:") for a in rec["argv"])
    assert "OLLAMA_CONTEXT_LENGTH:2048" in log_text(rec)  # the context reached the server as its env
    assert "-c 2048" in log_text(rec)  # and the runner (num_ctx on the native load request)
    assert not psutil.pid_exists(int(pidfile.read_text()))  # the runner child went with the server


def test_knobs_reach_the_server_from_env_and_extra_args(store, run_dir):
    t = ollama_trial(store, extra_args=["OLLAMA_NUM_PARALLEL=2"], OLLAMA_KV_CACHE_TYPE="q8_0")
    rec = run_trial(t, run_dir, long=False)
    text = log_text(rec)
    assert rec["outcome"] == "ready"
    assert "-c 4096 -np 2" in text  # num_ctx x parallel, as Ollama starts llama-server
    assert "quantized kv cache requested but flash attention disabled" in text


# ------------------------------------------------------------------------------------------------ traps


def test_a_context_lowered_silently_is_context_reduced(store, run_dir):
    rec = run_trial(ollama_trial(store, FAKE_OLLAMA_FIT_CTX="1024"), run_dir)
    assert (rec["outcome"], rec["failure"]) == ("failed", "context_reduced"), rec
    assert rec["context_used"] == 1024 and rec["max_model_len"] == 2048
    assert "1024" in rec["evidence"] and "2048" in rec["evidence"]
    assert rec["long_request_ok"] is not True


def test_a_context_over_the_models_own_is_context_reduced_too(store, run_dir):
    rec = run_trial(ollama_trial(store, FAKE_OLLAMA_CTX_TRAIN="1024"), run_dir, long=False)
    assert (rec["outcome"], rec["failure"], rec["context_used"]) == ("failed", "context_reduced", 1024)
    assert "requested context size too large for model" in log_text(rec)


def test_part_of_the_model_on_the_cpu_is_recorded_and_said(store, run_dir):
    t = ollama_trial(store, FAKE_OLLAMA_VRAM_MIB="24576", FAKE_OLLAMA_VRAM_FRACTION="0.6")
    rec = run_trial(t, run_dir)
    assert rec["outcome"] == "ready"
    assert rec["offload_fraction"] == pytest.approx(0.6, abs=0.01)
    assert rec["model_vram_bytes"] < rec["model_size_bytes"]
    assert "part of the model on the CPU" in (rec["note"] or "")


def test_a_prompt_cut_silently_is_context_truncated_never_long_request_ok(store, run_dir):
    rec = run_trial(ollama_trial(store, FAKE_OLLAMA_TRUNCATE_AT="1000"), run_dir)
    assert (rec["outcome"], rec["failure"]) == ("unstable", "context_truncated"), rec
    assert rec["long_request_ok"] is False
    assert rec["prompt_tokens_counted"] < rec["prompt_tokens_sent"]
    assert "truncating input prompt" in log_text(rec)


def test_a_runner_that_dies_loading_is_failed_with_llamacpps_cause(store, run_dir):
    rec = run_trial(ollama_trial(store, FAKE_OLLAMA_RUNNER_DIES="load"), run_dir)
    assert (rec["outcome"], rec["failure"]) == ("failed", "kv_cache_oom"), rec
    assert "kv cache" in rec["evidence"]


def test_a_runner_that_dies_serving_is_unstable_with_its_cause(store, run_dir):
    rec = run_trial(ollama_trial(store, FAKE_OLLAMA_RUNNER_DIES="request"), run_dir)
    assert (rec["outcome"], rec["failure"]) == ("unstable", "cuda_oom"), rec
    assert rec["long_request_ok"] is False


def test_a_runner_that_ignores_sigterm_is_ended_with_the_tree(store, run_dir, tmp_path):
    pidfile = tmp_path / "runner.pid"
    t = ollama_trial(store, FAKE_OLLAMA_RUNNER_ORPHAN="1", FAKE_OLLAMA_RUNNER_PIDFILE=str(pidfile))
    rec = run_trial(t, run_dir, long=False)
    assert rec["outcome"] == "ready"
    assert not psutil.pid_exists(int(pidfile.read_text()))
    assert "survived" not in (rec["note"] or "")


# ------------------------------------------------------------------------------------------------ bad input


def one_line(trial: Trial) -> str:
    with pytest.raises(SpecError) as e:
        trial.validate()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_a_model_not_in_the_store_says_ollama_pull(store):
    t = ollama_trial(store)
    t.model = "llama3.1:8b"
    assert "`ollama pull llama3.1:8b`" in one_line(t)


def test_ollama_not_installed_says_how_to_install(store):
    if shutil.which("ollama"):
        pytest.skip("an ollama binary is on PATH here")
    t = Trial(model=MODEL, engine="ollama", max_model_len=2048, env={"OLLAMA_MODELS": str(store)})
    assert t.vllm_cmd == "ollama serve"
    msg = one_line(t)
    assert "ollama not found" in msg and "ollama.com/install.sh" in msg


def test_a_vllm_flag_is_refused_with_ollamas_knob(store):
    msg = one_line(ollama_trial(store, extra_args=["--max-model-len", "4096"]))
    assert "--max-model-len is not Ollama's" in msg and "OLLAMA_CONTEXT_LENGTH" in msg


def test_a_gguf_file_is_valid_and_served_as_the_model_created_from_it(store, tmp_path):
    f = tmp_path / "Qwen3-8B-Q4_K_M.gguf"
    f.write_bytes(b"GGUF")
    t = ollama_trial(store)
    t.model = str(f)
    assert t.validate() is t  # created in the store after ready (tests/test_ollama_store.py)
    assert t.served_model_name() == f"vllm-lab-qwen3-8b-q4_k_m:{ollama_gguf.file_digest(f)[7:19]}"


def test_the_context_knob_is_the_trials_not_the_env(store):
    assert "max_model_len" in one_line(ollama_trial(store, OLLAMA_CONTEXT_LENGTH="8192"))


# ------------------------------------------------------------------------------------------------ seam


def test_registered_with_the_servers_own_readiness_and_environment(store):
    e = engines.get("ollama")
    assert e is ollama.ENGINE and e.health_path == "/"
    t = ollama_trial(store, extra_args=["OLLAMA_FLASH_ATTENTION=1"])
    assert e.env(t) == {
        "OLLAMA_MODELS": str(store),
        "OLLAMA_CONTEXT_LENGTH": "2048",
        "OLLAMA_FLASH_ATTENTION": "1",
    }
    argv = e.argv(t, 5555, "127.0.0.1")
    assert argv[:4] == [
        "env",
        "OLLAMA_HOST=127.0.0.1:5555",
        "OLLAMA_CONTEXT_LENGTH=2048",
        "OLLAMA_FLASH_ATTENTION=1",
    ]
    assert argv[-1] == "serve" and not any(str(store) in a for a in argv)  # no local path in the argv


def test_a_load_phase_is_accepted_for_ollama(store):
    """It sends text prompts there (tests/test_ollama_load.py runs it)."""
    t = ollama_trial(store)
    t.load = {"concurrency": [1, 2]}
    t.validate()  # no SpecError


# ------------------------------------------------------------------------------------------------ preflight


def test_ollamas_default_context_by_total_vram():
    from vllm_lab.compat import ollama_default_context

    assert ollama_default_context(22919) == 4096  # a P40 with ECC on reports about 22.4 GiB
    assert ollama_default_context(24576) == 32768
    assert ollama_default_context(48 * 1024) == 262144


def test_ollama_facts_for_a_p40_by_version():
    from vllm_lab.compat import ollama_facts

    old = ollama_facts(cc=61, total_mib=24576, ecc_total_mib=22919, ollama_version="0.31.1")
    assert old["default_context"] == 32768 and old["default_context_ecc"] == 4096
    assert old["min_driver"] == 570 and old["flash_attention"] is False and old["kv_q8_0"] is False
    new = ollama_facts(cc=61, total_mib=24576, ollama_version="0.31.2")
    assert new["flash_attention"] is True and new["kv_q8_0"] is True
    unknown = ollama_facts(cc=61, total_mib=24576)  # no version: both eras said
    assert unknown["flash_attention"] is None and "0.31.2" in " ".join(unknown["lines"])
    assert ollama_facts(cc=86, total_mib=24576)["min_driver"] is None


def test_preflight_states_ollamas_facts_for_the_card(tmp_path):
    from vllm_lab.predict import format_preflight, preflight

    model = tmp_path / "Qwen3-8B"
    model.mkdir()
    cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
           "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
           "max_position_embeddings": 40960, "vocab_size": 151936, "torch_dtype": "bfloat16"}  # fmt: skip
    (model / "config.json").write_text(json.dumps(cfg))
    text = format_preflight(preflight(str(model), "p40"))
    assert "Ollama" in text and "4096" in text and "driver 570" in text and "0.31.2" in text
    assert text.splitlines()[-1].endswith("`vllm-lab run params/p40-engines.yaml` (`--dry-run` first)")


# ------------------------------------------------------------------------------------------------ its log

FIXTURES = Path(__file__).parent / "fixtures" / "logs" / "llamacpp"


def test_real_ollama_logs_are_read_as_ollamas_with_llamacpps_rules():
    from vllm_lab.engines import llamacpp_log

    logs = sorted(FIXTURES.glob("*/ollama-*.log"))
    assert len(logs) >= 8
    for path in logs:
        text = path.read_text()
        assert engines.of_log(text) is ollama.ENGINE, path.name
        scan = ollama.ENGINE.scan(text)
        assert scan.engine == "ollama" and scan.failure == llamacpp_log.scan_log(text).failure, path.name


def test_the_version_is_ollamas_not_its_runners_llamacpp_build():
    text = (
        'time=2026-08-01T07:02:30Z level=INFO source=routes.go:1384 msg="Listening on 127.0.0.1:11434 '
        '(version 0.30.5)"\nbuild: 8153 (abc1234) with GNU 12.2.0 for x86_64-linux-gnu\n'
    )
    assert ollama.ENGINE.scan(text).engine_version == "0.30.5"


def test_backend_from_the_install_layout(tmp_path):
    """Ollama's Linux tarball: bin/ollama beside lib/ollama (CPU) and lib/ollama/cuda_v12 (CUDA runners)."""
    exe = tmp_path / "bin" / "ollama"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert ollama.ENGINE.backend(f"{exe} serve") == "unknown"
    (tmp_path / "lib" / "ollama").mkdir(parents=True)
    assert ollama.ENGINE.backend(f"{exe} serve") == "ollama-cpu"
    (tmp_path / "lib" / "ollama" / "cuda_v12").mkdir()
    assert ollama.ENGINE.backend(f"{exe} serve") == "ollama-cuda"
    assert ollama.ENGINE.backend(FAKE_OLLAMA) == "fake"


def test_a_model_wholly_on_the_cpu_beside_a_visible_gpu_is_said(store, monkeypatch):
    monkeypatch.setattr(ollama_check, "_gpu_visible", lambda trial: True)
    check = ollama_check.OllamaCheck(ollama_trial(store), "http://127.0.0.1:9", long=False)
    assert check._context({"context_length": 2048, "size": 6 << 30, "size_vram": 0})
    assert check.out["offload_fraction"] == 0 and "the whole model on the CPU" in check.notes[0]
    monkeypatch.setattr(ollama_check, "_gpu_visible", lambda trial: False)  # a CPU-only box: nothing to say
    check = ollama_check.OllamaCheck(ollama_trial(store), "http://127.0.0.1:9", long=False)
    assert check._context({"context_length": 2048, "size": 6 << 30, "size_vram": 0}) and not check.notes


def test_an_ollama_model_is_never_fetched_from_the_hugging_face_hub(store, monkeypatch):
    from vllm_lab import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_download", lambda *a, **k: pytest.fail("asked the hub for an Ollama model"))
    assert hub.prefetch_trial(ollama_trial(store)) is None


# ------------------------------------------------------------------------------------------------ the CLI

VLLM_LAB = [sys.executable, "-m", "vllm_lab.cli"]


def test_vllm_lab_launch_engine_ollama_through_the_cli(store, run_dir):
    import subprocess

    env = {**os.environ, "OLLAMA_MODELS": str(store)}
    env.pop("HF_HUB_OFFLINE", None)  # an Ollama name must not go to the hub either way
    args = ["launch", "--engine", "ollama", "--model", MODEL, "--max-model-len", "2048", "--vllm-cmd", FAKE_OLLAMA,
            "--extra-args", "OLLAMA_NUM_PARALLEL=2", "--out", str(run_dir), "--json"]  # fmt: skip
    out = subprocess.run([*VLLM_LAB, *args], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert (rec["engine"], rec["outcome"], rec["context_used"]) == ("ollama", "ready", 2048)
    assert "OLLAMA_NUM_PARALLEL=2" in rec["argv"]


def test_vllm_lab_launch_a_model_not_pulled_is_one_line_exit_2(store, run_dir):
    import subprocess

    env = {**os.environ, "OLLAMA_MODELS": str(store)}
    args = [
        "launch",
        "--engine",
        "ollama",
        "--model",
        "llama3.1:8b",
        "--max-model-len",
        "2048",
        "--out",
        str(run_dir),
    ]
    out = subprocess.run([*VLLM_LAB, *args], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "`ollama pull llama3.1:8b`" in out.stderr and not (run_dir / "trials.jsonl").exists()


def test_a_name_without_a_tag_is_found_as_ollama_lists_it(tmp_path, run_dir):
    store = ollama_store(tmp_path / "models", "qwen3")  # `ollama pull qwen3`: the tag latest
    t = Trial(**{**ollama_trial(store).__dict__, "model": "qwen3", "trial_id": ""})
    rec = run_trial(t, run_dir)
    assert rec["outcome"] == "ready", rec  # /api/ps says qwen3:latest
    assert rec["context_used"] == 2048


def test_a_container_keeps_its_own_store_and_listens_where_it_is_published(tmp_path):
    from vllm_lab.launcher import build_argv

    cmd = "docker run --gpus all -v ollama:/root/.ollama ollama/ollama"
    t = Trial(model=MODEL, engine="ollama", vllm_cmd=cmd, max_model_len=8192)
    argv = build_argv(t.validate(check_command=False), 40001)
    assert "OLLAMA_MODELS" not in argv  # this machine's store path means nothing inside the container
    assert argv[argv.index("-p") + 1] == "127.0.0.1:40001:40001" and "OLLAMA_HOST=0.0.0.0:40001" in argv
    assert argv[-2:] == ["ollama/ollama", "serve"] and "OLLAMA_CONTEXT_LENGTH" in argv
    own = Trial(**{**t.__dict__, "env": {"OLLAMA_MODELS": "/models"}, "trial_id": ""})
    assert build_argv(own, 40001).count("OLLAMA_MODELS") == 1  # the user's own, passed once by name
