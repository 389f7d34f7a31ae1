"""Seaborn figures of a run's trials, saved as PNG (Agg canvas; nothing is ever shown).

Each `<name>_figure(df)` returns a matplotlib Figure or None when there is nothing to plot; each
`plot_<name>(df, path)` saves that figure and returns the path (or None). Measured, predicted and fake
figures never look alike: filled markers are measurements, hollow dashed ones predictions, x markers and
hatching the fake backend (a test double).
Figures are built without pyplot on an Agg canvas of their own, so importing this module never changes the
process's matplotlib backend. Without pyplot no `%matplotlib inline` registers an image formatter, so
importing this module in a kernel registers one (a figure cell's output is image/png, not only the text
`<Figure size ...>`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from vllm_lab import configs
from vllm_lab.hypotheses import memory_axis_name, prepare
from vllm_lab.record import gpu_residency

OUTCOME_COLORS = {"ready": "#2a9d47", "failed": "#d1372c", "timeout": "#e08a1e", "unstable": "#8a4fbf"}
# The outcome grid's cell colours: a clean start, each way of not starting cleanly, and trials that disagree.
GRID_COLORS = {**OUTCOME_COLORS, "mixed": "#f2d64b"}
GRID_WORDS = {"ready": "ready (every trial)", "unstable": "unstable (came up, then failed)",
              "failed": "failed to start", "timeout": "timeout", "mixed": "trials disagree"}  # fmt: skip
FAKE = "fake"
FAKE_LABEL = "fake backend (test double)"
PREDICTED_LABEL = "predicted (memory model, not measured)"
VLLM_ESTIMATE_LABEL = "vLLM's estimate on a failed start"
SEARCH_LABEL = "largest stable max_model_len (search)"
DPI = 110


def figure_png(fig: Figure) -> bytes:
    """The PNG bytes of a figure, as saved (same DPI and tight box)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def register_png_formatter() -> bool:
    """In an IPython kernel, show every matplotlib Figure as image/png; False outside IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    shell.display_formatter.formatters["image/png"].for_type(Figure, figure_png)
    return True


def prepared_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Prepared records less lost Ray attempts (infrastructure: no trial of the server, drawn nowhere)."""
    return configs.usable(df if "memory_kind" in df.columns else prepare(df))


def variant_labels(df: pd.DataFrame) -> pd.Series:
    """Per row, the model / install / flags that tell it apart where the run has several ("" otherwise)."""
    return configs.variant(df)[1]


def new_figure(figsize: tuple[float, float]):
    """A figure on its own Agg canvas (no pyplot state, nothing to close) and its one axes."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def save_figure(fig: Figure | None, path: str | Path) -> Path | None:
    if fig is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def is_fake(rows: pd.DataFrame) -> pd.Series:
    """Which rows came from the fake backend (a test double)."""
    return rows["backend"].eq(FAKE).fillna(False).astype(bool)


def fake_suffix(rows: pd.DataFrame) -> str:
    fake = is_fake(rows)
    if len(rows) and fake.all():
        return "  [FAKE backend: test double, not a measurement]"
    return "  [includes fake-backend rows]" if fake.any() else ""


# ---- (a) outcome grid --------------------------------------------------------------------------------


def grid_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Trials placed on the launcher x max_model_len x memory grid (search-step launches excluded if others exist)."""
    df = prepared_frame(df)
    df = df.assign(variant=variant_labels(df))
    rows = df[df["launcher"].notna() & df["max_model_len"].notna()]
    plain = rows[~rows["step"].astype("string").str.contains("search", na=False)]
    return plain if not plain.empty else rows


def row_label(rows: pd.DataFrame, sep: str = " · ") -> pd.Series:
    """A grid row's name: the model (install, ...) where the run has several, the launcher, the length."""
    base = rows["launcher"].astype(str) + sep + "len " + rows["max_model_len"].astype(int).astype(str)
    return (rows["variant"] + sep).where(rows["variant"].ne(""), "") + base


