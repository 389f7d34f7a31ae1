"""Which knob stops vLLM from starting: main effects, interactions and a verdict per hypothesis.

Pure (pandas only): reads records, never launches or writes anything. The plan's 04_hypotheses step is a
2^3 factorial: launcher {legacy, head} x max_model_len {low, high} x memory setting {low, high}, where the
memory setting is gpu_memory_utilization when set, else the KV budget (kv_cache_memory_bytes, CPU demo).
A trial "starts" when its outcome is ready; a cell's value is the share of its trials that started.
Missing cells are never guessed: an effect or hypothesis that needs them is reported as not tested.
"""

from __future__ import annotations

from itertools import combinations, product

import pandas as pd

from vllm_lab.record import FIELDS

FACTORIAL_STEP = "04_hypotheses"
FACTORS = ("launcher", "max_model_len", "memory")
LAUNCHER_LEVELS = ("legacy", "head")
HYPOTHESES = {
    "H1": "the --quantization flag (legacy launcher) is needed",
    "H2": "the larger max_model_len (22256 tokens or more) is too much",
    "H3": "the higher memory setting (util 0.95) is too much",
    "H4": "only a combination of knobs fails",
}
# hypothesis -> (factor, the level that should work, the level that should fail), as coded indices
_KNOB_HYPOTHESES = {"H1": ("launcher", 0, 1), "H2": ("max_model_len", 0, 1), "H3": ("memory", 0, 1)}


# ---- derived columns ---------------------------------------------------------------------------------


def prepare(records) -> pd.DataFrame:
    """Records (list of dicts or a DataFrame) -> DataFrame with every field plus memory and success columns."""
    df = records.copy() if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    for name in FIELDS:
        if name not in df.columns:
            df[name] = None
    df["memory_kind"] = [
        _memory_kind(u, kv)
        for u, kv in zip(df["gpu_memory_utilization"], df["kv_cache_memory_bytes"], strict=True)
    ]
    df["memory_setting"] = [
        _memory_value(u, kv)
        for u, kv in zip(df["gpu_memory_utilization"], df["kv_cache_memory_bytes"], strict=True)
    ]
    df["memory_label"] = [
        memory_label(k, v) for k, v in zip(df["memory_kind"], df["memory_setting"], strict=True)
    ]
    df["started"] = df["outcome"].eq("ready")
    df["stable"] = df["started"] & df["long_request_ok"].map(lambda v: v is True)
    return df


def _known(v) -> bool:
    return v is not None and not (isinstance(v, float) and pd.isna(v))


def _memory_kind(util, kv) -> str | None:
    if _known(util):
        return "util"
    return "kv" if _known(kv) else None


def _memory_value(util, kv) -> float | None:
    if _known(util):
        return float(util)
    return float(kv) if _known(kv) else None


def memory_label(kind: str | None, value: float | None) -> str:
    """'util 0.85', 'KV 12 MiB', or 'default' when neither knob was set."""
    if kind == "util":
        return f"util {value:g}"
    if kind == "kv":
        gib = value / 2**30
        return f"KV {gib:.3g} GiB" if gib >= 1 else f"KV {value / 2**20:.4g} MiB"
    return "default"


def memory_axis_name(kind: str | None) -> str:
    return "gpu_memory_utilization" if kind == "util" else "KV budget (kv_cache_memory_bytes)"


# ---- the factorial -----------------------------------------------------------------------------------


def factorial_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the 2^3 design: the 04_hypotheses step when present, else every non-search row."""
    df = prepare(df) if "memory_kind" not in df.columns else df
    step = df["step"].astype("string")
    rows = df[step.eq(FACTORIAL_STEP).fillna(False)]
    if rows.empty:
        rows = df[~step.str.contains("search", na=False)]
    rows = rows[
        rows["launcher"].isin(LAUNCHER_LEVELS) & rows["max_model_len"].notna() & rows["memory_kind"].notna()
    ]
    if rows.empty:
        return rows
    dominant = rows["memory_kind"].mode().iloc[0]  # util and KV budgets are not one axis
    return rows[rows["memory_kind"].eq(dominant)]


def design_levels(rows: pd.DataFrame) -> dict[str, tuple | None]:
    """Each factor's (low, high) levels, or None when the data holds only one level of it."""
    out: dict[str, tuple | None] = {}
    present = set(rows["launcher"])
    out["launcher"] = LAUNCHER_LEVELS if set(LAUNCHER_LEVELS) <= present else None
    for factor, column in (("max_model_len", "max_model_len"), ("memory", "memory_setting")):
        values = sorted(set(rows[column].dropna()))
        out[factor] = (values[0], values[-1]) if len(values) >= 2 else None
    return out


