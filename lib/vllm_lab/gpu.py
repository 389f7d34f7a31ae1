"""NVML inventory, a GPU memory sampler, and the GPU profiles under params/gpus.

The only module that imports pynvml, and only lazily: where there is no NVIDIA driver (`nvmlInit()` raises
`NVMLError_LibraryNotFound`) `inventory()` returns `available=False` with a plain reason, the sampler records
nothing (peak None) and `wait_for_memory_free` has nothing to wait for. Every function takes `nvml=` (a module
or any object with the same functions) so tests drive the GPU code paths with a fake; `set_nvml()` injects one
process-wide.

Indices are NVML's (PCI bus order). CUDA numbers devices fastest-first unless CUDA_DEVICE_ORDER=PCI_BUS_ID,
so set that when you map CUDA_VISIBLE_DEVICES indices onto physical GPUs (vLLM's docs recommend it too).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vllm_lab.errors import SpecError
from vllm_lab.paths import params_dir

MIB = 1 << 20
_NVML_OVERRIDE: Any = None


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here; the message says why in one line ("no NVIDIA GPU: ...")."""


def set_nvml(module: Any) -> Any:
    """Use `module` instead of pynvml everywhere (None restores pynvml); returns the previous override."""
    global _NVML_OVERRIDE
    previous, _NVML_OVERRIDE = _NVML_OVERRIDE, module
    return previous


def _load_nvml(nvml: Any = None) -> Any:
    if nvml is not None:
        return nvml
    if _NVML_OVERRIDE is not None:
        return _NVML_OVERRIDE
    try:
        import pynvml
    except ImportError as e:  # nvidia-ml-py is a dependency, but say it plainly if it is missing
        raise NvmlUnavailable(f"no NVIDIA GPU: pynvml (nvidia-ml-py) is not importable ({e})") from e
    return pynvml


def no_gpu_reason(err: BaseException) -> str:
    name = type(err).__name__
    if "LibraryNotFound" in name:
        return "no NVIDIA GPU: the NVIDIA driver library (libnvidia-ml.so) was not found on this machine"
    if "DriverNotLoaded" in name:
        return "no NVIDIA GPU: the NVIDIA kernel driver is not loaded"
    if "NoPermission" in name:
        return "no NVIDIA GPU usable: no permission to talk to the NVIDIA driver"
    return f"no NVIDIA GPU usable: NVML failed to start ({name}: {err})"


@contextmanager
def nvml_session(nvml: Any = None) -> Iterator[Any]:
    """nvmlInit ... nvmlShutdown; raises NvmlUnavailable (one plain line) where there is no driver."""
    mod = _load_nvml(nvml)
    try:
        mod.nvmlInit()
    except Exception as e:
        raise NvmlUnavailable(no_gpu_reason(e)) from e
    try:
        yield mod
    finally:
        with suppress(Exception):
            mod.nvmlShutdown()


