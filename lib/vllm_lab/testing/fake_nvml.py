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


# --- one simulated GPU shared by processes ---------------------------------------------------------------

LEDGER_ENV = "VLLM_LAB_FAKE_GPU_LEDGER"  # a folder: device.json and one <pid>.mib file per holding process
H200 = {"name": "NVIDIA H200", "uuid": "GPU-fake0200-0000", "cc": (9, 0), "total": 143771, "baseline": 600}


def _pid_alive(pid: int) -> bool:
    """A zombie holds no GPU memory: the driver frees it when the process exits, before it is reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class LedgerNvml(FakeNvml):
    """One simulated GPU whose used memory is its baseline plus what live processes hold.

    Holders (testing/gpu_alloc.py, in place of a torch allocation) write `<pid>.mib` into the ledger folder;
    a dead process's file counts for nothing. Being a folder, it is one GPU for every process that reads it:
    the CLI's sampler and release wait see the fake vLLM's child allocate and, once killed, free.
    """

    def __init__(self, ledger: str, device: dict | None = None):
        import json
        from pathlib import Path

        self.ledger = Path(ledger)
        self.ledger.mkdir(parents=True, exist_ok=True)
        spec = self.ledger / "device.json"
        if device is not None or not spec.is_file():
            spec.write_text(json.dumps(device or H200))
        dev = json.loads(spec.read_text())
        dev["cc"] = tuple(dev["cc"])
        super().__init__([{**dev, "used": [dev["baseline"]]}])

    def held(self) -> dict[int, float]:
        out = {}
        for f in self.ledger.glob("*.mib"):
            try:
                pid, mib = int(f.stem), float(f.read_text())
            except (OSError, ValueError):
                continue
            if _pid_alive(pid):
                out[pid] = mib
        return out

    def nvmlDeviceGetMemoryInfo(self, h):
        d = self.devices[h]
        self.reads[h] += 1
        used = d["baseline"] + sum(self.held().values())
        return SimpleNamespace(total=d["total"] * MIB, used=used * MIB, free=(d["total"] - used) * MIB)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=p, usedGpuMemory=m * MIB) for p, m in sorted(self.held().items())]