def cells(records) -> pd.DataFrame:
    """One row per observed cell of the design: coded levels (0 low, 1 high), trials, share started, failures."""
    rows = factorial_rows(prepare(records) if not isinstance(records, pd.DataFrame) else records)
    levels = design_levels(rows)
    if rows.empty:
        return pd.DataFrame(
            columns=["launcher", "max_model_len", "memory", "memory_label", "trials", "rate", "failures"]
        )
    coded = rows.assign(
        launcher_i=rows["launcher"].map(_coder(levels["launcher"])),
        len_i=rows["max_model_len"].map(_coder(levels["max_model_len"])),
        mem_i=rows["memory_setting"].map(_coder(levels["memory"])),
    ).dropna(subset=["launcher_i", "len_i", "mem_i"])
    grouped = coded.groupby(["launcher_i", "len_i", "mem_i"], sort=True)
    return grouped.apply(_cell_summary, include_groups=False).reset_index()


def _coder(level_pair: tuple | None):
    """value -> 0/1 for the two design levels; a factor with one level is coded 0 everywhere."""
    if level_pair is None:
        return lambda v: 0
    return lambda v: {level_pair[0]: 0, level_pair[1]: 1}.get(v)


def _cell_summary(g: pd.DataFrame) -> pd.Series:
    failures = [str(f) for f in g["failure"].where(g["failure"].notna(), g["outcome"]) if f != "ready"]
    return pd.Series(
        {
            "launcher": g["launcher"].iloc[0],
            "max_model_len": int(g["max_model_len"].iloc[0]),
            "memory": g["memory_setting"].iloc[0],
            "memory_label": g["memory_label"].iloc[0],
            "trials": len(g),
            "rate": float(g["started"].mean()),
            "failures": ", ".join(sorted(set(failures))),
        }
    )


def _grid(cell_df: pd.DataFrame) -> dict[tuple[int, int, int], pd.Series]:
    return {(int(r.launcher_i), int(r.len_i), int(r.mem_i)): r for r in cell_df.itertuples(index=False)}


# ---- effects -----------------------------------------------------------------------------------------


def effects(records) -> pd.DataFrame:
    """Main effects (high minus low level, over paired cells) and two-/three-way interactions.

    An interaction is a difference of differences of the share started, averaged over the levels of the
    remaining factor where all four cells exist; n counts the pairs (main) or 2x2 squares (two-way) used.
    """
    design = factorial_rows(_as_frame(records))
    levels = design_levels(design)
    names = _level_names(design, levels)
    grid = _grid(cells(records))
    rows = [
        _main_effect(grid, i, levels[f]) | {"effect": f, "levels": names[f]} for i, f in enumerate(FACTORS)
    ]
    for a, b in combinations(range(3), 2):
        rows.append(_two_way(grid, a, b) | {"effect": f"{FACTORS[a]} x {FACTORS[b]}"})
    rows.append(_three_way(grid) | {"effect": " x ".join(FACTORS)})
    cols = ["effect", "levels", "rate_low", "rate_high", "value", "n"]
    return pd.DataFrame(rows).reindex(columns=cols)


def _as_frame(records) -> pd.DataFrame:
    return (
        records
        if isinstance(records, pd.DataFrame) and "memory_kind" in records.columns
        else prepare(records)
    )


def _index(factor_i: int, level: int, others: tuple[int, int]) -> tuple[int, int, int]:
    idx = list(others)
    idx.insert(factor_i, level)
    return tuple(idx)


def _pairs(grid: dict, factor_i: int) -> list[tuple[tuple[int, int], object, object]]:
    """(levels of the other two factors, low cell, high cell) wherever both cells were observed."""
    out = []
    for others in product((0, 1), repeat=2):
        low, high = grid.get(_index(factor_i, 0, others)), grid.get(_index(factor_i, 1, others))
        if low is not None and high is not None:
            out.append((others, low, high))
    return out


def _main_effect(grid: dict, factor_i: int, level_pair: tuple | None) -> dict:
    pairs = _pairs(grid, factor_i) if level_pair else []
    if not pairs:
        return {"rate_low": None, "rate_high": None, "value": None, "n": 0}
    low = sum(p[1].rate for p in pairs) / len(pairs)
    high = sum(p[2].rate for p in pairs) / len(pairs)
    return {"rate_low": low, "rate_high": high, "value": high - low, "n": len(pairs)}


def _level_names(design: pd.DataFrame, levels: dict) -> dict[str, str]:
    """'legacy -> head', '16384 -> 22256', 'util 0.85 -> util 0.95' (or 'one level only')."""
    kind = design["memory_kind"].iloc[0] if not design.empty else None
    fmt = {
        "launcher": str,
        "max_model_len": lambda v: str(int(v)),
        "memory": lambda v: memory_label(kind, v),
    }
    return {f: " -> ".join(map(fmt[f], levels[f])) if levels[f] else "one level only" for f in FACTORS}


def _square(grid: dict, a: int, b: int, c_level: int) -> list | None:
    """The four cells (00, 10, 01, 11 in factors a, b) at one level of the third factor, or None."""
    c = ({0, 1, 2} - {a, b}).pop()
    out = []
    for ia, ib in ((0, 0), (1, 0), (0, 1), (1, 1)):
        idx = [0, 0, 0]
        idx[a], idx[b], idx[c] = ia, ib, c_level
        cell = grid.get(tuple(idx))
        if cell is None:
            return None
        out.append(cell)
    return out