def _s(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _mib(nbytes: Any) -> float | None:
    return None if nbytes is None else round(float(nbytes) / MIB, 1)


# --------------------------------------------------------------------------------------------- inventory


@dataclass
class GpuProcess:
    pid: int
    used_mib: float | None  # None where the driver does not say (containers, no permission)
    name: str | None = None


@dataclass
class GpuDevice:
    index: int  # NVML (physical) index
    name: str
    uuid: str
    compute_capability: str  # "6.1"
    total_mib: float
    free_mib: float
    used_mib: float
    processes: list[GpuProcess] = field(default_factory=list)

    @property
    def cc_int(self) -> int:
        """vLLM's integer form: "6.1" -> 61."""
        major, _, minor = self.compute_capability.partition(".")
        return int(major) * 10 + int(minor or 0)


@dataclass
class Inventory:
    available: bool
    reason: str | None = None  # why not, when available is False
    driver_version: str | None = None
    cuda_version: str | None = None  # the highest CUDA the driver supports, e.g. "12.4"
    devices: list[GpuDevice] = field(default_factory=list)
    cuda_visible_devices: str | None = None  # the raw variable, None when unset
    visible_indices: list[int] | None = None  # physical indices it selects; None = all

    @property
    def visible_devices(self) -> list[GpuDevice]:
        if self.visible_indices is None:
            return list(self.devices)
        by_index = {d.index: d for d in self.devices}
        return [by_index[i] for i in self.visible_indices if i in by_index]

    def to_dict(self) -> dict:
        d = asdict(self)
        for dev, src in zip(d["devices"], self.devices, strict=True):
            dev["cc_int"] = src.cc_int
        return d

    def describe(self) -> str:
        if not self.available:
            return f"{self.reason}. Nothing to inventory; pass --gpu NAME to predict for a card (vllm-lab gpus lists none here)."
        lines = [f"NVIDIA driver {self.driver_version}, CUDA {self.cuda_version}, {len(self.devices)} GPU(s)"]
        if self.cuda_visible_devices is not None:
            lines.append(
                f"CUDA_VISIBLE_DEVICES={self.cuda_visible_devices!r} -> physical {self.visible_indices}"
            )
        for d in self.devices:
            lines.append(
                f"  [{d.index}] {d.name}  cc {d.compute_capability}  {d.used_mib:.0f}/{d.total_mib:.0f} MiB used, "
                f"{d.free_mib:.0f} MiB free  {d.uuid}"
            )
            for p in d.processes:
                used = "?" if p.used_mib is None else f"{p.used_mib:.0f}"
                lines.append(f"      pid {p.pid} {p.name or ''} {used} MiB")
        return "\n".join(lines)


def _cuda_version(mod: Any) -> str | None:
    for fn in ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"):
        f = getattr(mod, fn, None)
        if f is None:
            continue
        try:
            v = int(f())
        except Exception:
            continue
        return f"{v // 1000}.{(v % 1000) // 10}"
    return None


def _process_name(mod: Any, pid: int) -> str | None:
    try:
        return _s(mod.nvmlSystemGetProcessName(pid))
    except Exception:
        pass
    try:
        import psutil

        return psutil.Process(pid).name()
    except Exception:
        return None


def _processes(mod: Any, handle: Any) -> list[GpuProcess]:
    found: dict[int, GpuProcess] = {}
    for fn in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        f = getattr(mod, fn, None)
        if f is None:
            continue
        try:
            procs = f(handle) or []
        except Exception:
            continue
        for p in procs:
            pid = int(p.pid)
            used = getattr(p, "usedGpuMemory", None)
            if pid not in found:
                found[pid] = GpuProcess(pid=pid, used_mib=_mib(used), name=_process_name(mod, pid))
    return sorted(found.values(), key=lambda p: p.pid)


def _device(mod: Any, index: int) -> GpuDevice:
    h = mod.nvmlDeviceGetHandleByIndex(index)
    mem = mod.nvmlDeviceGetMemoryInfo(h)
    try:
        major, minor = mod.nvmlDeviceGetCudaComputeCapability(h)
        cc = f"{int(major)}.{int(minor)}"
    except Exception:
        cc = "0.0"
    try:
        uuid = _s(mod.nvmlDeviceGetUUID(h))
    except Exception:
        uuid = ""
    return GpuDevice(
        index=index, name=_s(mod.nvmlDeviceGetName(h)), uuid=uuid, compute_capability=cc,
        total_mib=_mib(mem.total) or 0.0, free_mib=_mib(mem.free) or 0.0, used_mib=_mib(mem.used) or 0.0,
        processes=_processes(mod, h),
    )  # fmt: skip


def parse_cuda_visible_devices(value: str | None, devices: list[GpuDevice]) -> list[int] | None:
    """Physical indices that CUDA_VISIBLE_DEVICES selects, in CUDA's order; None when it is unset (all).

    Entries are integer indices or GPU UUIDs (a unique prefix is enough, "GPU-" optional). Like the CUDA
    runtime, the list ends at the first entry that names no device (or repeats one); "" selects none.
    """
    if value is None:
        return None
    out: list[int] = []
    for raw in value.split(","):
        tok = raw.strip()
        if not tok:
            break
        idx: int | None = None
        if tok.lstrip("-").isdigit():
            i = int(tok)
            if 0 <= i < len(devices):
                idx = devices[i].index
        else:
            want = tok.lower()
            if not want.startswith(("gpu-", "mig-")):
                want = "gpu-" + want
            matches = [d.index for d in devices if d.uuid.lower().startswith(want)]
            if len(matches) == 1:
                idx = matches[0]
        if idx is None or idx in out:
            break
        out.append(idx)
    return out


def inventory(nvml: Any = None, env: Mapping[str, str] | None = None) -> Inventory:
    """Every NVIDIA GPU NVML sees: name, compute capability, memory, processes; never raises for 'no GPU'."""
    env = os.environ if env is None else env
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    try:
        with nvml_session(nvml) as mod:
            driver = _s(mod.nvmlSystemGetDriverVersion())
            cuda = _cuda_version(mod)
            devices = [_device(mod, i) for i in range(int(mod.nvmlDeviceGetCount()))]
    except NvmlUnavailable as e:
        return Inventory(available=False, reason=str(e), cuda_visible_devices=cvd)
    if not devices:
        return Inventory(available=False, reason="no NVIDIA GPU: the driver is loaded but reports no devices",
                         driver_version=driver, cuda_version=cuda, cuda_visible_devices=cvd)  # fmt: skip
    return Inventory(
        available=True, driver_version=driver, cuda_version=cuda, devices=devices, cuda_visible_devices=cvd,
        visible_indices=parse_cuda_visible_devices(cvd, devices),
    )  # fmt: skip


def visible_physical_indices(nvml: Any = None, env: Mapping[str, str] | None = None) -> list[int]:
    """The physical GPUs a process started with this environment would use ([] where there is no GPU)."""
    inv = inventory(nvml=nvml, env=env)
    return [d.index for d in inv.visible_devices] if inv.available else []


def used_mib(devices: list[int] | None = None, nvml: Any = None) -> dict[int, float]:
    """Used MiB per device right now ({} where there is no GPU)."""
    try:
        with nvml_session(nvml) as mod:
            idx = list(range(int(mod.nvmlDeviceGetCount()))) if devices is None else list(devices)
            return {
                i: _mib(mod.nvmlDeviceGetMemoryInfo(mod.nvmlDeviceGetHandleByIndex(i)).used) or 0.0
                for i in idx
            }
    except NvmlUnavailable:
        return {}


# --------------------------------------------------------------------------------------------- sampler


class MemorySampler:
    """Records the used MiB of the given devices every `interval_s` on a background thread.

    `timeline` is a list of (t_seconds_since_start, {index: used_mib}); `peak_mib` the largest total over
    the sampled devices (None when nothing was recorded, e.g. no GPU). Use as a context manager or
    start()/stop(); stop() takes one last sample so even a short run has a reading.
    """

    def __init__(
        self, devices: list[int] | None = None, interval_s: float = 0.5, nvml: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        if interval_s <= 0:
            raise SpecError(f"interval_s: {interval_s!r} must be > 0 seconds, e.g. 0.5")
        self.devices = None if devices is None else list(devices)
        self.interval_s = float(interval_s)
        self.timeline: list[tuple[float, dict[int, float]]] = []
        self.available = False
        self.reason: str | None = None
        self.errors = 0
        self._nvml = nvml
        self._clock = clock
        self._mod: Any = None
        self._handles: dict[int, Any] = {}
        self._t0 = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> MemorySampler:
        if self._thread is not None:
            return self
        self._t0 = self._clock()
        try:
            mod = _load_nvml(self._nvml)
            mod.nvmlInit()
        except NvmlUnavailable as e:
            self.reason = str(e)
            return self
        except Exception as e:
            self.reason = no_gpu_reason(e)
            return self
        try:
            idx = list(range(int(mod.nvmlDeviceGetCount()))) if self.devices is None else self.devices
            self._handles = {i: mod.nvmlDeviceGetHandleByIndex(i) for i in idx}
        except Exception as e:
            self.reason = f"cannot open the GPUs to sample ({type(e).__name__}: {e})"
            with suppress(Exception):
                mod.nvmlShutdown()
            return self
        self._mod, self.available, self.devices = mod, True, list(self._handles)
        self.sample_once()
        self._thread = threading.Thread(target=self._run, name="vllm-lab-gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_once()

    def sample_once(self) -> dict[int, float] | None:
        if not self.available:
            return None
        try:
            reading = {
                i: _mib(self._mod.nvmlDeviceGetMemoryInfo(h).used) or 0.0 for i, h in self._handles.items()
            }
        except Exception:
            self.errors += 1
            return None
        with self._lock:
            self.timeline.append((round(self._clock() - self._t0, 3), reading))
        return reading

    def stop(self) -> MemorySampler:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=max(5.0, 4 * self.interval_s))
            self._thread = None
            self.sample_once()
        if self._mod is not None:
            with suppress(Exception):
                self._mod.nvmlShutdown()
            self._mod = None
            self.available = False
        return self

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def peak_mib(self) -> float | None:
        with self._lock:
            totals = [sum(r.values()) for _, r in self.timeline if r]
        return max(totals) if totals else None

    @property
    def peak_by_device(self) -> dict[int, float]:
        out: dict[int, float] = {}
        with self._lock:
            for _, r in self.timeline:
                for i, v in r.items():
                    out[i] = max(out.get(i, v), v)
        return out

    def timeline_records(self) -> list[dict]:
        """JSON-friendly timeline: [{"t": s, "used_mib": {"0": mib}}] (for the record's gpu_memory_timeline)."""
        with self._lock:
            return [{"t": t, "used_mib": {str(i): v for i, v in r.items()}} for t, r in self.timeline]


@dataclass
class MemoryWait:
    freed: bool
    waited_s: float
    used_mib: dict[int, float]
    reason: str

    def __bool__(self) -> bool:
        return self.freed


def wait_for_memory_free(
    devices: list[int] | None,
    baseline_used_mib: float | Mapping[int, float],
    tolerance_mib: float = 512.0,
    timeout_s: float = 120.0,
    *,
    interval_s: float = 0.5,
    nvml: Any = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> MemoryWait:
    """Wait until every device is back at (baseline + tolerance) used MiB, e.g. after stopping a server.

    True-ish result when freed (or when there is no GPU: nothing to wait for); False-ish after timeout_s,
    with the reason naming the device that still holds memory.
    """
    t0 = clock()
    try:
        with nvml_session(nvml) as mod:
            idx = list(range(int(mod.nvmlDeviceGetCount()))) if devices is None else list(devices)
            handles = {i: mod.nvmlDeviceGetHandleByIndex(i) for i in idx}

            def limit(i: int) -> float:
                base = (
                    baseline_used_mib.get(i, 0.0)
                    if isinstance(baseline_used_mib, Mapping)
                    else baseline_used_mib
                )
                return float(base) + float(tolerance_mib)

            while True:
                used = {i: _mib(mod.nvmlDeviceGetMemoryInfo(h).used) or 0.0 for i, h in handles.items()}
                over = {i: u for i, u in used.items() if u > limit(i)}
                waited = round(clock() - t0, 3)
                if not over:
                    return MemoryWait(True, waited, used, "GPU memory is back to its baseline")
                if waited >= timeout_s:
                    i, u = next(iter(over.items()))
                    return MemoryWait(
                        False, waited, used,
                        f"GPU {i} still uses {u:.0f} MiB after {timeout_s:g} s (baseline + tolerance {limit(i):.0f} MiB); "
                        "a server process may have survived: vllm-lab reap RUN_DIR, or check nvidia-smi",
                    )  # fmt: skip
                sleep(interval_s)
    except NvmlUnavailable as e:
        return MemoryWait(True, 0.0, {}, f"{e}: nothing to wait for")


# --------------------------------------------------------------------------------------------- profiles


@dataclass
class GpuProfile:
    name: str
    aliases: list[str]
    memory_gb: float  # as the vendor sells it
    total_mib: float  # as NVML / nvidia-smi reports it (what vLLM's total_gpu_memory sees)
    compute_capability: str  # "6.1"
    bf16: bool
    fp16_note: str = ""
    nvml_names: list[str] = field(default_factory=list)
    source: str = ""
    notes: str = ""
    path: str | None = None

    @property
    def cc_int(self) -> int:
        major, _, minor = self.compute_capability.partition(".")
        return int(major) * 10 + int(minor or 0)

    @property
    def memory_gib(self) -> float:
        return self.total_mib / 1024.0

    def to_dict(self) -> dict:
        return {**asdict(self), "cc_int": self.cc_int, "memory_gib": round(self.memory_gib, 3)}


def _profile_from_yaml(path: Path) -> GpuProfile:
    import yaml

    raw = yaml.safe_load(path.read_text()) or {}
    cc = str(raw.get("compute_capability", ""))
    if not cc or "." not in cc:
        raise SpecError(f"{path}: compute_capability: {cc!r} must look like 6.1")
    total = raw.get("total_mib")
    if total is None:
        total = float(raw["memory_gb"]) * 1e9 / MIB  # vendor GB -> MiB when NVML's figure is unknown
    return GpuProfile(
        name=str(raw["name"]), aliases=[str(a) for a in raw.get("aliases", [])],
        memory_gb=float(raw.get("memory_gb", 0.0)), total_mib=float(total), compute_capability=cc,
        bf16=bool(raw.get("bf16", float(cc) >= 8.0)), fp16_note=str(raw.get("fp16_note", "")).strip(),
        nvml_names=[str(n) for n in raw.get("nvml_names", [])], source=str(raw.get("source", "")).strip(),
        notes=str(raw.get("notes", "")).strip(), path=str(path),
    )  # fmt: skip


def list_gpu_profiles(directory: Path | None = None) -> list[GpuProfile]:
    """Every profile in `directory` (default params/gpus)."""
    d = Path(directory) if directory is not None else params_dir() / "gpus"
    return [_profile_from_yaml(p) for p in sorted(d.glob("*.yaml"))]


def _norm(s: str) -> str:
    return "".join(ch for ch in s.lower() if ch.isalnum())


def load_gpu_profile(name: str, directory: Path | None = None) -> GpuProfile:
    """A profile by name, alias, file stem or NVML name, case- and punctuation-insensitive."""
    profiles = list_gpu_profiles(directory)
    want = _norm(str(name))
    for p in profiles:
        keys = [p.name, *p.aliases, *p.nvml_names, Path(p.path or "").stem]
        if want in {_norm(k) for k in keys if k}:
            return p
    known = ", ".join(p.aliases[0] if p.aliases else p.name for p in profiles) or "(none found)"
    raise SpecError(f"gpu: {name!r} is not a known GPU profile; use one of {known} (params/gpus/*.yaml)")


def profile_from_device(dev: GpuDevice, directory: Path | None = None) -> GpuProfile:
    """A profile for a live device: the matching params/gpus profile with NVML's own memory figure."""
    for p in list_gpu_profiles(directory):
        if _norm(dev.name) in {_norm(n) for n in (p.name, *p.nvml_names)}:
            return GpuProfile(
                **{**asdict(p), "total_mib": dev.total_mib, "compute_capability": dev.compute_capability}
            )
    cc = dev.compute_capability
    return GpuProfile(
        name=dev.name, aliases=[], memory_gb=round(dev.total_mib * MIB / 1e9, 1), total_mib=dev.total_mib,
        compute_capability=cc, bf16=float(cc) >= 8.0, source="NVML (live device)",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- CLI


def cli_gpus(args) -> int:
    inv = inventory()
    if getattr(args, "json", False):
        print(json.dumps(inv.to_dict(), indent=2))
    else:
        print(inv.describe())
    return 0
