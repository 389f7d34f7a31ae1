"""vLLM installs side by side: the same configurations on each install, as report blocks.

Records name their install (the plan's name) and the vLLM version that server itself printed in its log
(vllm_version). Where a run holds trials of two or more installs, the report gets one section: which
version changed what (the verdict), the outcome grid (one column per install), and capacity per install.
Nothing here launches anything; it reads the prepared records (hypotheses.prepare) only.
"""

from __future__ import annotations

import pandas as pd

KEYS = ["launcher", "max_model_len", "memory_label"]  # one configuration, across installs
MISSING = "—"


def _known(v) -> bool:
    return v is not None and not (isinstance(v, float) and pd.isna(v))


def labels(df: pd.DataFrame) -> pd.Series:
    """`name (vLLM version)` per row; the reported version alone where no install was named."""

    def one(install, version) -> str | None:
        v = f"vLLM {version}" if _known(version) else "vLLM version not reported"
        return f"{install} ({v})" if _known(install) else (f"vLLM {version}" if _known(version) else None)

    return pd.Series(
        [one(i, v) for i, v in zip(df["install"], df["vllm_version"], strict=True)], index=df.index
    )


def _cell(g: pd.DataFrame) -> str:
    last = g.iloc[-1]  # a resumed or retried trial: its latest record
    if last["outcome"] == "ready":
        return "starts" + ("" if last.get("long_request_ok") is not False else ", long request failed")
    return f"{last['outcome']}: {last['failure']}" if _known(last.get("failure")) else str(last["outcome"])


def outcome_grid(df: pd.DataFrame, lab: pd.Series) -> pd.DataFrame:
    """One row per configuration, one column per install: what each did with it."""
    d = df.assign(_install=lab)
    d = d[d["_install"].notna() & d["launcher"].notna()]
    cols = list(dict.fromkeys(d["_install"]))
    rows = []
    for key, g in d.groupby(KEYS, dropna=False, sort=True):
        row = dict(zip(["launcher", "max_model_len", "memory"], key, strict=True))
        for c in cols:
            sub = g[g["_install"] == c]
            row[c] = _cell(sub) if not sub.empty else MISSING
        rows.append(row)
    return pd.DataFrame(rows, columns=["launcher", "max_model_len", "memory", *cols])


def capacity(df: pd.DataFrame, lab: pd.Series) -> pd.DataFrame:
    """Per install: trials, how many started, the largest stable max_model_len, KV tokens and weights."""
    d = df.assign(_install=lab)
    rows = []
    for name, g in d[d["_install"].notna()].groupby("_install", sort=False):
        stable = g[g["stable"]]
        rows.append({
            "install": name, "trials": len(g), "started": int(g["started"].sum()),
            "largest stable max_model_len": int(stable["max_model_len"].max()) if not stable.empty else "none stable",
            "kv_cache_tokens": g["kv_cache_tokens"].dropna().max() if g["kv_cache_tokens"].notna().any() else None,
            "weights_gib": g["weights_gib"].dropna().max() if g["weights_gib"].notna().any() else None,
            "backend": ", ".join(sorted(g["backend"].dropna().astype(str).unique())),
        })  # fmt: skip
    return pd.DataFrame(rows)


def changes(grid: pd.DataFrame) -> list[str]:
    """ "0.27.0 starts at 4096; 0.32.0 fails: kv_cache_insufficient" for each configuration that differs."""
    installs = [c for c in grid.columns if c not in ("launcher", "max_model_len", "memory")]
    out = []
    for _, row in grid.iterrows():
        seen = {c: row[c] for c in installs if row[c] != MISSING}
        if len(set(seen.values())) < 2:
            continue
        where = f"{row['launcher']}, max_model_len {row['max_model_len']}, {row['memory']}"
        line = f"{where}: " + "; ".join(f"{c} {v}" for c, v in seen.items())
        if "timeout" in seen.values():  # a slow start, not a refusal: no version to blame yet
            line += " (a timeout is not a verdict: rerun it with a longer startup_timeout_s)"
        out.append(line)
    return out


def compare_blocks(df: pd.DataFrame) -> list[tuple]:
    """The report's install section; [] where the run has trials of fewer than two installs."""
    if df.empty or "install" not in df or "vllm_version" not in df:
        return []
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
