"""The engine seam: the registry, the trial's engine and memory limit, and vLLM's engine as before."""

from __future__ import annotations

import dataclasses

import pytest
from vllm_lab import engines
from vllm_lab.engines.base import METRIC_NAMES, Engine
from vllm_lab.launcher import build_argv
from vllm_lab.spec import SpecError, Trial

pytestmark = pytest.mark.unit


# Ids of vLLM trials computed by the code before the seam: a resume must still find their records.
@pytest.mark.parametrize(
    ("kw", "trial_id"),
    [
        ({"model": "x"}, "adhoc-head-lenNone-uNone-bdf135a7"),
        (
            {"model": "/m/Qwen3-8B-AWQ", "launcher": "explicit", "quantization": "awq", "max_model_len": 4096,
             "gpu_memory_utilization": 0.85, "step": "01_restore"},
            "01_restore-explicit-qawq-len4096-u0.85-20735412",
        ),
        (
            {"model": "m", "kv_cache_memory_bytes": 2**30, "max_model_len": 512, "extra_args": ["--enforce-eager"],
             "env": {"A": "1"}, "load": {"concurrency": [1, 2]}, "install": "old", "step": "s"},
            "s-head-len512-kv1073741824-89188afd",
        ),
    ],
)  # fmt: skip
def test_existing_vllm_trial_ids_are_unchanged(kw, trial_id):
    assert Trial(**kw).trial_id == trial_id
    assert Trial(**kw, engine="vllm").trial_id == trial_id  # naming the default changes nothing


def test_engine_and_memory_limit_enter_the_id_only_when_set():
    base = Trial(model="m", max_model_len=512)
    limited = Trial(model="m", max_model_len=512, memory_limit_bytes=2**30)
    assert limited.fingerprint() != base.fingerprint()
    assert "-as1073741824-" in limited.trial_id
    other = Trial(model="m", max_model_len=512, engine="other-engine-for-test")
    assert other.fingerprint() != base.fingerprint()
    assert other.trial_id.startswith("adhoc-other-engine-for-test-len512-")


def test_unknown_engine_is_one_line_before_anything_else(fake_model):
    with pytest.raises(SpecError) as e:
        Trial(model=str(fake_model), engine="tgi").validate()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("engine: 'tgi' is not one of ") and "vllm" in msg


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1G"])
def test_memory_limit_must_be_a_positive_byte_count(fake_model, bad):
    with pytest.raises(SpecError, match=r"^memory_limit_bytes: .* positive integer"):
        Trial(model=str(fake_model), memory_limit_bytes=bad).validate(check_command=False)


def test_registry_names_gets_and_rejects():
    assert "vllm" in engines.names()
    assert engines.get(None) is engines.get("vllm")
    assert engines.get("vllm").default_cmd == "vllm serve"
    with pytest.raises(SpecError, match=r"^engine: 'nope' is not one of"):
        engines.get("nope")


def test_vllm_engine_answers_every_metric_name():
    vllm = engines.get("vllm")
    assert set(vllm.metrics) == set(METRIC_NAMES)
    page = {"vllm:gpu_cache_usage_perc": 0.5, "vllm:num_requests_running": 3.0}  # an older vLLM's names
    assert engines.metric(page, "kv_usage") == 0.5
    assert engines.metric(page, "running") == 3.0
    assert engines.metric(page, "waiting") is None
    assert {"vllm:kv_cache_usage_perc", "vllm:num_preemptions_total"} <= engines.metric_series()


class _Echo(Engine):
    name = "echo-test"
    default_cmd = "echo-server"

    def argv(self, trial, port, host):
        return [*trial.vllm_cmd.split(), "--listen", f"{host}:{port}", "-c", str(trial.max_model_len)]


def test_launcher_asks_the_trials_engine_for_argv_and_wraps_a_container(monkeypatch, fake_model):
    monkeypatch.setitem(engines._REGISTRY, "echo-test", _Echo())
    t = Trial(model=str(fake_model), engine="echo-test", max_model_len=256)
    assert t.vllm_cmd == "echo-server"  # the engine's command where the trial names none
    assert build_argv(t, 9000) == ["echo-server", "--listen", "127.0.0.1:9000", "-c", "256"]
    boxed = Trial(model=str(fake_model), engine="echo-test", max_model_len=256, vllm_cmd="docker run img")
    argv = build_argv(boxed, 9000, "c1")
    assert argv[:2] == ["docker", "run"] and argv[argv.index("--name") + 1] == "c1"
    assert argv[-5:] == ["img", "--listen", "0.0.0.0:9000", "-c", "256"]  # the container listens on all


def test_vllm_engine_argv_is_the_launcher_generations(fake_awq_model):
    t = Trial(model=str(fake_awq_model), launcher="legacy", max_model_len=64, kv_cache_memory_bytes=2**20)
    assert engines.get("vllm").argv(t, 8001, "127.0.0.1") == [
        "vllm", "serve", str(fake_awq_model), "--quantization", "awq_marlin", "--max-model-len", "64",
        "--kv-cache-memory-bytes", str(2**20), "--host", "127.0.0.1", "--port", "8001",
    ]  # fmt: skip


