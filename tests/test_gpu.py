"""gpu.py through a fake NVML module: inventory, CUDA_VISIBLE_DEVICES, sampler, wait, profiles, no-GPU path."""

from __future__ import annotations

import json
import time

import pytest
from vllm_lab import gpu
from vllm_lab.cli import main
from vllm_lab.spec import SpecError
from vllm_lab.testing.fake_nvml import FakeNvml, NVMLError_LibraryNotFound, two_gpus

pytestmark = pytest.mark.unit


def test_inventory_reads_devices_processes_and_versions():
    fake = two_gpus()
    inv = gpu.inventory(nvml=fake, env={})
    assert inv.available and inv.reason is None
    assert inv.driver_version == "550.54.14" and inv.cuda_version == "12.4"
    p40, a100 = inv.devices
    assert (p40.name, p40.compute_capability, p40.cc_int) == ("Tesla P40", "6.1", 61)
    assert (p40.total_mib, p40.used_mib, p40.free_mib) == (24576, 1000, 23576)
    assert [(p.pid, p.used_mib, p.name) for p in p40.processes] == [
        (4242, 900.0, "python3"),
        (4343, None, "python3"),
    ]
    assert a100.cc_int == 80 and a100.processes == []
    assert inv.visible_indices is None and [d.index for d in inv.visible_devices] == [0, 1]
    assert fake.inits == 1 and fake.shutdowns == 1  # the session is closed again
    d = inv.to_dict()
    assert d["devices"][0]["cc_int"] == 61 and "Tesla P40" in inv.describe()


@pytest.mark.parametrize(
    ("cvd", "expected"),
    [
        (None, None),  # unset: every GPU
        ("", []),  # set but empty: none
        ("1", [1]),
        ("1,0", [1, 0]),  # CUDA's order, not NVML's
        ("GPU-bbbb3333-4444", [1]),
        ("bbbb", [1]),  # a unique UUID prefix, "GPU-" optional
        ("0,7,1", [0]),  # the list ends at the first invalid entry, like the CUDA runtime
        ("0,0", [0]),  # a repeat ends it too
        ("GPU-ffff", []),
    ],
)
def test_cuda_visible_devices_maps_to_physical_indices(cvd, expected):
    inv = gpu.inventory(nvml=two_gpus(), env={} if cvd is None else {"CUDA_VISIBLE_DEVICES": cvd})
    assert inv.visible_indices == expected
    assert gpu.visible_physical_indices(
        nvml=two_gpus(), env={} if cvd is None else {"CUDA_VISIBLE_DEVICES": cvd}
    ) == ([0, 1] if expected is None else expected)


