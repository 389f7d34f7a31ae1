"""A fake pynvml for tests: the functions gpu.py calls, over a list of simulated GPUs.

Inject it with `gpu.set_nvml(FakeNvml(...))` (process-wide) or `nvml=` per call. `used` per device is a list
of MiB readings, one per nvmlDeviceGetMemoryInfo call (the last repeats); `reads[i]` counts those calls, so a
test can assert that a device was never looked at.
"""

from __future__ import annotations

from types import SimpleNamespace

MIB = 1 << 20


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class FakeNvml:
    NVMLError = NVMLError

    def __init__(self, devices: list[dict], fail_init: Exception | None = None):
        self.devices = devices
        self.fail_init = fail_init
        self.inits = 0
        self.shutdowns = 0
        self.reads = [0] * len(devices)

    def nvmlInit(self):
        if self.fail_init is not None:
            raise self.fail_init
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self):
        return b"550.54.14"

    def nvmlSystemGetCudaDriverVersion(self):
        return 12040

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= i < len(self.devices):
            raise NVMLError(f"invalid index {i}")
        return i

    def nvmlDeviceGetName(self, h):
        return self.devices[h]["name"].encode()  # old pynvml returns bytes

    def nvmlDeviceGetUUID(self, h):
        return self.devices[h]["uuid"]

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return self.devices[h]["cc"]

    def nvmlDeviceGetMemoryInfo(self, h):
        d = self.devices[h]
        seq = d["used"]
        used = seq[min(self.reads[h], len(seq) - 1)]
        self.reads[h] += 1
        total = d["total"]
        return SimpleNamespace(total=total * MIB, used=used * MIB, free=(total - used) * MIB)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=p, usedGpuMemory=m * MIB if m is not None else None)
                for p, m in self.devices[h].get("procs", [])]  # fmt: skip

    def nvmlSystemGetProcessName(self, pid):
        return b"python3"


def two_gpus(used0=(1000,), used1=(300,)) -> FakeNvml:
    """A Tesla P40 (index 0) and an A100 (index 1)."""
    return FakeNvml([
        {"name": "Tesla P40", "uuid": "GPU-aaaa1111-2222", "cc": (6, 1), "total": 24576, "used": list(used0),
         "procs": [(4242, 900), (4343, None)]},
        {"name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-bbbb3333-4444", "cc": (8, 0), "total": 81920,
         "used": list(used1)},
    ])  # fmt: skip
