"""What one configuration is, for every summary of a run (issue 22, points 13 and 17).

A configuration is everything that defines a trial: model, engine, install, GPU type, engine flags (the
launch's extra args, --enforce-eager among them), launcher, max_model_len and
memory setting. Every summary (report verdict, outcome grid, install and GPU comparisons, factorial cells, the
load frontier) groups by all of these, so two configurations are never merged into one row. Where a part
varies within a run, `variant` names it in a column of its own ("model", "install, flags"), so a run with
two models says which row is which; a part that is the same everywhere is not repeated on every row.

A Ray attempt lost with its worker or node (failure `infrastructure`) is no trial of vLLM: `is_infra` marks
those rows, the report lists them apart and no rate, cell, "ready n/m" or verdict counts them.
Pure pandas over prepared records; launches nothing.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import pandas as pd

from vllm_lab.ray_exec import INFRA

DEFAULT_ENGINE = "vllm"  # records written before engines existed (issue 23) were all vLLM
EAGER_FLAG = "--enforce-eager"
# (column, what a reader calls it), in the order a label names them.
DIMENSIONS = (
    ("model_name", "model"),
    ("engine", "engine"),
    ("install_label", "install"),
    ("gpu_type", "GPU"),
    ("flags", "flags"),
)
GRID = ("launcher", "max_model_len", "memory_label")  # the parts every table already shows as columns
# Flags that the launcher, the length, the memory knob or the run itself set: not engine flags.
_DEFINING = {
    "--model", "--host", "--port", "--max-model-len", "--gpu-memory-utilization", "--kv-cache-memory-bytes",
    "--quantization", "--api-key", "--served-model-name",
}  # fmt: skip
NONE = "none"  # the flags of a trial launched with no extra flag


def _known(v) -> bool:
    return v is not None and not (isinstance(v, float) and pd.isna(v))


def model_name(model) -> str | None:
    """A model's name, never a local path: the folder's name, a hub cache folder's hub id, a hub id as is."""
    if not _known(model):
        return None
    text = str(model).rstrip("/")
    if not text.startswith(("/", "~", ".")) and text.count("/") <= 1:
        return text  # a hub id (org/name) or a bare name
    parts = PurePosixPath(text).parts
    hub = next((p for p in parts if p.startswith("models--")), None)  # ~/.cache/huggingface/hub/models--o--n
    if hub:
        return hub[len("models--") :].replace("--", "/")
    return parts[-1] if parts else text


def engine_flags(argv, *, drop_eager: bool = False) -> str:
    """The launch's own flags (what the launcher, length and memory knob do not set), canonical order;
    drop_eager: less --enforce-eager (the factorial's own factor)."""
    if not isinstance(argv, list | tuple):
        return NONE
    args = [str(a) for a in argv]
    if "--port" in args:  # launcher.build_argv: the extra args follow --port N
        rest = args[args.index("--port") + 2 :]
    else:
        first = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
        rest = args[first:]
    units: list[list[str]] = []
    for a in rest:
        if a.startswith("-") or not units:
            units.append([a])
        else:
            units[-1].append(a)
    kept = [
        " ".join(u)
        for u in units
        if u[0].split("=", 1)[0] not in _DEFINING
        and not (drop_eager and u[0] == EAGER_FLAG)
        and u[0].startswith("-")
    ]
    return " ".join(sorted(kept)) or NONE


ENGINE_NAMES = {"vllm": "vLLM", "llamacpp": "llama.cpp build", "ollama": "Ollama"}


def install_labels(install: pd.Series, version: pd.Series, engine: pd.Series | None = None) -> list[str]:
    """Per row, the plan's install name with the version(s) its servers reported ("—" where no install
    was named: the plan's one command): vLLM's, or the engine's own (llama.cpp's build). Keyed by the name: a
    trial that failed before its log printed the version is the same install as its neighbours."""
    engine = engine if engine is not None else pd.Series([DEFAULT_ENGINE] * len(install), index=install.index)
    reported: dict[str, list[str]] = {}
    named: dict[str, str] = {}
    for i, v, e in zip(install, version, engine, strict=True):
        if _known(i):
            named[str(i)] = ENGINE_NAMES.get(str(e), str(e))
            seen = reported.setdefault(str(i), [])
            if _known(v) and str(v) not in seen:
                seen.append(str(v))
    labels = {
        name: f"{name} ({named[name]} {', '.join(vs)})"
        if vs
        else f"{name} ({named[name]} version not reported)"
        for name, vs in reported.items()
    }
    return [labels[str(i)] if _known(i) else "—" for i in install]


def add_columns(df: pd.DataFrame) -> pd.DataFrame:
    """The configuration's parts as columns (prepare calls it)."""
    engine = df["engine"] if "engine" in df else pd.Series([None] * len(df), index=df.index, dtype=object)
    gpu = df["gpu"] if "gpu" in df else pd.Series([None] * len(df), index=df.index, dtype=object)
    df["model_name"] = [model_name(m) or "—" for m in df["model"]]
    df["engine"] = [str(e) if _known(e) else DEFAULT_ENGINE for e in engine]
    # legacy/head/explicit are vLLM's launcher generations: another engine has none
    df["launcher"] = [
        la if e == DEFAULT_ENGINE else "—" for la, e in zip(df["launcher"], df["engine"], strict=True)
    ]
    version = df["engine_version"] if "engine_version" in df else df["vllm_version"]
    version = version.where(version.notna(), df["vllm_version"])  # records before engines: vllm_version only
    df["install_label"] = install_labels(df["install"], version, df["engine"])
    df["gpu_type"] = [str(g) if _known(g) else (str(n) if _known(n) else "—") for g, n in zip(gpu, df["gpu_name"], strict=True)]  # fmt: skip
    df["flags"] = [engine_flags(a) for a in df["argv"]]
    df["flags_but_eager"] = [engine_flags(a, drop_eager=True) for a in df["argv"]]
    df["infra"] = df["failure"].eq(INFRA).fillna(False).astype(bool)
    return df


def key_columns(without: tuple[str, ...] = ()) -> list[str]:
    """Every column that defines a configuration (group by all of them), less those a summary spreads out."""
    return [c for c, _ in DIMENSIONS if c not in without] + [c for c in GRID if c not in without]


def varying(df: pd.DataFrame, without: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """The (column, name) parts beyond the grid that take more than one value in these rows."""
    if df.empty:
        return []
    return [(c, name) for c, name in DIMENSIONS if c not in without and c in df and df[c].nunique() > 1]


def variant(df: pd.DataFrame, without: tuple[str, ...] = ()) -> tuple[str, pd.Series]:
    """(column heading, label per row) naming the parts that vary in these rows; ("", "") where none does."""
    parts = varying(df, without)
    if not parts:
        return "", pd.Series([""] * len(df), index=df.index, dtype=object)
    labels = df[[c for c, _ in parts]].astype(str).agg(", ".join, axis=1)
    return ", ".join(name for _, name in parts), labels


def with_variant(df: pd.DataFrame, table: pd.DataFrame, rows: pd.Series | None = None) -> pd.DataFrame:
    """table (whose rows were built from df's groups) with a first column naming the variant, when one varies.

    `rows`: the variant label of each table row (already computed by the caller from its groups)."""
    heading, _ = variant(df)
    if not heading or rows is None:
        return table
    out = table.copy()
    out.insert(0, heading, list(rows))
    return out


def usable(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that are trials of the server: lost attempts (infrastructure) left out."""
    return df[~df["infra"]] if "infra" in df else df


def lost(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["infra"]] if "infra" in df else df.iloc[0:0]
