"""Benchmark: 8 fake trials on 2 Ray GPU slots against the serial batch, wall clock, in one run.

    .venv/bin/python benchmarks/bench_ray.py                    # 8 trials, 5 s fake start each
    .venv/bin/python benchmarks/bench_ray.py --start-delay 10 --out table.md

One plan, one step (04_hypotheses: 1 launcher x 4 max_model_len x 2 utilizations = 8 trials) against the
fake vLLM (FAKE_VLLM_START_DELAY seconds of fake model loading, then ready and a full-length request), run
twice through `vllm_lab.batch.run_plan` exactly as `vllm-lab run` does (papermill, the report notebook):
serially, and with `--ray local` on a local cluster with 2 fake GPUs (ray.init(num_gpus=2)). The Ray wall
clock includes starting the cluster and connecting the kernel; the cluster start is also shown on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 40960,
    "vocab_size": 1000, "torch_dtype": "float16",
}  # fmt: skip


def write_plan(d: Path, delay: float) -> Path:
    model = d / "models" / "tiny-fake"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(MODEL_CONFIG))
    plan = d / "bench-ray.yaml"
    plan.write_text(
        f"name: bench-ray\nmodel: {model}\nvllm_cmd: {sys.executable} -m vllm_lab.testing.fake_vllm\n"
        f"defaults: {{env: {{FAKE_VLLM_START_DELAY: '{delay}'}}, startup_timeout_s: 60, request_timeout_s: 60}}\n"
        "steps:\n  - name: hyp\n    notebook: 04_hypotheses\n    parameters: {LAUNCHERS: [head], "
        "MAX_MODEL_LENS: [2048, 4096, 8192, 16384], UTILIZATIONS: [0.85, 0.9]}\n"
    )
    return plan


def timed_run(plan: Path, out: Path, ray: str | None) -> tuple[float, int, set]:
    from vllm_lab import record
    from vllm_lab.batch import run_plan

    t0 = time.monotonic()
    summary = run_plan(str(plan), out=str(out), ray=ray)
    wall = time.monotonic() - t0
    if summary.errors:
        raise SystemExit(f"run failed: {summary.errors}")
    rows = record.read_records(summary.run_dir).rows
    if len(rows) != 8 or {r["outcome"] for r in rows} != {"ready"}:
        raise SystemExit(f"expected 8 ready trials, got {[(r['trial_id'], r['outcome']) for r in rows]}")
    return wall, len(rows), {tuple(r.get("gpu_ids") or ()) for r in rows}


def cluster_start_s() -> float:
    from vllm_lab import ray_exec

    t0 = time.monotonic()
    ray_exec.connect("local")
    took = time.monotonic() - t0
    ray_exec.shutdown()
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start-delay", type=float, default=5.0, help="fake model loading per trial, seconds")
    ap.add_argument("--out", help="also write the table here")
    args = ap.parse_args()
    from vllm_lab import ray_exec

    os.environ[ray_exec.LOCAL_ENV] = json.dumps(
        {
            "num_cpus": 2,
            "num_gpus": 2,
            "resources": {"accelerator_type:FAKE": 1},
            "object_store_memory": 100 << 20,
        }
    )
    os.environ.setdefault("VLLM_LAB_LOCK_DIR", tempfile.gettempdir())
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        d = Path(tmp)
        plan = write_plan(d, args.start_delay)
        serial, n, _ = timed_run(plan, d / "serial", None)
        start = cluster_start_s()
        on_ray, n_ray, slots = timed_run(plan, d / "ray", "local")
    table = "\n".join([
        f"8 fake trials (FAKE_VLLM_START_DELAY={args.start_delay:g} s each), one 04_hypotheses step, "
        "through batch.run_plan (papermill + report)",
        "",
        "| mode | trials | GPU slots | wall s | vs serial |",
        "|---|---|---|---|---|",
        f"| serial batch | {n} | 1 | {serial:.1f} | 1.00x |",
        f"| --ray local (2 fake GPUs) | {n_ray} | {len(slots)} used | {on_ray:.1f} | {serial / on_ray:.2f}x |",
        "",
        f"Ray local cluster start alone: {start:.1f} s (included in the --ray wall clock).",
    ])  # fmt: skip
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
