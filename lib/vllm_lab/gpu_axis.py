"""The report's GPU axis: the same steps on several GPU types (`per_gpu_type: true` under `run --ray`).

Reads prepared records only (report.load_run's frame); launches nothing and never imports ray. Two tables:
the outcome of each configuration on each GPU type, and the largest stable max_model_len per GPU type.
"""

from __future__ import annotations

import pandas as pd

from vllm_lab import configs

MISSING = "—"


def gpu_label(df: pd.DataFrame) -> pd.Series:
    """The GPU type a trial ran on: Ray's accelerator type (`gpu`), else NVML's name, else unknown."""
    gpu = df["gpu"] if "gpu" in df else pd.Series([None] * len(df), index=df.index)
    name = df["gpu_name"] if "gpu_name" in df else pd.Series([None] * len(df), index=df.index)
    return gpu.where(gpu.notna(), name).fillna(MISSING).astype(str)


def _cell(g: pd.DataFrame) -> str:
    """What happened to one configuration on one GPU type: stable / its outcome and failure kind."""
    seen = []
    for _, r in g.iterrows():
        if r["stable"]:
            seen.append("stable")
        else:
            seen.append(f"{r['outcome']} ({r['failure']})" if r.get("failure") else str(r["outcome"]))
    return ", ".join(dict.fromkeys(seen))


def outcome_by_gpu(df: pd.DataFrame) -> pd.DataFrame:
    """Rows: step, launcher, max_model_len, memory; one column per GPU type."""
    heading, others = configs.variant(df, without=("gpu_type",))  # model, install, flags: never one row
    d = df.assign(_gpu=gpu_label(df), _step=df["step"].astype(str).str.split("@").str[0], _others=others)
    keys = ["_step", "_others", "launcher", "max_model_len", "memory_label"]
    grid = d.groupby([*keys, "_gpu"], dropna=False, sort=True).apply(_cell, include_groups=False)
    out = grid.unstack("_gpu").fillna(MISSING).reset_index()
    out.columns.name = None
    out = out.rename(columns={"_step": "step", "memory_label": "memory", "_others": heading})
    return out if heading else out.drop(columns="")


def largest_by_gpu(df: pd.DataFrame) -> pd.DataFrame:
    """Per GPU type, launcher and memory setting: the largest max_model_len that was ready and stable."""
    heading, others = configs.variant(df, without=("gpu_type",))
    d = df.assign(_gpu=gpu_label(df), _others=others)
    rows = []
    keys = ["_gpu", "_others", "launcher", "memory_label"]
    for (gpu, other, launcher, mem), g in d[d["launcher"].notna()].groupby(keys):
        stable = pd.to_numeric(g.loc[g["stable"], "max_model_len"], errors="coerce").dropna()
        rows.append({"gpu": gpu, **({heading: other} if heading else {}), "launcher": launcher, "memory": mem,
                     "largest stable max_model_len": int(stable.max()) if len(stable) else "none stable",
                     "trials": len(g), "nodes": ", ".join(sorted(g["node"].dropna().astype(str).unique()))
                     if "node" in g else MISSING})  # fmt: skip
    cols = ["gpu", *([heading] if heading else []), "launcher", "memory", "largest stable max_model_len", "trials",
            "nodes"]  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def gpu_axis_blocks(df: pd.DataFrame) -> list[tuple]:
    """Report blocks for a run whose trials ran on more than one GPU type; none otherwise."""
    if df.empty or gpu_label(df).nunique() < 2:
        return []
    return [
        ("heading", 2, "GPU types"),
        (
            "text",
            "The same configurations on each GPU type the trials ran on (`gpu`: Ray's accelerator type "
            "of the node, else NVML's name). A cell lists what happened there: stable, or the outcome "
            "with its failure kind (a trial lost with its node is listed apart, under Lost attempts).",
        ),
        ("table", outcome_by_gpu(df)),
        ("text", "Largest stable max_model_len per GPU type (ready and served a full-length request):"),
        ("table", largest_by_gpu(df)),
    ]
