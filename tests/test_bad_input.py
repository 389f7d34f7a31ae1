"""Bad input: each case exits 2 with ONE line naming the field and the fix, before any launch, touching nothing."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from vllm_lab import cli

pytestmark = pytest.mark.unit

GOOD_STEP = {"name": "s1", "notebook": "01_restore_launcher", "parameters": {"MAX_MODEL_LEN": 1024}}


@pytest.fixture
def env(tmp_path, fake_model):
    """A model, a vLLM command that leaves a marker if it is ever launched, and a run folder with a record."""
    marker = tmp_path / "LAUNCHED"
    cmd = tmp_path / "vllm-marker"
    cmd.write_text(f"#!/bin/sh\ntouch {marker}\n")
    cmd.chmod(0o755)
    run = tmp_path / "run"
    run.mkdir()
    (run / "trials.jsonl").write_text(json.dumps({"trial_id": "kept", "outcome": "ready"}) + "\n")
    return {"model": str(fake_model), "cmd": str(cmd), "marker": marker, "run": run, "tmp": tmp_path}


def plan_with(env, **over) -> dict:
    plan = {"model": env["model"], "vllm_cmd": env["cmd"], "steps": [dict(GOOD_STEP)]}
    plan.update(over)
    return plan


def step_with(**over) -> dict:
    s = json.loads(json.dumps(GOOD_STEP))
    params = over.pop("parameters", None)
    if params is not None:
        s["parameters"] = params
    s.update(over)
    return s


# (case id, plan builder or raw text, expected words in the one line)
PLAN_CASES = [
    ("unknown-top-key", lambda e: {**plan_with(e), "modle": "x"}, "modle"),
    ("missing-model", lambda e: {k: v for k, v in plan_with(e).items() if k != "model"}, "model"),
    ("missing-steps", lambda e: {k: v for k, v in plan_with(e).items() if k != "steps"}, "steps"),
    ("empty-steps", lambda e: plan_with(e, steps=[]), "steps"),
    ("model-dir-missing", lambda e: plan_with(e, model=str(e["tmp"] / "nope")), "model"),
    ("model-not-a-string", lambda e: plan_with(e, model=42), "model"),
    ("vllm-not-installed", lambda e: plan_with(e, vllm_cmd="/no/such/venv/bin/python -m vllm"), "vllm_cmd"),
    ("vllm-cmd-empty", lambda e: plan_with(e, vllm_cmd=""), "vllm_cmd"),
    ("duplicate-steps", lambda e: plan_with(e, steps=[GOOD_STEP, GOOD_STEP]), "duplicate"),
    ("unknown-notebook", lambda e: plan_with(e, steps=[step_with(notebook="05_magic")]), "notebook"),
    ("unknown-step-key", lambda e: plan_with(e, steps=[step_with(paramters={})]), "paramters"),
    ("step-without-name", lambda e: plan_with(e, steps=[{"notebook": "01_restore_launcher"}]), "name"),
    ("step-not-mapping", lambda e: plan_with(e, steps=["01_restore_launcher"]), "steps[0]"),
    ("param-typo", lambda e: plan_with(e, steps=[step_with(parameters={"MAX_MODEL_LENN": 1024})]), "MAX_MODEL_LENN"),
    ("util-1.5", lambda e: plan_with(e, steps=[step_with(parameters={"GPU_MEMORY_UTILIZATION": 1.5})]), "GPU_MEMORY_UTILIZATION"),
    ("util-0", lambda e: plan_with(e, steps=[step_with(parameters={"GPU_MEMORY_UTILIZATION": 0})]), "GPU_MEMORY_UTILIZATION"),
    ("util-string", lambda e: plan_with(e, steps=[step_with(parameters={"GPU_MEMORY_UTILIZATION": "0.85"})]), "GPU_MEMORY_UTILIZATION"),
    ("util-negative", lambda e: plan_with(e, steps=[step_with(parameters={"GPU_MEMORY_UTILIZATION": -0.5})]), "GPU_MEMORY_UTILIZATION"),
    ("len-negative", lambda e: plan_with(e, steps=[step_with(parameters={"MAX_MODEL_LEN": -5})]), "MAX_MODEL_LEN"),
    ("len-float", lambda e: plan_with(e, steps=[step_with(parameters={"MAX_MODEL_LEN": 16384.5})]), "MAX_MODEL_LEN"),
    ("len-string", lambda e: plan_with(e, steps=[step_with(parameters={"MAX_MODEL_LEN": "16k"})]), "MAX_MODEL_LEN"),
    ("len-bool", lambda e: plan_with(e, steps=[step_with(parameters={"MAX_MODEL_LEN": True})]), "MAX_MODEL_LEN"),
    ("len-above-model-limit", lambda e: plan_with(e, steps=[step_with(parameters={"MAX_MODEL_LEN": 10**6})]), "MAX_MODEL_LEN"),
    ("launcher-unknown", lambda e: plan_with(e, steps=[step_with(parameters={"LAUNCHER": "newest"})]), "LAUNCHER"),
    ("kv-negative", lambda e: plan_with(e, steps=[step_with(parameters={"KV_CACHE_MEMORY_BYTES": -1})]), "KV_CACHE_MEMORY_BYTES"),
    ("plan-owned-param", lambda e: plan_with(e, steps=[step_with(parameters={"MODEL": "x"})]), "MODEL"),
    ("defaults-unknown", lambda e: plan_with(e, defaults={"extra_arg": []}), "extra_arg"),
    ("defaults-args-not-list", lambda e: plan_with(e, defaults={"extra_args": "--enforce-eager"}), "extra_args"),
    ("defaults-timeout-negative", lambda e: plan_with(e, defaults={"startup_timeout_s": -1}), "startup_timeout_s"),
    ("step-timeout-zero", lambda e: plan_with(e, steps=[step_with(timeout_s=0)]), "timeout_s"),
    ("factorial-empty-lens", lambda e: plan_with(e, steps=[{"name": "h", "notebook": "04_hypotheses",
                                                             "parameters": {"MAX_MODEL_LENS": []}}]), "MAX_MODEL_LENS"),
    ("factorial-util-out-of-range", lambda e: plan_with(e, steps=[{"name": "h", "notebook": "04_hypotheses",
                                                                    "parameters": {"UTILIZATIONS": [0.85, 1.2]}}]), "GPU_MEMORY_UTILIZATION"),
    ("load-typo-key", lambda e: plan_with(e, steps=[{"name": "l", "notebook": "02_context_budget",
                                                      "parameters": {"LOAD": {"concurency": [1, 2]}}}]), "concurency"),
    ("load-concurrency-0", lambda e: plan_with(e, steps=[{"name": "l", "notebook": "02_context_budget",
                                                           "parameters": {"LOAD": {"concurrency": [0, 2]}}}]), "LOAD.concurrency"),
    ("load-a-string", lambda e: plan_with(e, steps=[{"name": "l", "notebook": "03_max_context_search",
                                                      "parameters": {"LOAD": "1,2,4"}}]), "LOAD"),
    ("plan-is-a-list", lambda e: [plan_with(e)], "plan"),
    ("empty-plan", lambda e: "", "empty"),
    ("invalid-yaml", lambda e: "model: [unclosed\n", "YAML"),
]  # fmt: skip


def _digest(run: Path) -> str:
    return hashlib.sha256((run / "trials.jsonl").read_bytes()).hexdigest()


def _one_line_error(capsys, argv, words):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code}, stderr: {err}"
    assert len(err.splitlines()) == 1, err
    assert words.lower() in err.lower(), err
    return err


@pytest.mark.parametrize(("case", "build", "words"), PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_bad_plan(env, capsys, case, build, words):
    plan = build(env)
    path = env["tmp"] / "plan.yaml"
    path.write_text(plan if isinstance(plan, str) else yaml.safe_dump(plan))
    before = _digest(env["run"])
    for argv in (["run", str(path), "--resume", str(env["run"])], ["run", str(path), "--dry-run"]):
        if case == "vllm-not-installed" and "--dry-run" in argv:
            continue  # a dry run launches nothing, so it does not need vLLM installed
        _one_line_error(capsys, argv, words)
    assert not env["marker"].exists(), "vLLM was launched despite bad input"
    assert _digest(env["run"]) == before


CLI_CASES = [
    ("scan-log-missing", lambda e: ["scan-log", str(e["tmp"] / "nope.log")], "nope.log"),
    ("scan-log-directory", lambda e: ["scan-log", str(e["tmp"])], "scan-log"),
    ("launch-util-1.5", lambda e: ["launch", "--model", e["model"], "--vllm-cmd", e["cmd"], "--gpu-memory-utilization", "1.5", "--out", str(e["run"])], "gpu_memory_utilization"),
    ("launch-model-missing", lambda e: ["launch", "--model", str(e["tmp"] / "nope"), "--vllm-cmd", e["cmd"], "--out", str(e["run"])], "model"),
    ("launch-no-vllm", lambda e: ["launch", "--model", e["model"], "--vllm-cmd", "/no/such/python -m vllm", "--out", str(e["run"])], "vllm_cmd"),
    ("launch-len-zero", lambda e: ["launch", "--model", e["model"], "--vllm-cmd", e["cmd"], "--max-model-len", "0", "--out", str(e["run"])], "max_model_len"),
    ("launch-explicit-without-quant", lambda e: ["launch", "--model", e["model"], "--vllm-cmd", e["cmd"], "--launcher", "explicit", "--out", str(e["run"])], "quantization"),
    ("run-plan-missing", lambda e: ["run", str(e["tmp"] / "nope.yaml")], "plan"),
    ("run-resume-missing", lambda e: ["run", str(ROOT / "params" / "demo-cpu.yaml"), "--resume", str(e["tmp"] / "nope"), "--only", "01_restore_launcher"], "resume"),
    ("run-only-unknown", lambda e: ["run", str(ROOT / "params" / "demo-cpu.yaml"), "--only", "nosuchstep", "--dry-run"], "nosuchstep"),
    ("search-util-0", lambda e: ["search", "--model", e["model"], "--vllm-cmd", e["cmd"], "--gpu-memory-utilization", "0", "--out", str(e["run"])], "gpu_memory_utilization"),
    ("report-no-trials", lambda e: ["report", str(e["tmp"] / "empty")], "trials.jsonl"),
    # command shapes (issue 10): the first word may be anything executable, but some shapes cannot be followed
    ("launch-docker-not-installed", lambda e: _launch(e, f"{e['tmp'] / 'nobin' / 'docker'} run --gpus all vllm/vllm-openai"), "install docker"),
    ("search-podman-not-installed", lambda e: ["search", "--model", e["model"], "--vllm-cmd", f"{e['tmp'] / 'nobin' / 'podman'} run img", "--kv-cache-memory-bytes", "8388608", "--out", str(e["run"])], "install podman"),
    ("launch-docker-detached", lambda e: _launch(e, f"{_docker(e)} run -d --gpus all fake-vllm"), "detach"),
    ("launch-docker-bundled-detach", lambda e: _launch(e, f"{_docker(e)} run -dit fake-vllm"), "detach"),
    ("launch-docker-no-image", lambda e: _launch(e, f"{_docker(e)} run --gpus all"), "image"),
    ("launch-docker-no-daemon", lambda e: _launch(e, f"{_docker(e, daemon=False)} run --gpus all fake-vllm"), "daemon"),
    ("launch-env-without-command", lambda e: _launch(e, "env VLLM_USE_V1=1"), "env"),
    ("launch-env-command-missing", lambda e: _launch(e, "env VLLM_USE_V1=1 /no/such/vllm serve"), "after env"),
    ("launch-assignment-first", lambda e: _launch(e, "VLLM_USE_V1=1 vllm serve"), "env NAME=value"),
    ("launch-runner-python-without-vllm", lambda e: _launch(e, "/no/such/conda run -n e python -m vllm"), "install conda"),
    ("launch-load-typo", lambda e: [*_launch(e, e["cmd"]), "--load", "{concurency: [1, 2]}"], "concurency"),
    ("launch-load-levels-out-of-order", lambda e: [*_launch(e, e["cmd"]), "--load", "{concurrency: [4, 2]}"], "increasing"),
    ("search-load-not-yaml", lambda e: ["search", "--model", e["model"], "--vllm-cmd", e["cmd"], "--kv-cache-memory-bytes", "8388608", "--out", str(e["run"]), "--load", "{concurrency: [1, 2"], "--load: not YAML"),
    ("search-load-not-a-mapping", lambda e: ["search", "--model", e["model"], "--vllm-cmd", e["cmd"], "--kv-cache-memory-bytes", "8388608", "--out", str(e["run"]), "--load", "1,2,4"], "--load: expected a mapping"),
]  # fmt: skip


def _launch(e, vllm_cmd: str) -> list[str]:
    return ["launch", "--model", e["model"], "--vllm-cmd", vllm_cmd, "--out", str(e["run"])]


def _docker(e, daemon: bool = True) -> Path:
    """The docker shim (no container runtime runs here): installed, but never reached by bad input.

    daemon=False: a client whose daemon is not running (`docker info` fails, as the real one here does).
    """
    from vllm_lab.testing.docker_shim import install

    shim = install(e["tmp"] / "docker-bin", e["tmp"] / "docker-state")
    if daemon:
        return shim
    exe = e["tmp"] / "no-daemon-bin" / "docker"
    exe.parent.mkdir(exist_ok=True)
    exe.write_text(f'#!/bin/sh\nDOCKER_SHIM_NO_DAEMON=1 exec {shim} "$@"\n')
    exe.chmod(0o755)
    return exe


@pytest.mark.parametrize(("case", "build", "words"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_call(env, capsys, case, build, words):
    (env["tmp"] / "empty").mkdir(exist_ok=True)
    before = _digest(env["run"])
    _one_line_error(capsys, build(env), words)
    assert not env["marker"].exists()
    assert _digest(env["run"]) == before


def test_bad_input_through_the_real_command_prints_one_line(env):
    """The installed console script, not just main(): exit 2 and exactly one stderr line."""
    exe = Path(sys.executable).with_name("vllm-lab")
    r = subprocess.run([str(exe), "launch", "--model", env["model"], "--vllm-cmd", env["cmd"],
                        "--gpu-memory-utilization", "1.5"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "gpu_memory_utilization" in r.stderr


def test_plan_limit_check_applies_rope_scaling_as_vllm_does(env, tmp_path, capsys):
    """max_position_embeddings 32768 with yarn x4 is a 131072-token model: 65536 is fine, 200000 is not."""
    from vllm_lab.plan import load_plan

    cfg = json.loads((Path(env["model"]) / "config.json").read_text())
    cfg.update(max_position_embeddings=32768,
               rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})  # fmt: skip
    (Path(env["model"]) / "config.json").write_text(json.dumps(cfg))
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump(plan_with(env, steps=[step_with(parameters={"MAX_MODEL_LEN": 65536})])))
    assert load_plan(ok).steps[0].parameters["MAX_MODEL_LEN"] == 65536
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(plan_with(env, steps=[step_with(parameters={"MAX_MODEL_LEN": 200000})])))
    err = _one_line_error(capsys, ["run", str(bad), "--dry-run"], "MAX_MODEL_LEN")
    assert "131072" in err and "yarn" in err