def cell_kind(g: pd.DataFrame) -> str:
    """ready only where every trial came up cleanly; unstable (up, then failed) never looks like it."""
    kinds = set(g["outcome"])
    return kinds.pop() if len(kinds) == 1 and next(iter(kinds)) in OUTCOME_COLORS else "mixed"


def cell_text(g: pd.DataFrame) -> str:
    """A grid cell's words: ready or the commonest failure kind, how many started, (fake)."""
    ready = int(g["started"].sum())
    # a start partly on the CPU (Ollama) is named, not plain "ready"
    said = [f if isinstance(f, str) else (gpu_residency(r) or r["outcome"])
            for f, r in zip(g["failure"], g.to_dict("records"), strict=True)]  # fmt: skip
    kinds = [str(f) for f in said if f != "ready"]
    text = "ready" if not kinds else max(set(kinds), key=kinds.count)
    if len(g) > 1:
        text += f"\n{ready}/{len(g)} ready"
    if is_fake(g).any():
        text += "\n(fake)"
    return text


def outcome_grid_figure(df: pd.DataFrame) -> Figure | None:
    rows = grid_rows(df)
    if rows.empty:
        return None
    rows = rows.assign(row=row_label(rows))
    col_order = rows.sort_values("memory_setting", na_position="first")["memory_label"].unique()
    row_order = rows.sort_values(["variant", "launcher", "max_model_len"])["row"].unique()
    kinds = list(GRID_COLORS)
    cell_kinds = rows.groupby(["row", "memory_label"]).apply(cell_kind, include_groups=False)
    codes = pd.DataFrame(
        [[kinds.index(cell_kinds[(r, c)]) if (r, c) in cell_kinds else np.nan for c in col_order]
         for r in row_order], index=row_order, columns=col_order, dtype=float,
    )  # fmt: skip
    texts = rows.groupby(["row", "memory_label"]).apply(cell_text, include_groups=False)
    annot = np.array([[texts.get((r, c), "not run") for c in col_order] for r in row_order], dtype=object)
    width = max(len(str(r)) for r in row_order) * 0.07
    fig, ax = new_figure((2.6 * len(col_order) + 2.5 + width, 0.75 * len(row_order) + 1.6))
    ax.set_facecolor("#eeeeee")
    sns.heatmap(
        codes,
        ax=ax,
        cmap=ListedColormap([GRID_COLORS[k] for k in kinds]),
        vmin=-0.5,
        vmax=len(kinds) - 0.5,
        linewidths=1,
        linecolor="white",
        cbar=False,
    )
    for (i, j), text in np.ndenumerate(annot):
        color = "white" if codes.iat[i, j] in (kinds.index("failed"), kinds.index("unstable")) else "black"
        ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=8, color=color)
    seen = [k for k in kinds if kinds.index(k) in set(codes.stack())]
    handles = [Patch(color=GRID_COLORS[k], label=GRID_WORDS[k]) for k in seen]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), title="cell")
    heading = configs.variant(prepared_frame(df))[0]
    ax.set(xlabel="memory setting", ylabel=(f"{heading} · " if heading else "") + "launcher · max_model_len")
    ax.set_title(
        "Outcome per configuration (cell text: outcome or failure kind)" + fake_suffix(rows), fontsize=10
    )
    return fig


def plot_outcome_grid(df: pd.DataFrame, path: str | Path) -> Path | None:
    return save_figure(outcome_grid_figure(df), path)


# ---- (b) capacity against memory setting -------------------------------------------------------------


def _memory_x(rows: pd.DataFrame) -> pd.Series:
    """x values: utilization as is, KV budgets in MiB."""
    scale = 1.0 if rows["memory_kind"].eq("util").all() else 2**20
    return rows["memory_setting"].astype(float) / scale


def _largest_stable(rows: pd.DataFrame) -> pd.DataFrame:
    stable = rows[rows["stable"] & rows["step"].astype("string").str.contains("search", na=False)]
    return stable.groupby(["variant", "x"], as_index=False)["max_model_len"].max()


def _named(label: str, variant: str) -> str:
    return f"{label}, {variant}" if variant else label