def _dod(square: list) -> float:
    y00, y10, y01, y11 = (cell.rate for cell in square)
    return (y11 - y01) - (y10 - y00)


def _two_way(grid: dict, a: int, b: int) -> dict:
    dods = [_dod(sq) for lvl in (0, 1) if (sq := _square(grid, a, b, lvl)) is not None]
    value = sum(dods) / len(dods) if dods else None
    return {"levels": "difference of differences", "value": value, "n": len(dods)}


def _three_way(grid: dict) -> dict:
    squares = [_square(grid, 0, 1, lvl) for lvl in (0, 1)]
    if any(sq is None for sq in squares):
        return {"levels": "difference of two-way interactions", "value": None, "n": 0}
    return {
        "levels": "difference of two-way interactions",
        "value": _dod(squares[1]) - _dod(squares[0]),
        "n": 1,
    }


# ---- verdicts ----------------------------------------------------------------------------------------


def verdicts(records) -> pd.DataFrame:
    """One row per hypothesis H1..H4: verdict (supported / refuted / not tested) and a one-line reason."""
    frame = _as_frame(records)
    grid = _grid(cells(frame))
    levels = design_levels(factorial_rows(frame))
    rows = [_knob_verdict(h, grid, levels) for h in _KNOB_HYPOTHESES]
    rows.append(_combination_verdict(grid))
    return pd.DataFrame(rows, columns=["id", "hypothesis", "verdict", "reason"])


def _describe(cell) -> str:
    state = "started" if cell.rate == 1 else ("failed" if cell.rate == 0 else f"started {cell.rate:.0%}")
    why = f" ({cell.failures})" if cell.failures else ""
    return f"{cell.launcher}, len {cell.max_model_len}, {cell.memory_label}: {state}{why}"


def _knob_verdict(hid: str, grid: dict, levels: dict) -> dict:
    factor, good, bad = _KNOB_HYPOTHESES[hid]
    base = {"id": hid, "hypothesis": HYPOTHESES[hid]}
    factor_i = FACTORS.index(factor)
    if levels[factor] is None:
        return base | {"verdict": "not tested", "reason": f"the data holds fewer than two {factor} levels"}
    pairs = [(p[1 + good], p[1 + bad]) for p in _pairs(grid, factor_i)]
    informative = [(g, b) for g, b in pairs if max(g.rate, b.rate) > 0]
    if not informative:
        why = (
            "no cell pair differing only in " + factor
            if not pairs
            else f"nothing started in any of {len(pairs)} pairs"
        )
        return base | {"verdict": "not tested", "reason": why}
    hits = [(g, b) for g, b in informative if g.rate > b.rate]
    if hits:
        g, b = hits[0]
        reason = f"{len(hits)} of {len(pairs)} pairs: {_describe(g)} but {_describe(b)}"
        return base | {"verdict": "supported", "reason": reason}
    g, b = max(informative, key=lambda pair: pair[1].rate - pair[0].rate)  # the most telling pair
    n_good, n_bad = (sum(cell.rate > 0 for cell in side) for side in zip(*pairs, strict=True))
    good_name, bad_name = _level_of(g, factor), _level_of(b, factor)
    reason = (
        f"{good_name} started in {n_good} of {len(pairs)} pairs, {bad_name} in {n_bad}; {bad_name} never "
        f"failed where {good_name} started, e.g. {_describe(b)}; {_describe(g)}"
    )
    return base | {"verdict": "refuted", "reason": reason}


def _level_of(cell, factor: str) -> str:
    if factor == "launcher":
        return f"the {cell.launcher} launcher"
    return f"max_model_len {cell.max_model_len}" if factor == "max_model_len" else cell.memory_label


def _combination_verdict(grid: dict) -> dict:
    base = {"id": "H4", "hypothesis": HYPOTHESES["H4"]}
    squares = [
        (a, b, sq)
        for a, b in combinations(range(3), 2)
        for lvl in (0, 1)
        if (sq := _square(grid, a, b, lvl)) is not None
    ]
    if not squares:
        return base | {"verdict": "not tested", "reason": "no complete 2x2 square of cells to compare"}
    for a, b, sq in squares:
        rates = [cell.rate for cell in sq]
        if sorted(rates) == [0, 1, 1, 1]:
            k = rates.index(0)  # the failing corner; its single-change neighbours are k^1 and k^2
            reason = (
                f"{FACTORS[a]} x {FACTORS[b]} interaction {_dod(sq):+.2f}: {_describe(sq[k])}, "
                f"while {_describe(sq[k ^ 1])} and {_describe(sq[k ^ 2])}"
            )
            return base | {"verdict": "supported", "reason": reason}
    mean = {}
    for a, b, sq in squares:
        mean.setdefault(f"{FACTORS[a]} x {FACTORS[b]}", []).append(_dod(sq))
    values = ", ".join(f"{name} {sum(v) / len(v):+.2f}" for name, v in mean.items())
    reason = (
        f"in {len(squares)} complete 2x2 squares no failure needs two changes together; "
        f"each follows from one knob (interactions: {values})"
    )
    return base | {"verdict": "refuted", "reason": reason}
