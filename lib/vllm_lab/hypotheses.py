"""Which knob stops vLLM from starting: main effects, interactions and a verdict per hypothesis.

Pure (pandas only): reads records, never launches or writes anything. The plan's 04_hypotheses step is a
2^k factorial: launcher {legacy, head} x max_model_len {low, high} x memory setting {low, high}, where the
memory setting is gpu_memory_utilization when set, else the KV budget (kv_cache_memory_bytes, CPU demo);
enforce_eager {False, True} joins as a fourth factor when the records hold both levels (issue 10: before
vLLM 0.21 CUDA-graph memory sat outside the budget, a likelier cause of a crash at a high utilization).
A trial "starts" when the server came up (outcome ready or unstable: the notes' question is "does it start";
whether it then served a full-length request is the separate `stable` column); a cell's value is the share of
its trials that started.
Missing cells are never guessed: an effect or hypothesis that needs them is reported as not tested.
"""

from __future__ import annotations

from itertools import combinations, product

import pandas as pd

from vllm_lab import configs
from vllm_lab.record import FIELDS, gpu_residency

FACTORIAL_STEP = "04_hypotheses"
FACTORS = ("launcher", "max_model_len", "memory")  # always in the design (one level: not tested)
OPTIONAL_FACTORS = ("enforce_eager",)  # in the design only when the records hold both levels
LAUNCHER_LEVELS = ("legacy", "head")
EAGER_FLAG = "--enforce-eager"
VERDICTS = ("supported", "mixed", "refuted", "not tested")
# Templates; {high}/{low} are the run's own levels (hypothesis_texts fills them).
HYPOTHESES = {
    "H1": "the --quantization flag (legacy launcher) is needed",
    "H2": "the larger max_model_len{levels} is too much",
    "H3": "the higher memory setting{levels} is too much",
    "H4": "only a combination of knobs fails",
    "H5": "CUDA-graph memory breaks the start (--enforce-eager starts where CUDA graphs fail)",
}
# hypothesis -> (factor, the coded level that should work, the coded level that should fail)
_KNOB_HYPOTHESES = {
    "H1": ("launcher", 0, 1),
    "H2": ("max_model_len", 0, 1),
    "H3": ("memory", 0, 1),
    "H5": ("enforce_eager", 1, 0),
}
_COLUMN = {"launcher": "launcher", "max_model_len": "max_model_len", "memory": "memory_setting",
           "enforce_eager": "enforce_eager"}  # fmt: skip
# A configuration's parts outside the factors (configs.DIMENSIONS, flags less --enforce-eager).
STRATUM_COLUMNS = ("model_name", "engine", "install_label", "gpu_type", "flags_but_eager")
_ORDER_WORDS = {2: "difference of differences", 3: "difference of two-way interactions"}


# ---- derived columns ---------------------------------------------------------------------------------


def prepare(records) -> pd.DataFrame:
    """Records (list of dicts or a DataFrame) -> DataFrame with every field plus memory and success columns."""
    df = records.copy() if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    for name in FIELDS:
        if name not in df.columns:
            df[name] = None
    limit = df["memory_limit"] if "memory_limit" in df else pd.Series([None] * len(df), index=df.index)
    knobs = list(zip(df["gpu_memory_utilization"], df["kv_cache_memory_bytes"], limit, strict=True))
    df["memory_kind"] = [_memory_kind(u, kv, lim) for u, kv, lim in knobs]
    df["memory_setting"] = [_memory_value(u, kv, lim) for u, kv, lim in knobs]
    df["memory_label"] = [
        memory_label(k, v) for k, v in zip(df["memory_kind"], df["memory_setting"], strict=True)
    ]
    # The recorded argv is what ran: --enforce-eager there (from extra args or the factor) is the level.
    df["enforce_eager"] = [isinstance(a, list | tuple) and EAGER_FLAG in a for a in df["argv"]]
    configs.add_columns(
        df
    )  # model, engine, install, GPU type, flags: one configuration key for every summary
    df["started"] = df["outcome"].isin(("ready", "unstable"))  # as search.started: the server came up
    # as search.passes: a trial that ran a load (Trial.load) is stable only when the load was too
    load_ok = df["load_stable"].map(lambda v: v is not False)
    # and, as search.passes, with the model where it was meant to run (not partly on the CPU: Ollama)
    on_gpu = pd.Series([gpu_residency(r) is None for r in df.to_dict("records")], index=df.index, dtype=bool)
    df["stable"] = df["started"] & df["long_request_ok"].map(lambda v: v is True) & load_ok & on_gpu
    return df


