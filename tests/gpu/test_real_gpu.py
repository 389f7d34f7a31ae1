"""The GPU code against real NVML and real torch allocations (marker gpu; scripts/gpu-check.sh runs these).

Skipped, with NVML's own reason, where NVML finds no GPU; the torch tests also need torch with CUDA. The
memory is always held by a child process (testing/gpu_alloc.py), so this process opens no CUDA context and
each test's baseline is the GPU as the test found it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import FAKE_CMD, fake_trial
from vllm_lab import gpu, probe
from vllm_lab.testing import gpu_alloc

os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # children's cuda:0 is NVML's first visible GPU
os.environ.pop("VLLM_LAB_FAKE_GPU_LEDGER", None)  # real NVML and real torch here, never the fake GPU

INV = gpu.inventory()
MIB = 1 << 20
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not INV.available, reason=f"needs an NVIDIA GPU: {INV.reason}"),
]


def _torch_facts() -> dict:
    """torch's view of cuda:0, from a child (no CUDA context in this process)."""
    code = (
        "import json, torch\n"
        "ok = torch.cuda.is_available()\n"
        "p = torch.cuda.get_device_properties(0) if ok else None\n"
        "print(json.dumps({'cuda': ok, 'torch': torch.__version__, 'name': p.name if p else None,"
        " 'cc': list(torch.cuda.get_device_capability(0)) if ok else None,"
        " 'total_mib': p.total_memory / 2**20 if p else None}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return {"cuda": False, "why": (r.stderr.strip().splitlines() or ["torch failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


TORCH = _torch_facts() if INV.available else {"cuda": False, "why": INV.reason}
needs_torch = pytest.mark.skipif(
    not TORCH.get("cuda"), reason=f"needs torch with CUDA: {TORCH.get('why', 'torch sees no CUDA device')}"
)


@pytest.fixture
def device() -> int:
    return gpu.visible_physical_indices()[0]


def test_inventory_reports_a_plausible_gpu(device):
    d = next(d for d in INV.devices if d.index == device)
    assert d.name and d.uuid.startswith(("GPU-", "MIG-"))
    assert d.cc_int >= 30 and d.total_mib > 1024
    assert 0 <= d.used_mib <= d.total_mib and abs(d.used_mib + d.free_mib - d.total_mib) < 0.01 * d.total_mib
    assert INV.driver_version and INV.cuda_version
    assert gpu.profile_from_device(d).total_mib == d.total_mib


@needs_torch
def test_inventory_agrees_with_torch(device):
    d = next(d for d in INV.devices if d.index == device)
    assert TORCH["name"] == d.name
    assert f"{TORCH['cc'][0]}.{TORCH['cc'][1]}" == d.compute_capability
    assert (
        abs(TORCH["total_mib"] - d.total_mib) <= 0.03 * d.total_mib
    )  # torch's total leaves out reserved memory


@needs_torch
def test_sampler_sees_a_holder_and_the_wait_sees_it_go(device):
    base = gpu.used_mib([device])[device]
    proc, info = gpu_alloc.spawn_holder(1024)
    try:
        assert info["via"] == "torch" and info["mib"] == 1024
        with gpu.MemorySampler([device], interval_s=0.1) as s:
            pass
        assert s.peak_mib >= base + 0.95 * 1024
    finally:
        proc.kill()
        proc.wait()
    w = gpu.wait_for_memory_free([device], {device: base}, timeout_s=60)
    assert w.freed, w.reason


@needs_torch
def test_stopping_a_stubborn_tree_frees_its_gpu_memory(tmp_path, fake_model):
    res = gpu_alloc.stubborn_check(str(fake_model), 2048, tmp_path / "run", FAKE_CMD)
    assert res["outcome"] == "ready", res
    assert res["nvml_held_mib"] >= res["nvml_baseline_mib"] + 0.95 * 2048
    assert res["survivors"] == [] and res["holders_alive_after"] == [] and res["held_through_sigterm"]
    assert res["gpu_note"] is None  # the launcher's release wait saw the memory come back
    assert res["nvml_after_mib"] <= res["nvml_baseline_mib"] + gpu_alloc.RELEASE_TOLERANCE_MIB


@needs_torch
def test_a_launch_records_peak_and_timeline_from_nvml(tmp_path, fake_model, device):
    base = gpu.used_mib([device])[device]
    trial = fake_trial(fake_model, kv_cache_memory_bytes=2048 * MIB, startup_timeout_s=180,
                       env={"FAKE_VLLM_GPU_ALLOC": "1", "FAKE_VLLM_START_DELAY": "1"})  # fmt: skip
    rec = probe.run_trial(trial, tmp_path / "run")
    assert rec["outcome"] == "ready", rec
    assert rec["peak_gpu_mib"] >= base + 0.95 * 2048
    assert len(rec["gpu_memory_timeline"]) >= 2 and rec["gpu_name"] == INV.devices[device].name
    assert "GPU memory not released" not in (rec["note"] or "")
    # The plot, where this python can draw it (the GPU machine may lack pandas; gpu-check.sh says so).
    if all(importlib.util.find_spec(m) for m in ("pandas", "seaborn", "matplotlib")):
        import pandas as pd
        from vllm_lab import plots, record

        rows = record.read_records(tmp_path / "run", keep_torn_aside=False).rows
        png = plots.plot_timeline(pd.DataFrame(rows), tmp_path / "timeline.png")
        assert png is not None and png.stat().st_size > 1000