def test_a_step_or_install_engine_reaches_the_trial_through_env(fake_model):
    from vllm_lab.spec import ENGINE_ENV

    t = Trial(model=str(fake_model), env={ENGINE_ENV: "vllm", "A": "1"})
    assert t.engine == "vllm" and t.env == {"A": "1"}  # taken out: never passed to the server
    assert t.trial_id == Trial(model=str(fake_model), env={"A": "1"}).trial_id


def _plan(tmp_path, fake_model, step_extra: str = "", install_extra: str = "") -> str:
    path = tmp_path / "plan.yaml"
    path.write_text(
        f"model: {fake_model}\nvllm_cmd: {__import__('sys').executable} -m vllm_lab.testing.fake_vllm\n"
        f"installs:\n  mine: {{vllm_cmd: 'true'{install_extra}}}\n"
        f"steps:\n  - {{name: s1, notebook: 01_restore_launcher{step_extra}}}\n"
    )
    return str(path)


def test_plan_step_and_install_take_an_engine_and_reject_an_unknown_one(tmp_path, fake_model):
    from vllm_lab.plan import load_plan

    plan = load_plan(_plan(tmp_path, fake_model, ", engine: vllm", ", engine: vllm"), check_command=False)
    assert plan.steps[0].engine == "vllm" and plan.installs["mine"].engine == "vllm"
    from vllm_lab.spec import ENGINE_ENV

    assert plan.notebook_parameters(plan.steps[0], tmp_path)["ENV"][ENGINE_ENV] == "vllm"
    with pytest.raises(SpecError, match=r"^steps\[0\]\.engine: 'tgi' is not one of"):
        load_plan(_plan(tmp_path, fake_model, ", engine: tgi"), check_command=False)
    with pytest.raises(SpecError, match=r"^installs\.mine\.engine: 'tgi' is not one of"):
        load_plan(_plan(tmp_path, fake_model, install_extra=", engine: tgi"), check_command=False)


def test_the_plans_vllm_defaults_do_not_reach_a_step_on_another_engine(tmp_path, fake_model):
    """Before: the CPU demo's defaults (--enforce-eager, VLLM_ENABLE_V1_MULTIPROCESSING) ended a llama.cpp step
    with "--enforce-eager is vLLM's", and the step could not override them (EXTRA_ARGS is the plan's)."""
    from vllm_lab.plan import load_plan

    text = _plan(tmp_path, fake_model, ", install: mine", ", engine: llamacpp")
    text_path = tmp_path / "plan.yaml"
    text_path.write_text(
        text_path.read_text()
        + "defaults: {extra_args: [--enforce-eager], env: {VLLM_ENABLE_V1_MULTIPROCESSING: '0'}}\n"
    )
    plan = load_plan(text, check_command=False)
    params = plan.notebook_parameters(plan.steps[0], tmp_path)
    assert params["EXTRA_ARGS"] == [] and "VLLM_ENABLE_V1_MULTIPROCESSING" not in params["ENV"]
    vllm_step = dataclasses.replace(plan.steps[0], install=None)
    assert plan.notebook_parameters(vllm_step, tmp_path)["EXTRA_ARGS"] == ["--enforce-eager"]


@pytest.mark.fake
def test_memory_limit_is_the_servers_address_space_limit_and_is_recorded(fake_model, run_dir):
    import resource

    import psutil
    from conftest import fake_trial
    from vllm_lab.launcher import VllmServer
    from vllm_lab.probe import run_trial

    limit = 6 * 2**30
    t = fake_trial(fake_model, memory_limit_bytes=limit)
    with VllmServer(t, run_dir) as server:
        assert server.start().outcome == "ready"
        assert psutil.Process(server.proc.pid).rlimit(resource.RLIMIT_AS) == (limit, limit)
    rec = run_trial(fake_trial(fake_model, memory_limit_bytes=limit, step="lim"), run_dir)
    assert (rec["outcome"], rec["memory_limit"], rec["engine"]) == ("ready", limit, "vllm")
    plain = run_trial(fake_trial(fake_model, step="plain"), run_dir)
    assert plain["memory_limit"] is None  # no limit applied: the record says none


@pytest.mark.fake
def test_a_limit_too_small_to_serve_ends_the_trial_not_the_launcher(fake_model, run_dir):
    from conftest import fake_trial
    from vllm_lab.probe import run_trial

    # 32 MiB: the fake gets as far as listening, then cannot start a thread to answer /health
    rec = run_trial(fake_trial(fake_model, memory_limit_bytes=32 * 2**20, startup_timeout_s=5), run_dir)
    assert rec["outcome"] in ("failed", "timeout") and rec["memory_limit"] == 32 * 2**20


def test_the_load_reads_every_engines_metric_names():
    from vllm_lab import load

    llama = load.combined_metrics("# HELP x\nllamacpp:requests_processing 3\nllamacpp:requests_deferred 1\n")
    assert (engines.metric(llama, "running"), engines.metric(llama, "waiting")) == (3.0, 1.0)
    two_engines = 'vllm:num_requests_running{engine="0"} 2\nvllm:num_requests_running{engine="1"} 5\n'
    assert engines.metric(load.combined_metrics(two_engines), "running") == 7.0  # summed, as before
