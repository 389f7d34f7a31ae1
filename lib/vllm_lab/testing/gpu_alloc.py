"""GPU memory held on purpose, and what NVML says about it: the parts of scripts/gpu-check.sh and tests/gpu.

- `hold(mib)` allocates that much with torch on cuda:0 and keeps it. Under the fake NVML (LEDGER_ENV set,
  testing/fake_nvml.LedgerNvml) it writes `<pid>.mib` into the ledger instead, so the same steps run with
  no GPU and no torch.
- `python -m vllm_lab.testing.gpu_alloc hold --mib N [--ignore-sigterm]`: a process that holds N MiB until
  killed. The fake vLLM starts one as its KV cache when FAKE_VLLM_GPU_ALLOC is set (stubborn under
  FAKE_VLLM_SCENARIO=stubborn_child).
- `... vllm-lab ARGS`: the `vllm-lab` command, on the fake NVML when LEDGER_ENV is set.
- `... used`, `... stubborn`, `... table OUT`: the check's own measurements, and its table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_lab.testing.fake_nvml import LEDGER_ENV

MIB = 1 << 20
LINE = "GPU_ALLOC "  # the holder's one line: GPU_ALLOC {"pid": .., "mib": .., "via": "torch", ..}
ERROR_LINE = "GPU_ALLOC_ERROR "
RELEASE_TOLERANCE_MIB = 512.0  # gpu.wait_for_memory_free's default: what "back at the baseline" means
OVERHEAD_LIMIT_MIB = 2048.0  # NVML delta - allocated: a CUDA context and allocator rounding, not a leak


class AllocError(RuntimeError):
    """The memory cannot be held here; the message is one line (an OOM keeps torch's own wording)."""


@dataclass
class Held:
    info: dict
    keep: Any = field(default=None, repr=False)  # the tensor: alive as long as this object


def hold(mib: float) -> Held:
    """Hold `mib` MiB of GPU memory (torch, cuda:0), or of the fake GPU when LEDGER_ENV is set."""
    pid = os.getpid()
    ledger = os.environ.get(LEDGER_ENV)
    if ledger:
        (Path(ledger) / f"{pid}.mib").write_text(f"{mib:.1f}")
        return Held({"pid": pid, "mib": round(mib, 1), "reserved_mib": round(mib, 1), "via": "fake-ledger"})
    try:
        import torch
    except ImportError as e:
        raise AllocError(f"RuntimeError: cannot hold GPU memory: torch is not importable ({e})") from e
    if not torch.cuda.is_available():
        raise AllocError("RuntimeError: cannot hold GPU memory: torch sees no CUDA device")
    nbytes = round(mib * MIB)
    try:
        t = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        t.fill_(1)  # touch it: the pages are really there, not only reserved
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError as e:
        raise AllocError(f"torch.OutOfMemoryError: {str(e).splitlines()[0]}") from e
    info = {"pid": pid, "mib": round(nbytes / MIB, 1), "reserved_mib": round(torch.cuda.memory_reserved() / MIB, 1),
            "via": "torch", "device": torch.cuda.get_device_name(0), "torch": torch.__version__}  # fmt: skip
    return Held(info, keep=t)


def spawn_holder(
    mib: float, *, stubborn: bool = False, timeout_s: float = 180.0
) -> tuple[subprocess.Popen, dict]:
    """A child that holds `mib` MiB until killed; returns once it holds them (its GPU_ALLOC line)."""
    argv = [sys.executable, "-m", "vllm_lab.testing.gpu_alloc", "hold", "--mib", f"{mib:.1f}"]
    proc = subprocess.Popen(argv + (["--ignore-sigterm"] if stubborn else []), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)  # fmt: skip
    got: dict = {}

    def read() -> None:
        for line in proc.stdout:
            if line.startswith((LINE, ERROR_LINE)):
                got["line"] = line.strip()
                return
            got.setdefault("before", []).append(line.rstrip())  # torch warnings: shown if it fails

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    line = got.get("line")
    if line and line.startswith(LINE):
        return proc, json.loads(line[len(LINE) :])
    proc.kill()
    proc.wait()
    if line:
        raise AllocError(line[len(ERROR_LINE) :])
    tail = " | ".join(got.get("before", [])[-3:])
    raise AllocError(
        f"RuntimeError: the GPU memory holder gave no GPU_ALLOC line within {timeout_s:g} s ({tail})"
    )


def _hold_main(args) -> int:
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stubborn child: only SIGKILL ends it
    try:
        held = hold(args.mib)
    except AllocError as e:
        print(ERROR_LINE + str(e), flush=True)
        return 3
    print(LINE + json.dumps(held.info), flush=True)
    while True:
        time.sleep(3600)


def allocations_in_log(path: str | Path) -> list[dict]:
    """The GPU_ALLOC facts a fake vLLM logged (one per holder it started)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    return [json.loads(m.group(1)) for m in re.finditer(r"GPU_ALLOC (\{.*\})\s*$", text, re.M)]


# --------------------------------------------------------------------------------------------- NVML side


def install_fake_nvml_if_asked() -> bool:
    """Under LEDGER_ENV every NVML call of this process goes to the shared fake GPU."""
    ledger = os.environ.get(LEDGER_ENV)
    if not ledger:
        return False
    from vllm_lab import gpu
    from vllm_lab.testing.fake_nvml import LedgerNvml

    gpu.set_nvml(LedgerNvml(ledger))
    return True


def _used_main(_args) -> int:
    """Used MiB and processes of the GPUs this environment can see, as JSON."""
    from vllm_lab import gpu

    inv = gpu.inventory()
    devs = inv.visible_devices if inv.available else []
    print(json.dumps({"available": inv.available, "reason": inv.reason, "t": time.time(),
                      "used_mib": {str(d.index): d.used_mib for d in devs},
                      "processes": [{"pid": p.pid, "used_mib": p.used_mib} for d in devs for p in d.processes]}))  # fmt: skip
    return 0


def stubborn_check(model: str, kv_mib: float, run_dir: str | Path, vllm_cmd: str) -> dict:
    """Launch the fake vLLM whose KV-holding child ignores SIGTERM; stop the tree; is the memory back?"""
    from vllm_lab import gpu
    from vllm_lab.launcher import STOP_GRACE_S, VllmServer, trial_gpu_env, visible_gpus
    from vllm_lab.spec import Trial

    trial = Trial(model=model, vllm_cmd=vllm_cmd, max_model_len=1024, kv_cache_memory_bytes=int(kv_mib * MIB),
                  startup_timeout_s=180, step="gpu-check-stubborn",
                  env={"FAKE_VLLM_SCENARIO": "stubborn_child", "FAKE_VLLM_GPU_ALLOC": "1"})  # fmt: skip
    devices = visible_gpus(trial)
    baseline = gpu.used_mib(devices)
    out: dict = {"case": "stubborn child (ignores SIGTERM)", "kv_budget_mib": kv_mib, "devices": devices,
                 "nvml_baseline_mib": sum(baseline.values()) if baseline else None}  # fmt: skip
    with VllmServer(trial, run_dir) as server:
        res = server.start()
        out.update(outcome=res.outcome, failure=res.failure, evidence=res.evidence, log_path=res.log_path)
        held = gpu.used_mib(devices)
        allocs = allocations_in_log(res.log_path)
        holders = [a["pid"] for a in allocs]
        inv = gpu.inventory(env=trial_gpu_env(trial))
        per_pid = {p.pid: p.used_mib for d in inv.visible_devices for p in d.processes}
        out.update(nvml_held_mib=sum(held.values()) if held else None,
                   allocated_mib=sum(a["reserved_mib"] for a in allocs) if allocs else None,
                   via=allocs[0]["via"] if allocs else None, holder_pids=holders,
                   nvml_holder_process_mib=[per_pid.get(p) for p in holders])  # fmt: skip
        sampler = gpu.MemorySampler(devices, interval_s=0.1) if devices else None
        t0 = time.monotonic()
        if sampler:
            sampler.start()
        out["survivors"] = server.stop()  # terminate, STOP_GRACE_S, kill; then the release wait
        out["stop_s"] = round(time.monotonic() - t0, 2)
        if sampler:
            sampler.stop()
        out["gpu_note"] = server.gpu_note
    after = gpu.used_mib(devices)
    out["nvml_after_mib"] = sum(after.values()) if after else None
    out["holders_alive_after"] = [p for p in holders if _alive(p)]
    limit = (out["nvml_baseline_mib"] or 0.0) + RELEASE_TOLERANCE_MIB
    timeline = [(t, sum(r.values())) for t, r in (sampler.timeline if sampler else [])]
    # Still held a second before the kill: SIGTERM alone did not free it (SIGKILL did, after the grace).
    out["held_through_sigterm"] = any(
        STOP_GRACE_S - 1.5 <= t <= STOP_GRACE_S - 0.5 and u > limit for t, u in timeline
    )
    out["released_after_s"] = next((t for t, u in timeline if u <= limit), None)  # since the stop began
    return out


def _alive(pid: int) -> bool:
    from vllm_lab.testing.fake_nvml import _pid_alive

    return _pid_alive(pid)


def _stubborn_main(args) -> int:
    res = stubborn_check(args.model, args.kv_mib, args.out, args.vllm_cmd)
    print(json.dumps(res, default=str))
    return 0 if res.get("outcome") == "ready" else 1


# ------------------------------------------------------------------------------ stand-ins for pynvml, torch

STUB_ENV = "VLLM_LAB_STUB_GPU_LEDGER"  # the ledger folder the stand-in pynvml and torch share
_STUB_PYNVML = """\"\"\"pynvml stood in by the fake GPU ledger (testing/gpu_alloc.write_stub_modules).\"\"\"
import os
from vllm_lab.testing.fake_nvml import LedgerNvml
_nvml = LedgerNvml(os.environ["VLLM_LAB_STUB_GPU_LEDGER"])
def __getattr__(name):
    return getattr(_nvml, name)
"""
_STUB_TORCH = """\"\"\"torch stood in: cuda:0 is the ledger's fake H200; a process's first allocation adds a 500 MiB
CUDA context, as a real one does (testing/gpu_alloc.write_stub_modules).\"\"\"
import json, os, types
__version__ = "0+stub"
uint8 = "uint8"
version = types.SimpleNamespace(cuda="stub")
_ledger = os.environ["VLLM_LAB_STUB_GPU_LEDGER"]
_dev = json.load(open(os.path.join(_ledger, "device.json")))
_held = [0]
class _Tensor:
    def fill_(self, value):
        return self
class OutOfMemoryError(RuntimeError):
    pass
def _empty(n, dtype=None, device=None):
    _held[0] += n
    with open(os.path.join(_ledger, f"{os.getpid()}.mib"), "w") as f:
        f.write(str(500 + _held[0] / 2**20))
    return _Tensor()
empty = _empty
cuda = types.SimpleNamespace(
    OutOfMemoryError=OutOfMemoryError, is_available=lambda: True, device_count=lambda: 1, synchronize=lambda: None,
    memory_reserved=lambda: _held[0], get_device_name=lambda i=0: _dev["name"],
    get_device_capability=lambda i=0: tuple(_dev["cc"]),
    get_device_properties=lambda i=0: types.SimpleNamespace(name=_dev["name"], total_memory=int(_dev["total"] * 0.99 * 2**20)),
)
"""


def write_stub_modules(directory: str | Path, ledger: str | Path) -> dict[str, str]:
    """`pynvml` and `torch` stand-ins in `directory`, over one fake GPU (a LedgerNvml folder): put it first on
    PYTHONPATH and the real-mode code paths (import pynvml, torch allocations) run without a GPU.
    Returns the environment to add."""
    from vllm_lab.testing.fake_nvml import LedgerNvml

    d = Path(directory)
    (d / "torch").mkdir(parents=True, exist_ok=True)
    (d / "pynvml.py").write_text(_STUB_PYNVML)
    (d / "torch" / "__init__.py").write_text(_STUB_TORCH)
    LedgerNvml(str(ledger))  # writes device.json
    return {STUB_ENV: str(ledger)}


# --------------------------------------------------------------------------------------------- the table


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _launch_row(d: Path) -> dict:
    rec = _read_json(d / "record.json") or {}
    before, after = _read_json(d / "before.json") or {}, _read_json(d / "after.json") or {}
    base = sum(before.get("used_mib", {}).values()) if before.get("used_mib") else None
    allocs = allocations_in_log(rec.get("log_path") or "")
    note = rec.get("note") or ""
    return {
        "case": f"fake vLLM launch, KV budget {d.name.removeprefix('alloc-')} MiB", "outcome": rec.get("outcome"),
        "kv_budget_mib": (rec.get("kv_cache_memory_bytes") or 0) / MIB or None,
        "allocated_mib": sum(a["reserved_mib"] for a in allocs) if allocs else None,
        "via": allocs[0]["via"] if allocs else None, "nvml_baseline_mib": base,
        "nvml_peak_mib": rec.get("peak_gpu_mib"), "timeline_samples": len(rec.get("gpu_memory_timeline") or []),
        "nvml_after_mib": sum(after.get("used_mib", {}).values()) if after.get("used_mib") else None,
        "released_in_wait": "GPU memory not released" not in note, "note": note or None,
    }  # fmt: skip


def _finish_row(row: dict, peak_key: str) -> dict:
    base, peak, alloc = row.get("nvml_baseline_mib"), row.get(peak_key), row.get("allocated_mib")
    row["nvml_delta_mib"] = round(peak - base, 1) if peak is not None and base is not None else None
    delta = row["nvml_delta_mib"]
    row["delta_minus_allocated_mib"] = round(delta - alloc, 1) if delta is not None and alloc else None
    after = row.get("nvml_after_mib")
    row["back_at_baseline"] = after is not None and base is not None and after <= base + RELEASE_TOLERANCE_MIB
    return row


def build_table(out: str | Path) -> dict:
    """OUT/alloc-*/ and OUT/stubborn.json -> rows, checks; written as OUT/nvml-vs-allocated.{json,md}."""
    out = Path(out)
    rows = [_finish_row(_launch_row(d), "nvml_peak_mib") for d in sorted(out.glob("alloc-*"), key=_budget)]
    stub = _read_json(out / "stubborn.json")
    if stub:
        rows.append(_finish_row(dict(stub), "nvml_held_mib"))
    checks = []
    for r in rows:
        ok = r.get("outcome") == "ready"
        checks.append((f"{r['case']}: started", ok, r.get("outcome")))
        delta, alloc = r.get("nvml_delta_mib"), r.get("allocated_mib")
        seen = delta is not None and alloc is not None and alloc * 0.95 <= delta <= alloc + OVERHEAD_LIMIT_MIB
        checks.append((f"{r['case']}: NVML delta within [0.95 x allocated, allocated + {OVERHEAD_LIMIT_MIB:g}]",
                       seen, f"delta {delta}, allocated {alloc}"))  # fmt: skip
        freed = r.get("back_at_baseline") and r.get("released_in_wait", r.get("gpu_note") is None)
        checks.append((f"{r['case']}: back at the baseline (+{RELEASE_TOLERANCE_MIB:g} MiB) after the stop",
                       bool(freed), f"after {r.get('nvml_after_mib')}, baseline {r.get('nvml_baseline_mib')}"))  # fmt: skip
    if not rows:
        checks.append(("anything measured (alloc-*/, stubborn.json)", False, f"neither is in {out}"))
    launches = [
        r for r in rows if r["case"].startswith("fake vLLM launch") and r.get("nvml_delta_mib") is not None
    ]
    if len(launches) >= 2 and launches[-1].get("allocated_mib") and launches[0].get("allocated_mib"):
        a, b = launches[0], launches[-1]
        slope = (b["nvml_delta_mib"] - a["nvml_delta_mib"]) / (b["allocated_mib"] - a["allocated_mib"])
        checks.append(("NVML delta grows with the allocation (slope between the two launches, 0.97-1.03)",
                       0.97 <= slope <= 1.03, f"slope {slope:.3f}"))  # fmt: skip
    if stub:
        checks.append(("stubborn child: no survivor, and SIGTERM alone did not end it",
                       not stub.get("survivors") and not stub.get("holders_alive_after") and bool(stub.get("held_through_sigterm")),
                       f"survivors {stub.get('survivors')}, stop {stub.get('stop_s')} s, memory back {stub.get('released_after_s')} s after the stop began"))  # fmt: skip
    table = {"rows": rows, "checks": [{"check": c, "ok": bool(ok), "detail": d} for c, ok, d in checks],
             "ok": bool(checks) and all(ok for _, ok, _ in checks)}  # fmt: skip
    (out / "nvml-vs-allocated.json").write_text(json.dumps(table, indent=2, default=str))
    (out / "nvml-vs-allocated.md").write_text(render_markdown(table))
    return table


def _budget(d: Path) -> float:
    try:
        return float(d.name.removeprefix("alloc-"))
    except ValueError:
        return 0.0


COLUMNS = [("case", "case"), ("via", "via"), ("allocated_mib", "allocated MiB"),
           ("nvml_baseline_mib", "NVML baseline"), ("nvml_peak_mib", "NVML peak (record)"),
           ("nvml_held_mib", "NVML while held"), ("nvml_holder_process_mib", "NVML per holder process"), ("nvml_delta_mib", "NVML delta"),
           ("delta_minus_allocated_mib", "delta - allocated"), ("nvml_after_mib", "NVML after stop"),
           ("back_at_baseline", "back at baseline"), ("stop_s", "stop s"),
           ("released_after_s", "freed after s")]  # fmt: skip


def render_markdown(table: dict) -> str:
    cell = lambda v: "" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["# What NVML reported against what was allocated", "",
             "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]  # fmt: skip
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in COLUMNS) + " |" for r in table["rows"]]
    lines += ["", "## Checks", ""]
    lines += [f"- {'PASS' if c['ok'] else 'FAIL'}: {c['check']} ({c['detail']})" for c in table["checks"]]
    lines += ["", f"**{'all checks pass' if table['ok'] else 'some checks FAIL'}**", ""]
    return "\n".join(lines)


def _table_main(args) -> int:
    table = build_table(args.out)
    print(render_markdown(table))
    return 0 if table["ok"] else 1


# --------------------------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    install_fake_nvml_if_asked()
    if argv[:1] == ["vllm-lab"]:
        from vllm_lab.cli import main as cli_main

        return cli_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m vllm_lab.testing.gpu_alloc")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("hold", help="hold MIB of GPU memory until killed")
    s.add_argument("--mib", type=float, required=True)
    s.add_argument("--ignore-sigterm", action="store_true")
    s.set_defaults(func=_hold_main)
    s = sub.add_parser("used", help="used MiB of the visible GPUs, as JSON")
    s.set_defaults(func=_used_main)
    s = sub.add_parser("stubborn", help="launch a fake vLLM whose child holds memory and ignores SIGTERM")
    s.add_argument("--model", required=True)
    s.add_argument("--kv-mib", type=float, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--vllm-cmd", default=f"{sys.executable} -m vllm_lab.testing.fake_vllm")
    s.set_defaults(func=_stubborn_main)
    s = sub.add_parser("table", help="OUT/nvml-vs-allocated.{md,json} from the check's files")
    s.add_argument("out")
    s.set_defaults(func=_table_main)
    args = p.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