def _known(v) -> bool:
    return v is not None and not (isinstance(v, float) and pd.isna(v))


def _memory_kind(util, kv, limit=None) -> str | None:
    if _known(util):
        return "util"
    if _known(kv):
        return "kv"
    return "limit" if _known(limit) else None  # an address-space limit on the server (a card's stand-in)


def _memory_value(util, kv, limit=None) -> float | None:
    for v in (util, kv, limit):
        if _known(v):
            return float(v)
    return None


def _bytes(value: float) -> str:
    gib = value / 2**30
    return f"{gib:.3g} GiB" if gib >= 1 else f"{value / 2**20:.4g} MiB"


def memory_label(kind: str | None, value: float | None) -> str:
    """'util 0.85', 'KV 12 MiB', 'limit 210 MiB' (the server's address space), or 'default' when none was set."""
    if kind == "util":
        return f"util {value:g}"
    if kind == "kv":
        return f"KV {_bytes(value)}"
    if kind == "limit":
        return f"limit {_bytes(value)}"
    return "default"


def memory_axis_name(kind: str | None) -> str:
    if kind == "limit":
        return "the server's memory limit (memory_limit_bytes)"
    return "gpu_memory_utilization" if kind == "util" else "KV budget (kv_cache_memory_bytes)"


# ---- the factorial -----------------------------------------------------------------------------------


def factorial_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the design: the 04_hypotheses step when present, else every non-search row."""
    df = prepare(df) if "memory_kind" not in df.columns else df
    step = df["step"].astype("string")
    rows = df[step.eq(FACTORIAL_STEP).fillna(False)]
    if rows.empty:
        rows = df[~step.str.contains("search", na=False)]
    rows = configs.usable(rows)  # a lost Ray attempt is no trial of the server
    rows = rows[
        rows["launcher"].isin(LAUNCHER_LEVELS) & rows["max_model_len"].notna() & rows["memory_kind"].notna()
    ]
    if rows.empty:
        return rows.assign(stratum=pd.Series(dtype=object))
    dominant = rows["memory_kind"].mode().iloc[0]  # util and KV budgets are not one axis
    rows = rows[rows["memory_kind"].eq(dominant)]
    return rows.assign(stratum=_strata(rows))


def _strata(rows: pd.DataFrame) -> pd.Series:
    """Per row, the parts of its configuration outside the design that vary in the run ("" where none):
    cells of different models, installs, engines, GPU types or other flags are never one cell."""
    parts = [c for c in STRATUM_COLUMNS if rows[c].nunique() > 1]
    if not parts:
        return pd.Series([""] * len(rows), index=rows.index, dtype=object)
    return rows[parts].astype(str).agg(", ".join, axis=1)


def design_factors(rows: pd.DataFrame) -> tuple[str, ...]:
    """The base three factors, plus each optional one the rows hold at two levels."""
    extra = tuple(f for f in OPTIONAL_FACTORS if not rows.empty and rows[_COLUMN[f]].nunique() >= 2)
    return FACTORS + extra


def design_levels(rows: pd.DataFrame) -> dict[str, tuple | None]:
    """Each factor's (low, high) levels, or None when the data holds only one level of it."""
    out: dict[str, tuple | None] = {}
    present = set(rows["launcher"])
    out["launcher"] = LAUNCHER_LEVELS if set(LAUNCHER_LEVELS) <= present else None
    for factor in ("max_model_len", "memory", *OPTIONAL_FACTORS):
        values = sorted(set(rows[_COLUMN[factor]].dropna())) if not rows.empty else []
        out[factor] = (values[0], values[-1]) if len(values) >= 2 else None
    return out


class _Design:
    """The factors in play, their levels, and the observed cells keyed by coded levels (0 low, 1 high)."""

    def __init__(self, records):
        frame = _as_frame(records)
        self.rows = factorial_rows(frame)
        self.factors = design_factors(self.rows)
        self.levels = design_levels(self.rows)
        self.kind = self.rows["memory_kind"].iloc[0] if not self.rows.empty else None
        self.cells = _cells(self.rows, self.factors, self.levels)
        self.strata = list(dict.fromkeys(self.cells["stratum"])) if not self.cells.empty else []
        self.grid = {
            (r.stratum, *(int(getattr(r, f"{f}_i")) for f in self.factors)): r
            for r in self.cells.itertuples()
        }

    @property
    def k(self) -> int:
        return len(self.factors)