# One colour per model (install, ...) in the capacity figure; none of them the estimate's orange.
VARIANT_COLORS = ("#1f77b4", "#9467bd", "#2a9d47", "#8c564b", "#17becf", "#e377c2", "#7f7f7f")


def _variant_color(rows: pd.DataFrame, variant: str, default: str) -> str:
    if not variant:
        return default
    return VARIANT_COLORS[sorted(set(rows["variant"])).index(variant) % len(VARIANT_COLORS)]


def _dodge(x: pd.Series) -> float:
    """A small x offset so series at the same memory setting sit side by side instead of on top of each other."""
    span = float(x.max() - x.min()) or abs(float(x.max())) or 1.0
    return span * 0.025


def capacity_figure(df: pd.DataFrame) -> Figure | None:
    """Measured kv_cache_tokens (filled), predictions (hollow, dashed), fake (x), vLLM's estimate, search result."""
    df = prepared_frame(df)
    rows = df[df["memory_kind"].notna()]
    if rows.empty:
        return None
    kind = rows["memory_kind"].mode().iloc[0]
    rows = rows[rows["memory_kind"].eq(kind)]
    rows = rows.assign(x=_memory_x(rows), variant=variant_labels(rows))
    d = _dodge(rows["x"])
    fig, ax = new_figure((7.5, 4.8))
    drawn = _draw_measured(ax, rows, -d) + _draw_predicted(ax, rows) + _draw_estimates(ax, rows, d)
    stable = _largest_stable(rows)
    for variant, g in stable.groupby("variant", sort=True):
        color = _variant_color(rows, variant, "#1f4e9c")
        ax.plot(g["x"] + 2 * d, g["max_model_len"], "s", color=color, markersize=8,
                label=_named(SEARCH_LABEL, variant))  # fmt: skip
        drawn += 1
    if not drawn:
        return None
    ax.set(xlabel=memory_axis_name(kind) + ("" if kind == "util" else " in MiB"), ylabel="tokens")
    ax.set_xlim(rows["x"].min() - 6 * d, rows["x"].max() + 6 * d)
    ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.15)
    ax.set_title("KV capacity against memory setting" + fake_suffix(rows), fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def _draw_measured(ax, rows: pd.DataFrame, dx: float) -> int:
    measured = rows[rows["kv_cache_tokens"].notna()]
    groups = measured.groupby([measured["variant"], measured["backend"].fillna("unknown")])
    for (variant, backend), g in groups:
        if backend == FAKE:
            ax.plot(g["x"] + dx, g["kv_cache_tokens"], "x", color=_variant_color(rows, variant, "#777777"),
                    markersize=9, mew=2, label=_named(FAKE_LABEL, variant))  # fmt: skip
        else:
            ax.plot(g["x"] + dx, g["kv_cache_tokens"], "o", color=_variant_color(rows, variant, "#2a9d47"),
                    markersize=8, label=_named(f"measured ({backend})", variant))  # fmt: skip
    return groups.ngroups if not measured.empty else 0


def _draw_predicted(ax, rows: pd.DataFrame) -> int:
    pred = rows[rows["predicted_kv_cache_tokens"].notna()][
        ["variant", "x", "predicted_kv_cache_tokens"]
    ].drop_duplicates()
    if pred.empty:
        return 0
    for variant, g in pred.groupby("variant", sort=True):  # one model's prediction is not another's
        g = g.groupby("x", as_index=False)["predicted_kv_cache_tokens"].mean().sort_values("x")
        color = _variant_color(rows, variant, "#555555")
        ax.plot(g["x"], g["predicted_kv_cache_tokens"], "o--", mfc="none", color=color, markersize=8,
                label=_named(PREDICTED_LABEL, variant))  # fmt: skip
    return 1


def _draw_estimates(ax, rows: pd.DataFrame, dx: float) -> int:
    est = rows[rows["estimated_max_model_len"].notna()]
    if est.empty:
        return 0
    ax.plot(
        est["x"] + dx,
        est["estimated_max_model_len"],
        "^",
        color="#e08a1e",
        markersize=8,
        label=VLLM_ESTIMATE_LABEL,
    )
    return 1


def plot_capacity(df: pd.DataFrame, path: str | Path) -> Path | None:
    return save_figure(capacity_figure(df), path)


# ---- (c) seconds to outcome --------------------------------------------------------------------------


def seconds_figure(df: pd.DataFrame) -> Figure | None:
    df = prepared_frame(df)
    rows = df[df["seconds_to_outcome"].notna()].reset_index(drop=True)
    if rows.empty:
        return None
    fig, ax = new_figure((8, 0.32 * len(rows) + 1.6))
    colors = [OUTCOME_COLORS.get(o, "#999999") for o in rows["outcome"]]
    fake = is_fake(rows)
    bars = ax.barh(
        range(len(rows)), rows["seconds_to_outcome"].astype(float), color=colors, edgecolor="black"
    )
    for bar, faked in zip(bars, fake, strict=True):
        bar.set_hatch("//" if faked else "")
    names = [
        f"{t} ({v})" if v else str(t) for t, v in zip(rows["trial_id"], variant_labels(rows), strict=True)
    ]
    ax.set_yticks(range(len(rows)), names, fontsize=8)  # which model (install, ...) where the run has several
    ax.invert_yaxis()
    handles = [Patch(color=OUTCOME_COLORS[o], label=o) for o in OUTCOME_COLORS if o in set(rows["outcome"])]
    if fake.any():
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label=FAKE_LABEL))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set(xlabel="seconds to outcome (ready, failure or timeout)", ylabel="trial (in run order)")
    ax.set_title("Seconds to outcome per trial" + fake_suffix(rows), fontsize=10)
    return fig


