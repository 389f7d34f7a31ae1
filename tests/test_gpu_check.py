"""scripts/gpu-check.sh in its fake mode (GPU_CHECK_FAKE=1): every step against the fake NVML, no torch.

The same script runs once on a GPU machine against real NVML (issue 15); here it must produce every output
the real run will: the inventory, both preflights, records with peak_gpu_mib, the timeline plot, the
stubborn child's release, the table; leave no process behind; and, with a bare python, say in one line per
step which packages are missing instead of crashing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

import psutil
import pytest
from conftest import ROOT

pytestmark = pytest.mark.fake
SCRIPT = ROOT / "scripts" / "gpu-check.sh"


def run_check(out: Path, python: str, timeout: float = 170, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_FAKE": "1", "GPU_CHECK_PYTHON": python, **env}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=out.parent)  # fmt: skip


def steps(out: Path) -> dict[str, dict]:
    return {s["step"]: s for s in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}


def holders_of(ledger: Path) -> list[int]:
    """Live processes started under this check's fake GPU (servers, holders, helpers)."""
    found = []
    for p in psutil.process_iter():
        try:
            if (
                p.environ().get("VLLM_LAB_FAKE_GPU_LEDGER") == str(ledger)
                and p.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(p.pid)
        except (psutil.Error, OSError):
            pass
    return found


def test_fake_mode_writes_every_result_and_leaves_nothing(tmp_path):
    out = tmp_path / "gpu-check-out"
    r = run_check(out, sys.executable)
    assert r.returncode == 0, r.stdout + r.stderr
    st = steps(out)
    assert [s for s, v in st.items() if v["status"] != "ok"] == [], st
    assert set(st) == {
        "env",
        "gpus",
        "preflight",
        "alloc",
        "stubborn",
        "table",
        "report",
        "pytest",
        "leftovers",
    }

    inv = json.loads((out / "gpus.json").read_text())
    assert (
        inv["available"] and inv["devices"][0]["name"] == "NVIDIA H200" and inv["devices"][0]["cc_int"] == 90
    )
    assert "NVIDIA H200" in (out / "gpus.txt").read_text()
    for name, shown in [("qwen3-8b-awq", "Qwen3-8B-AWQ"), ("qwen3-8b-fp16", "Qwen3-8B-fp16")]:
        assert (
            (out / f"preflight-{name}.txt").read_text().startswith(f"preflight: model {shown} on NVIDIA H200")
        )
        assert json.loads((out / f"preflight-{name}.json").read_text())

    recs = [json.loads(line) for line in (out / "run" / "trials.jsonl").read_text().splitlines()]
    launches = [r for r in recs if r["step"] == "launch"]
    assert len(launches) == 2 and all(r["outcome"] == "ready" for r in launches)
    for rec, mib in zip(launches, (2048, 8192), strict=True):
        assert rec["peak_gpu_mib"] == 600 + mib  # the fake H200's baseline plus what the child held
        assert len(rec["gpu_memory_timeline"]) >= 2 and rec["note"] is None
    assert (out / "run" / "plots" / "gpu_memory_timeline.png").stat().st_size > 1000
    assert (out / "run" / "report.md").is_file()

    table = json.loads((out / "nvml-vs-allocated.json").read_text())
    assert table["ok"] and all(c["ok"] for c in table["checks"]) and len(table["checks"]) >= 11
    by_case = {row["case"]: row for row in table["rows"]}
    stub = by_case["stubborn child (ignores SIGTERM)"]
    assert (
        stub["allocated_mib"] == 4096
        and stub["nvml_held_mib"] == 600 + 4096
        and stub["nvml_after_mib"] == 600
    )
    assert (
        stub["survivors"] == []
        and stub["held_through_sigterm"]
        and stub["released_after_s"] >= 7
        and stub["back_at_baseline"]
    )
    assert by_case["fake vLLM launch, KV budget 8192 MiB"]["nvml_delta_mib"] == 8192
    md = (out / "nvml-vs-allocated.md").read_text()
    assert "| stubborn child (ignores SIGTERM) | fake-ledger | 4096.0 |" in md and "FAIL" not in md
    assert "**all checks pass**" in (out / "summary.md").read_text()
    assert "skipped" in (out / "pytest-gpu.txt").read_text()  # tests/gpu: collected, skipped without a GPU
    assert holders_of(out / "fake-gpu") == []


def test_a_bare_python_gets_one_line_per_missing_package_and_what_the_site_folder_fills(tmp_path):
    import yaml

    bare = tmp_path / "bare"
    venv.EnvBuilder(with_pip=False).create(bare)  # no yaml, httpx, psutil, pandas, torch, pytest
    site = tmp_path / "site"  # GPU_CHECK_SITE holding only pyyaml: it fills that gap and no other
    site.mkdir()
    (site / "yaml").symlink_to(Path(yaml.__file__).parent)
    out = tmp_path / "gpu-check-out"
    r = run_check(out, str(bare / "bin" / "python"), timeout=60, GPU_CHECK_SITE=str(site))
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    assert (out / "site-fill.txt").read_text().split() == ["yaml"]
    st = steps(out)
    assert st["env"]["status"] == "ok" and st["gpus"]["status"] == "ok"  # fake NVML: nothing else needed
    assert st["preflight"]["status"] == "ok" and (out / "preflight-qwen3-8b-awq.json").is_file()
    assert json.loads((out / "gpus.json").read_text())["available"] is True
    for name in ("alloc", "stubborn", "report", "pytest"):
        assert st[name]["status"] == "skipped" and st[name]["detail"].startswith("missing python modules: ")
    deps = (out / "deps.txt").read_text().splitlines()
    assert (
        "alloc: needs python modules not importable here: httpx psutil (pip install them, or put them in GPU_CHECK_SITE)"
        in deps
    )
    assert not any(line.startswith("preflight") for line in deps)
    assert st["table"]["status"] == "failed"  # nothing was measured: the check cannot pass


# --- the parts, one by one ------------------------------------------------------------------------------


def test_ledger_nvml_counts_only_live_holders(tmp_path):
    from vllm_lab import gpu
    from vllm_lab.testing.fake_nvml import LedgerNvml

    fake = LedgerNvml(str(tmp_path / "gpu"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    zombie = subprocess.Popen(["true"])  # exits at once; not reaped until wait(): a zombie holds nothing
    deadline = time.monotonic() + 10
    while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.01)
    for pid, mib in ((os.getpid(), 1000), (dead.pid, 5000), (zombie.pid, 7000)):
        (tmp_path / "gpu" / f"{pid}.mib").write_text(str(mib))
    d = gpu.inventory(nvml=fake, env={}).devices[0]
    zombie.wait()
    assert (d.name, d.compute_capability, d.total_mib) == ("NVIDIA H200", "9.0", 143771)
    assert d.used_mib == 600 + 1000 and [(p.pid, p.used_mib) for p in d.processes] == [(os.getpid(), 1000)]
    assert gpu.used_mib([0], nvml=LedgerNvml(str(tmp_path / "gpu"))) == {0: 1600}  # another reader, same GPU


def _measured(out: Path, *, base: float, peak: float, after: float, allocated: float) -> None:
    d = out / "alloc-2048"
    d.mkdir(parents=True)
    log = d / "server.log"
    log.write_text(
        f'INFO GPU_ALLOC {{"pid": 1, "mib": {allocated}, "reserved_mib": {allocated}, "via": "torch"}}\n'
    )
    rec = {"outcome": "ready", "kv_cache_memory_bytes": 2048 << 20, "peak_gpu_mib": peak, "log_path": str(log),
           "gpu_memory_timeline": [[0, base], [1, peak]], "note": None}  # fmt: skip
    (d / "record.json").write_text(json.dumps(rec))
    (d / "before.json").write_text(json.dumps({"used_mib": {"0": base}}))
    (d / "after.json").write_text(json.dumps({"used_mib": {"0": after}}))


def test_the_table_fails_when_nvml_misses_the_allocation_or_it_is_not_freed(tmp_path):
    from vllm_lab.testing.gpu_alloc import build_table

    _measured(tmp_path / "good", base=500, peak=500 + 2048 + 480, after=510, allocated=2048)
    good = build_table(tmp_path / "good")
    assert good["ok"] and good["rows"][0]["delta_minus_allocated_mib"] == 480  # a CUDA context's worth

    _measured(tmp_path / "bad", base=500, peak=700, after=500 + 2048, allocated=2048)
    bad = build_table(tmp_path / "bad")
    failed = [c["check"] for c in bad["checks"] if not c["ok"]]
    assert not bad["ok"] and len(failed) == 2
    assert "NVML delta within" in failed[0] and "back at the baseline" in failed[1]
    assert "- FAIL:" in (tmp_path / "bad" / "nvml-vs-allocated.md").read_text()


def test_the_gpu_tests_pass_on_stand_ins_for_pynvml_and_torch(tmp_path):
    """tests/gpu as the GPU machine runs them (import pynvml, torch allocations), on one fake H200."""
    from vllm_lab.testing.gpu_alloc import write_stub_modules

    env = {
        **os.environ,
        **write_stub_modules(tmp_path / "mods", tmp_path / "ledger"),
        "CUDA_VISIBLE_DEVICES": "0",
    }
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "mods"), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env.pop("VLLM_LAB_FAKE_GPU_LEDGER", None)
    r = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "gpu"), "-q", "-p", "no:cacheprovider"],
                       env=env, capture_output=True, text=True, timeout=170, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0 and "5 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    from vllm_lab.testing.fake_nvml import LedgerNvml

    assert LedgerNvml(str(tmp_path / "ledger")).held() == {}  # every holder ended