def cells(records) -> pd.DataFrame:
    """One row per observed cell of the design: coded levels (0 low, 1 high), trials, share started, failures."""
    return _Design(records).cells.drop(
        columns=[f"{f}_i" for f in (*FACTORS, *OPTIONAL_FACTORS)], errors="ignore"
    )


def _cells(rows: pd.DataFrame, factors: tuple[str, ...], levels: dict) -> pd.DataFrame:
    keys = ["stratum", *(f"{f}_i" for f in factors)]
    cols = [*factors, "memory_label", "trials", "rate", "failures", "vllm_version"]
    if rows.empty:
        return pd.DataFrame(columns=[*keys, *cols])
    coded = rows.assign(**{f"{f}_i": rows[_COLUMN[f]].map(_coder(levels[f])) for f in factors}).dropna(
        subset=keys[1:]
    )
    if coded.empty:
        return pd.DataFrame(columns=[*keys, *cols])
    grouped = coded.groupby(keys, sort=True)
    out = grouped.apply(_cell_summary, include_groups=False).reset_index()
    return out.reindex(columns=[*keys, *cols])


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
            "enforce_eager": bool(g["enforce_eager"].iloc[0]),
            "memory_label": g["memory_label"].iloc[0],
            "trials": len(g),
            "rate": float(g["started"].mean()),
            "failures": ", ".join(sorted(set(failures))),
            "vllm_version": g["vllm_version"].dropna().iloc[0] if g["vllm_version"].notna().any() else None,
        }
    )


# ---- effects -----------------------------------------------------------------------------------------


def effects(records) -> pd.DataFrame:
    """Main effects (high minus low level, over paired cells) and every interaction of the design.

    An interaction of order m is the signed sum over its 2^m corners (a difference of differences for two
    factors), averaged over the levels of the remaining factors where all corners exist; n counts the
    pairs (main) or complete blocks (interactions) used.
    """
    d = _Design(records)
    names = _level_names(d)
    rows = [_main_effect(d, i) | {"effect": f, "levels": names[f]} for i, f in enumerate(d.factors)]
    for order in range(2, d.k + 1):
        for subset in combinations(range(d.k), order):
            rows.append(_interaction(d, subset) | {"effect": " x ".join(d.factors[i] for i in subset)})
    cols = ["effect", "levels", "rate_low", "rate_high", "value", "n"]
    return pd.DataFrame(rows).reindex(columns=cols)


def _as_frame(records) -> pd.DataFrame:
    return (
        records
        if isinstance(records, pd.DataFrame) and "memory_kind" in records.columns
        else prepare(records)
    )


def _index(k: int, fixed: dict[int, int], others: tuple) -> tuple:
    """A full cell key: the stratum (others[0]), then the `fixed` factor positions, the rest from others[1:]."""
    it = iter(others[1:])
    return (others[0], *(fixed[i] if i in fixed else next(it) for i in range(k)))


def _others(d: _Design, n: int) -> list[tuple]:
    """Every (stratum, levels of n other factors): pairs and squares compare cells within one stratum."""
    return [(s, *bits) for s in d.strata for bits in product((0, 1), repeat=n)]


def _pairs(d: _Design, factor_i: int) -> list[tuple[tuple[int, ...], object, object]]:
    """(levels of the other factors, low cell, high cell) wherever both cells were observed."""
    out = []
    for others in _others(d, d.k - 1):
        low = d.grid.get(_index(d.k, {factor_i: 0}, others))
        high = d.grid.get(_index(d.k, {factor_i: 1}, others))
        if low is not None and high is not None:
            out.append((others, low, high))
    return out


def _main_effect(d: _Design, factor_i: int) -> dict:
    pairs = _pairs(d, factor_i) if d.levels[d.factors[factor_i]] else []
    if not pairs:
        return {"rate_low": None, "rate_high": None, "value": None, "n": 0}
    low = sum(p[1].rate for p in pairs) / len(pairs)
    high = sum(p[2].rate for p in pairs) / len(pairs)
    return {"rate_low": low, "rate_high": high, "value": high - low, "n": len(pairs)}


def _level_text(d: _Design, factor: str, value) -> str:
    if factor == "max_model_len":
        return str(int(value))
    if factor == "memory":
        return memory_label(d.kind, value)
    if factor == "enforce_eager":
        return "eager" if value else "CUDA graphs"
    return str(value)