def plot_seconds(df: pd.DataFrame, path: str | Path) -> Path | None:
    return save_figure(seconds_figure(df), path)


# ---- (d) GPU memory timeline -------------------------------------------------------------------------


def timeline_points(value) -> np.ndarray | None:
    """A record's gpu_memory_timeline as an (n, 2) array of (seconds, MiB); None when it has none."""
    if not isinstance(value, list | tuple) or not value:
        return None
    points = np.asarray([p for p in value if isinstance(p, list | tuple) and len(p) >= 2], dtype=float)
    return points if len(points) else None


def timeline_figure(df: pd.DataFrame) -> Figure | None:
    df = prepared_frame(df)
    series = [
        (r, t)
        for r, t in zip(
            df.itertuples(index=False), map(timeline_points, df["gpu_memory_timeline"]), strict=True
        )
        if t is not None
    ]
    if not series:
        return None
    fig, ax = new_figure((8, 4.5))
    for rec, points in series:
        style = {"ls": ":", "marker": "x"} if rec.backend == FAKE else {"ls": "-"}
        label = f"{rec.trial_id} ({rec.outcome}{', fake' if rec.backend == FAKE else ''})"
        ax.plot(points[:, 0], points[:, 1], label=label, **style)
    total = pd.to_numeric(df["gpu_total_mib"], errors="coerce").max()
    if pd.notna(total):
        ax.axhline(total, color="black", lw=1, ls="--", label=f"GPU total {total:.0f} MiB")
    ax.set(xlabel="seconds since launch", ylabel="GPU memory used (MiB)")
    ax.set_title("GPU memory while starting (NVML samples)" + fake_suffix(df), fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return fig


def plot_timeline(df: pd.DataFrame, path: str | Path) -> Path | None:
    return save_figure(timeline_figure(df), path)


# ---- (e) search trajectory ---------------------------------------------------------------------------


def search_rows(df: pd.DataFrame) -> pd.DataFrame:
    df = prepared_frame(df)
    df = df.assign(variant=variant_labels(df))
    rows = df[df["step"].astype("string").str.contains("search", na=False) & df["max_model_len"].notna()]
    keys = ["variant", "launcher", "memory_label"]  # one search per model (install, ...), launcher and memory
    return rows.assign(launch=rows.groupby(keys, dropna=False).cumcount() + 1)


def search_figure(df: pd.DataFrame) -> Figure | None:
    rows = search_rows(df)
    if rows.empty:
        return None
    fig, ax = new_figure((7.5, 4.5))
    for (variant, launcher, mem), g in rows.groupby(["variant", "launcher", "memory_label"], dropna=False):
        ax.plot(g["launch"], g["max_model_len"], "-", color="#aaaaaa", zorder=1)
        ax.annotate(
            _named(f"{launcher}, {mem}", variant),
            (g["launch"].iloc[-1], g["max_model_len"].iloc[-1]),
            fontsize=8,
            xytext=(6, 0),
            textcoords="offset points",
        )
    _search_markers(ax, rows)
    ax.set(xlabel="launch number", ylabel="max_model_len")
    ax.set_xticks(sorted(rows["launch"].unique()))
    ax.set_xlim(0.5, rows["launch"].max() + 1.2)  # room for the series labels
    ax.set_title("Search for the largest stable max_model_len" + fake_suffix(rows), fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return fig


def _search_markers(ax, rows: pd.DataFrame) -> None:
    kinds = {
        "stable (long request ok)": (rows["stable"], "o", OUTCOME_COLORS["ready"]),
        "started, long request not ok": (rows["started"] & ~rows["stable"], "D", OUTCOME_COLORS["timeout"]),
        "failed to start": (~rows["started"], "X", OUTCOME_COLORS["failed"]),
    }
    for label, (mask, marker, color) in kinds.items():
        g = rows[mask]
        if not g.empty:
            ax.scatter(
                g["launch"], g["max_model_len"], marker=marker, color=color, s=70, zorder=2, label=label
            )


def plot_search(df: pd.DataFrame, path: str | Path) -> Path | None:
    return save_figure(search_figure(df), path)


# ---- (f) preflight: predicted capacity against gpu_memory_utilization (no records: nothing launched) ---


def preflight_figure(
    curve: pd.DataFrame | list[dict], title: str, model_max_len: int, observed: dict | None = None
) -> Figure | None:
    """predict.utilization_curve rows: predicted max_model_len and KV tokens (hollow, dashed), the overhead band,
    the model's own limit, and what vLLM printed on this card where model.yaml has it (filled: measured)."""
    c = pd.DataFrame(curve)
    if c.empty:
        return None
    c = c.sort_values("gpu_memory_utilization")
    x = c["gpu_memory_utilization"]
    fig, ax = new_figure((7.5, 4.5))
    ax.plot(
        x, c["max_model_len"], "o--", mfc="none", color="#1f4e9c", label="predicted largest max_model_len"
    )
    ax.plot(x, c["kv_cache_tokens"], "s:", mfc="none", color="#555555", label="predicted KV cache tokens")
    if (c["low"] != c["high"]).any():
        ax.fill_between(x, c["low"], c["high"], color="#1f4e9c", alpha=0.15, label="band (unknown overhead)")
    ax.axhline(model_max_len, ls="--", color="gray", lw=1, label=f"model limit {model_max_len:,}")
    if observed and observed.get("kv_cache_tokens") and observed.get("gpu_memory_utilization"):
        ax.plot(observed["gpu_memory_utilization"], observed["kv_cache_tokens"], "o", color="#2a9d47",
                markersize=9, label=f"measured on this card: {observed['kv_cache_tokens']:,} KV tokens")  # fmt: skip
    ax.set(xlabel="gpu_memory_utilization", ylabel="tokens")
    ax.set_ylim(bottom=0, top=max(c["high"].max(), c["kv_cache_tokens"].max(), model_max_len) * 1.15)
    ax.set_title(f"{title}: predicted capacity", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return fig


PLOTS = {
    "outcome_grid": plot_outcome_grid,
    "capacity": plot_capacity,
    "seconds_to_outcome": plot_seconds,
    "gpu_memory_timeline": plot_timeline,
    "search_trajectory": plot_search,
}


def write_plots(df: pd.DataFrame, plots_dir: str | Path) -> dict[str, Path | None]:
    """Every figure as plots_dir/<name>.png; None for a figure with nothing to plot."""
    return {name: fn(df, Path(plots_dir) / f"{name}.png") for name, fn in PLOTS.items()}


register_png_formatter()
