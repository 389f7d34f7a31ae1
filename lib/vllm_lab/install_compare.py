"""vLLM installs side by side: the same configurations on each install, as report blocks.

Records name their install (the plan's name) and the vLLM version that server itself printed in its log
(vllm_version). Where a run holds trials of two or more installs, the report gets one section: which
version changed what (the verdict), the outcome grid (one column per install), and capacity per install.
A row is one configuration less its install (configs.key_columns: model, engine, GPU type, engine flags
such as --enforce-eager, launcher, length, memory), so configurations that differ are never one row.
Nothing here launches anything; it reads the prepared records (hypotheses.prepare) only.
"""

from __future__ import annotations

import pandas as pd

from vllm_lab import configs

INSTALL = "install_label"
KEYS = configs.key_columns(without=(INSTALL,))  # one configuration, across installs
GRID = ["launcher", "max_model_len", "memory"]
MISSING = "—"


def _known(v) -> bool:
    return v is not None and not (isinstance(v, float) and pd.isna(v))


def labels(df: pd.DataFrame) -> pd.Series:
    """`name (vLLM version)` per row (configs.install_labels); the reported version alone where no install
    was named."""
    return pd.Series(
        [
            label if _known(i) else (f"vLLM {v}" if _known(v) else None)
            for label, i, v in zip(df[INSTALL], df["install"], df["vllm_version"], strict=True)
        ],
        index=df.index,
        dtype=object,
    )


def _others(df: pd.DataFrame) -> tuple[str, pd.Series]:
    """(heading, label per row) of what else varies (model, flags, ...) besides the install."""
    return configs.variant(df, without=(INSTALL,))


def _cell(g: pd.DataFrame) -> str:
    last = g.iloc[-1]  # a resumed or retried trial: its latest record
    if last["outcome"] == "ready":
        return "starts" + ("" if last.get("long_request_ok") is not False else ", long request failed")
    return f"{last['outcome']}: {last['failure']}" if _known(last.get("failure")) else str(last["outcome"])


def outcome_grid(df: pd.DataFrame, lab: pd.Series) -> pd.DataFrame:
    """One row per configuration, one column per install: what each did with it."""
    d = df.assign(_install=lab)
    d = d[d["_install"].notna() & d["launcher"].notna()]
    heading, others = _others(d)
    d = d.assign(_others=others)
    cols = list(dict.fromkeys(d["_install"]))
    rows = []
    for _, g in d.groupby(KEYS, dropna=False, sort=True):
        first = g.iloc[0]
        row = {"_others": first["_others"], "launcher": first["launcher"],
               "max_model_len": first["max_model_len"], "memory": first["memory_label"]}  # fmt: skip
        for c in cols:
            sub = g[g["_install"] == c]
            row[c] = _cell(sub) if not sub.empty else MISSING
        rows.append(row)
    out = pd.DataFrame(rows, columns=["_others", *GRID, *cols])
    return out.rename(columns={"_others": heading}) if heading else out.drop(columns="_others")


def capacity(df: pd.DataFrame, lab: pd.Series) -> pd.DataFrame:
    """Per install: trials, how many started, the largest stable max_model_len, KV tokens and weights."""
    d = df.assign(_install=lab)
    d = d[d["_install"].notna()]
    heading, others = _others(d)
    d = d.assign(_others=others)
    rows = []
    for (name, other), g in d.groupby(["_install", "_others"], sort=False):
        stable = g[g["stable"]]
        rows.append({
            "install": name, **({heading: other} if heading else {}), "trials": len(g),
            "started": int(g["started"].sum()),
            "largest stable max_model_len": int(stable["max_model_len"].max()) if not stable.empty else "none stable",
            "kv_cache_tokens": g["kv_cache_tokens"].dropna().max() if g["kv_cache_tokens"].notna().any() else None,
            "weights_gib": g["weights_gib"].dropna().max() if g["weights_gib"].notna().any() else None,
            "backend": ", ".join(sorted(g["backend"].dropna().astype(str).unique())),
        })  # fmt: skip
    return pd.DataFrame(rows)


def changes(grid: pd.DataFrame) -> list[str]:
    """ "0.27.0 starts at 4096; 0.32.0 fails: kv_cache_insufficient" for each configuration that differs."""
    first = list(grid.columns).index("launcher")  # columns before it name what else varies (model, flags)
    installs = list(grid.columns[first + len(GRID) :])
    out = []
    for _, row in grid.iterrows():
        seen = {c: row[c] for c in installs if row[c] != MISSING}
        if len(set(seen.values())) < 2:
            continue
        other = "".join(f"{c} {row[c]}, " for c in grid.columns[:first])
        where = f"{other}{row['launcher']}, max_model_len {row['max_model_len']}, {row['memory']}"
        line = f"{where}: " + "; ".join(f"{c} {v}" for c, v in seen.items())
        if "timeout" in seen.values():  # a slow start, not a refusal: no version to blame yet
            line += " (a timeout is not a verdict: rerun it with a longer startup_timeout_s)"
        out.append(line)
    return out


def compare_blocks(df: pd.DataFrame) -> list[tuple]:
    """The report's install section; [] where the run has trials of fewer than two vLLM installs (another
    engine's install is not a vLLM version: llama.cpp beside vLLM is "Engines side by side")."""
    if df.empty or "install" not in df or "vllm_version" not in df:
        return []
    if "engine" in df:
        df = df[df["engine"] == configs.DEFAULT_ENGINE]
    lab = labels(df)
    if lab.dropna().nunique() < 2:
        return []
    grid = outcome_grid(df, lab)
    diff = changes(grid)
    names = ", ".join(dict.fromkeys(lab.dropna()))
    verdict = (
        "**Which version changed what.** " + " ".join(f"{line}." for line in diff)
        if diff
        else f"**Which version changed what.** Nothing: every configuration did the same on {names}."
    )
    return [
        ("heading", 2, "vLLM installs side by side"),
        ("text", f"Installs: {names} (each version as its server reported it in its log)."),
        ("text", verdict),
        ("table", grid),
        ("text", "**Capacity per install:**"),
        ("table", capacity(df, lab)),
    ]