def _level_names(d: _Design) -> dict[str, str]:
    """'legacy -> head', '16384 -> 22256', 'util 0.85 -> util 0.95' (or 'one level only')."""
    return {
        f: " -> ".join(_level_text(d, f, v) for v in d.levels[f]) if d.levels[f] else "one level only"
        for f in d.factors
    }


def _block(d: _Design, subset: tuple[int, ...], others: tuple) -> list | None:
    """The 2^m cells (corner bits in subset order) at one level combination of the other factors, or None."""
    out = []
    for bits in product((0, 1), repeat=len(subset)):
        cell = d.grid.get(_index(d.k, dict(zip(subset, bits, strict=True)), others))
        if cell is None:
            return None
        out.append((bits, cell))
    return out


def _contrast(block: list) -> float:
    m = len(block[0][0])
    return sum((-1) ** (m - sum(bits)) * cell.rate for bits, cell in block)


def _blocks(d: _Design, subset: tuple[int, ...]) -> list[list]:
    found = (_block(d, subset, others) for others in _others(d, d.k - len(subset)))
    return [b for b in found if b is not None]


def _interaction(d: _Design, subset: tuple[int, ...]) -> dict:
    values = [_contrast(b) for b in _blocks(d, subset)]
    words = _ORDER_WORDS.get(len(subset), f"difference of {len(subset) - 1}-way interactions")
    return {"levels": words, "value": sum(values) / len(values) if values else None, "n": len(values)}


# ---- verdicts ----------------------------------------------------------------------------------------


def hypothesis_texts(records) -> dict[str, str]:
    """Each hypothesis in the run's own terms: 'the larger max_model_len (32768 vs 16384) is too much'."""
    d = records if isinstance(records, _Design) else _Design(records)
    out = {}
    for hid, text in HYPOTHESES.items():
        factor = {"H2": "max_model_len", "H3": "memory"}.get(hid)
        pair = d.levels.get(factor) if factor else None
        levels = f" ({_level_text(d, factor, pair[1])} vs {_level_text(d, factor, pair[0])})" if pair else ""
        out[hid] = text.format(levels=levels)
    return out


def verdicts(records) -> pd.DataFrame:
    """One row per hypothesis: verdict (supported / mixed / refuted / not tested) and a one-line reason.

    H1-H3 (and H5 when enforce_eager is a factor) weigh every pair of cells differing only in their knob:
    supported when every informative pair favours the hypothesis, refuted when none does, mixed otherwise;
    a pair where nothing started says nothing about the knob and is left out.
    """
    d = _Design(records)
    texts = hypothesis_texts(d)
    rows = [_knob_verdict(h, d, texts[h]) for h in ("H1", "H2", "H3")]
    rows.append(_combination_verdict(d, texts["H4"]))
    if "enforce_eager" in d.factors:
        rows.append(_knob_verdict("H5", d, texts["H5"]))
    return pd.DataFrame(rows, columns=["id", "hypothesis", "verdict", "reason"])


def _describe(cell, eager: bool = False) -> str:
    state = "started" if cell.rate == 1 else ("failed" if cell.rate == 0 else f"started {cell.rate:.0%}")
    why = f" ({cell.failures})" if cell.failures else ""
    mode = (", eager" if cell.enforce_eager else ", CUDA graphs") if eager else ""
    where = (
        f"{cell.stratum}: " if cell.stratum else ""
    )  # which model / install / ... when the run has several
    return f"{where}{cell.launcher}, len {cell.max_model_len}, {cell.memory_label}{mode}: {state}{why}"