def test_no_driver_says_so_plainly_and_everything_keeps_working():
    fake = FakeNvml([], fail_init=NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    inv = gpu.inventory(nvml=fake, env={"CUDA_VISIBLE_DEVICES": "0"})
    assert inv.available is False
    assert inv.reason.startswith("no NVIDIA GPU") and "libnvidia-ml" in inv.reason
    assert inv.devices == [] and inv.visible_devices == []
    assert "no NVIDIA GPU" in inv.describe()
    with gpu.MemorySampler(nvml=fake, interval_s=0.01) as s:
        time.sleep(0.03)
    assert s.timeline == [] and s.peak_mib is None and s.available is False and "no NVIDIA GPU" in s.reason
    w = gpu.wait_for_memory_free([0], 1000, nvml=fake)
    assert w.freed and bool(w) and "nothing to wait for" in w.reason
    assert gpu.used_mib(nvml=fake) == {}


def test_real_pynvml_here_is_consistent():
    inv = gpu.inventory()  # this machine: a GPU or a plain reason, never an exception
    assert inv.available == bool(inv.devices)
    assert inv.available or inv.reason.startswith("no NVIDIA GPU")


def test_sampler_records_a_timeline_and_the_peak():
    fake = two_gpus(used0=[1000, 5000, 7000, 3000, 2000], used1=[300, 300, 400, 300])
    with gpu.MemorySampler(devices=[0, 1], interval_s=0.005, nvml=fake) as s:
        deadline = time.monotonic() + 5
        while len(s.timeline) < 6 and time.monotonic() < deadline:
            time.sleep(0.005)
    assert len(s.timeline) >= 6
    ts = [t for t, _ in s.timeline]
    assert ts == sorted(ts) and ts[0] >= 0
    assert all(set(r) == {0, 1} for _, r in s.timeline)
    assert s.peak_by_device == {0: 7000.0, 1: 400.0}
    assert s.peak_mib == 7400.0  # the largest total (7000 + 400 were read in the same sample)
    assert s.timeline_records()[0] == {"t": ts[0], "used_mib": {"0": 1000.0, "1": 300.0}}
    assert fake.shutdowns == 1 and not s.available


def test_sampler_start_stop_and_one_device():
    fake = two_gpus(used0=[1200])
    s = gpu.MemorySampler(devices=[0], interval_s=10, nvml=fake).start()
    s.stop()  # no wait: start and stop each take a sample
    assert [r for _, r in s.timeline] == [{0: 1200.0}, {0: 1200.0}]
    assert s.peak_mib == 1200.0
    with pytest.raises(SpecError, match="interval_s"):
        gpu.MemorySampler(interval_s=0)


def test_wait_for_memory_free_returns_when_back_at_baseline():
    fake = two_gpus(used0=[9000, 6000, 1400, 1200])
    clock = {"t": 0.0}
    w = gpu.wait_for_memory_free([0], baseline_used_mib=1000, tolerance_mib=512, timeout_s=30, nvml=fake,
                                 clock=lambda: clock["t"], sleep=lambda s: clock.__setitem__("t", clock["t"] + s))  # fmt: skip
    assert w.freed and w.used_mib == {0: 1400.0} and w.waited_s == 1.0  # the third reading, two 0.5 s sleeps


def test_wait_for_memory_free_times_out_naming_the_device():
    fake = two_gpus(used0=[9000], used1=[300])
    clock = {"t": 0.0}
    w = gpu.wait_for_memory_free(None, baseline_used_mib={0: 1000, 1: 300}, tolerance_mib=256, timeout_s=2,
                                 nvml=fake, clock=lambda: clock["t"],
                                 sleep=lambda s: clock.__setitem__("t", clock["t"] + s))  # fmt: skip
    assert not w.freed and not bool(w)
    assert w.waited_s >= 2 and "GPU 0 still uses 9000 MiB" in w.reason


def test_set_nvml_injects_process_wide_and_cli_gpus_json(capsys):
    previous = gpu.set_nvml(two_gpus())
    try:
        assert main(["gpus", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["available"] is True and [d["name"] for d in out["devices"]] == [
            "Tesla P40",
            "NVIDIA A100-SXM4-80GB",
        ]
        assert main(["gpus"]) == 0
        assert "cc 6.1" in capsys.readouterr().out
        gpu.set_nvml(FakeNvml([], fail_init=NVMLError_LibraryNotFound("nope")))
        assert main(["gpus"]) == 0
        assert "no NVIDIA GPU" in capsys.readouterr().out
    finally:
        gpu.set_nvml(previous)


# --------------------------------------------------------------------------------------------- profiles

EXPECTED_CC = {
    "p40": "6.1", "p100": "6.0", "v100": "7.0", "v100-16gb": "7.0", "t4": "7.5", "a10": "8.6", "l4": "8.9",
    "rtx3090": "8.6", "rtx4090": "8.9", "a100-40gb": "8.0", "a100-80gb": "8.0", "h100": "9.0",
}  # fmt: skip


@pytest.mark.parametrize(("alias", "cc"), sorted(EXPECTED_CC.items()))
def test_every_profile_loads_with_its_compute_capability(alias, cc):
    p = gpu.load_gpu_profile(alias)
    assert p.compute_capability == cc
    assert p.bf16 == (float(cc) >= 8.0)
    assert p.total_mib > 10000 and p.source


def test_profile_lookup_is_case_and_punctuation_insensitive():
    assert gpu.load_gpu_profile("Tesla-P40").name == "Tesla P40"
    assert gpu.load_gpu_profile("TESLA P40").total_mib == 24576
    assert gpu.load_gpu_profile("NVIDIA A100-SXM4-80GB").name == "NVIDIA A100 80GB"  # an NVML name
    assert gpu.load_gpu_profile("v100").memory_gb == 32
    assert gpu.load_gpu_profile("p40").memory_gib == 24.0


def test_unknown_profile_lists_known_names():
    with pytest.raises(SpecError) as e:
        gpu.load_gpu_profile("gtx-1080")
    msg = str(e.value)
    assert msg.startswith("gpu: 'gtx-1080' is not a known GPU profile") and "p40" in msg and "h100" in msg


def test_profile_from_a_live_device_keeps_nvmls_memory():
    inv = gpu.inventory(nvml=two_gpus(), env={})
    p = gpu.profile_from_device(inv.devices[0])
    assert p.name == "Tesla P40" and p.total_mib == 24576 and p.cc_int == 61
    odd = gpu.GpuDevice(index=0, name="NVIDIA Mystery", uuid="", compute_capability="12.0", total_mib=97887,
                        free_mib=0, used_mib=0)  # fmt: skip
    q = gpu.profile_from_device(odd)
    assert q.name == "NVIDIA Mystery" and q.cc_int == 120 and q.bf16
