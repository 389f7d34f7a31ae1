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
import venv
from pathlib import Path

import psutil
import pytest
from conftest import ROOT

pytestmark = pytest.mark.fake
SCRIPT = ROOT / "scripts" / "gpu-check.sh"


def run_check(out: Path, python: str, timeout: float = 170) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_FAKE": "1", "GPU_CHECK_PYTHON": python}
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
    assert stub["survivors"] == [] and stub["needed_kill"] and stub["back_at_baseline"]
    assert by_case["fake vLLM launch, KV budget 8192 MiB"]["nvml_delta_mib"] == 8192
    md = (out / "nvml-vs-allocated.md").read_text()
    assert "| stubborn child (ignores SIGTERM) | fake-ledger | 4096.0 |" in md and "FAIL" not in md
    assert "**all checks pass**" in (out / "summary.md").read_text()
    assert "skipped" in (out / "pytest-gpu.txt").read_text()  # tests/gpu: collected, skipped without a GPU
    assert holders_of(out / "fake-gpu") == []


def test_a_bare_python_gets_one_line_per_missing_package_and_no_traceback(tmp_path):
    bare = tmp_path / "bare"
    venv.EnvBuilder(with_pip=False).create(bare)  # no yaml, httpx, psutil, pandas, torch, pytest
    out = tmp_path / "gpu-check-out"
    r = run_check(out, str(bare / "bin" / "python"), timeout=60)
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    st = steps(out)
    assert st["env"]["status"] == "ok" and st["gpus"]["status"] == "ok"  # fake NVML: nothing else needed
    assert json.loads((out / "gpus.json").read_text())["available"] is True
    for name in ("preflight", "alloc", "stubborn", "report", "pytest"):
        assert st[name]["status"] == "skipped" and st[name]["detail"].startswith("missing python modules: ")
    deps = (out / "deps.txt").read_text().splitlines()
    assert (
        "preflight: needs python modules not importable here: yaml (pip install them, or GPU_CHECK_SITE=DIR)"
        in deps
    )
    assert any(
        line.startswith("alloc: needs python modules not importable here: httpx psutil") for line in deps
    )
    assert st["table"]["status"] == "failed"  # nothing was measured: the check cannot pass