def _knob_verdict(hid: str, d: _Design, text: str) -> dict:
    factor, good, bad = _KNOB_HYPOTHESES[hid]
    base = {"id": hid, "hypothesis": text}
    if d.levels.get(factor) is None:
        return base | {"verdict": "not tested", "reason": f"the data holds fewer than two {factor} levels"}
    eager = "enforce_eager" in d.factors

    def desc(cell) -> str:
        return _describe(cell, eager)

    pairs = [(p[1 + good], p[1 + bad]) for p in _pairs(d, d.factors.index(factor))]
    informative = [(g, b) for g, b in pairs if max(g.rate, b.rate) > 0]
    if not informative:
        why = (
            "no cell pair differing only in " + factor
            if not pairs
            else f"nothing started in any of {len(pairs)} pairs"
        )
        return base | {"verdict": "not tested", "reason": why}
    agree = [(g, b) for g, b in informative if g.rate > b.rate]
    against = [(g, b) for g, b in informative if g.rate <= b.rate]
    silent = len(pairs) - len(informative)
    tail = f"; nothing started in the other {silent}" if silent else ""
    good_name, bad_name = _level_of(pairs[0][0], factor), _level_of(pairs[0][1], factor)
    if not against:
        g, b = agree[0]
        reason = f"{len(agree)} of {len(pairs)} pairs: {desc(g)} but {desc(b)}{tail}"
        return base | {"verdict": "supported", "reason": reason + _suspects(hid, d, agree)}
    g, b = max(against, key=lambda pair: pair[1].rate - pair[0].rate)  # the most telling counter-example
    if not agree:
        n_good, n_bad = (sum(cell.rate > 0 for cell in side) for side in zip(*pairs, strict=True))
        reason = (
            f"{good_name} started in {n_good} of {len(pairs)} pairs, {bad_name} in {n_bad}; {bad_name} never "
            f"failed where {good_name} started, e.g. {desc(b)}; {desc(g)}"
        )
        return base | {"verdict": "refuted", "reason": reason}
    g1, b1 = agree[0]
    reason = (
        f"{len(agree)} of {len(pairs)} pairs favour it, e.g. {desc(g1)} but {desc(b1)}; {len(against)} do not, "
        f"e.g. {desc(b)}; {desc(g)}{tail}"
    )
    return base | {"verdict": "mixed", "reason": reason + _suspects(hid, d, agree)}


def _level_of(cell, factor: str) -> str:
    if factor == "launcher":
        return f"the {cell.launcher} launcher"
    if factor == "enforce_eager":
        return "--enforce-eager" if cell.enforce_eager else "CUDA graphs"
    return f"max_model_len {cell.max_model_len}" if factor == "max_model_len" else cell.memory_label


def _before_021(version) -> bool:
    """True for vLLM < 0.21 and for an unknown version (CUDA-graph memory outside the budget until 0.21)."""
    try:
        major, minor = (int(x) for x in str(version).split(".")[:2])
    except ValueError:
        return True
    return (major, minor) < (0, 21)


def _suspects(hid: str, d: _Design, agree: list) -> str:
    """Issue 10: what else makes a higher utilization fail, and the knob that tells (H3 on a GPU only)."""
    if hid != "H3" or d.kind != "util":
        return ""
    failing = {f for _, b in agree for f in str(b.failures).split(", ") if f}
    notes = []
    if "gpu_mem_util_unavailable" in failing:
        notes.append("memory held by other processes (V1's free-memory check at start): free the GPU")
    version = next((b.vllm_version for _, b in agree if b.vllm_version), None)
    if failing - {"gpu_mem_util_unavailable"} and "enforce_eager" not in d.factors and _before_021(version):
        notes.append(
            "CUDA-graph memory outside the budget (before vLLM 0.21), the likelier cause of a crash at a high "
            "utilization: test it with ENFORCE_EAGER = [False, True]"
        )
    return "".join(f"; suspect {n}" for n in notes)


def _combination_verdict(d: _Design, text: str) -> dict:
    base = {"id": "H4", "hypothesis": text}
    eager = "enforce_eager" in d.factors
    squares = [(subset, block) for subset in combinations(range(d.k), 2) for block in _blocks(d, subset)]
    if not squares:
        return base | {"verdict": "not tested", "reason": "no complete 2x2 square of cells to compare"}
    for (a, b), block in squares:
        sq = [cell for _, cell in block]
        rates = [cell.rate for cell in sq]
        if sorted(rates) == [0, 1, 1, 1]:
            k = rates.index(0)  # the failing corner; its single-change neighbours are k^1 and k^2
            reason = (
                f"{d.factors[a]} x {d.factors[b]} interaction {_contrast(block):+.2f}: {_describe(sq[k], eager)}, "
                f"while {_describe(sq[k ^ 1], eager)} and {_describe(sq[k ^ 2], eager)}"
            )
            return base | {"verdict": "supported", "reason": reason}
    mean: dict[str, list] = {}
    for (a, b), block in squares:
        mean.setdefault(f"{d.factors[a]} x {d.factors[b]}", []).append(_contrast(block))
    values = ", ".join(f"{name} {sum(v) / len(v):+.2f}" for name, v in mean.items())
    reason = (
        f"in {len(squares)} complete 2x2 squares no failure needs two changes together; "
        f"each follows from one knob (interactions: {values})"
    )
    return base | {"verdict": "refuted", "reason": reason}
