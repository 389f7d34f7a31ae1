"""Main effects, interactions and H1..H4 verdicts from a 2^3 factorial of records."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from vllm_lab import hypotheses
from vllm_lab.record import new_record, read_records

pytestmark = pytest.mark.unit

RUNS = Path(__file__).parent / "fixtures" / "runs"


def fixture_rows(name: str) -> list[dict]:
    return read_records(RUNS / name, keep_torn_aside=False).rows


def trial(launcher: str, mml: int, util: float, ok: bool, failure: str | None = None, **kw) -> dict:
    return new_record(
        step="04_hypotheses",
        trial_id=f"{launcher}-{mml}-{util}-{kw.pop('n', 0)}",
        backend="vllm-cuda",
        launcher=launcher,
        max_model_len=mml,
        gpu_memory_utilization=util,
        outcome="ready" if ok else "failed",
        failure=None if ok else (failure or "kv_cache_insufficient"),
        **kw,
    )


def factorial(fails: set[tuple[str, int, float]]) -> list[dict]:
    """A full 2^3 design where exactly the cells in `fails` fail."""
    return [
        trial(lc, mml, u, (lc, mml, u) not in fails)
        for lc in ("legacy", "head")
        for mml in (16384, 22256)
        for u in (0.85, 0.95)
    ]


def by_id(records) -> dict[str, tuple[str, str]]:
    v = hypotheses.verdicts(records)
    return {row.id: (row.verdict, row.reason) for row in v.itertuples()}


def effect(records, name: str) -> dict:
    eff = hypotheses.effects(records).set_index("effect")
    return eff.loc[name].to_dict()


def test_p40_run_refutes_the_flag_and_supports_length_and_util():
    v = by_id(fixture_rows("p40_factorial"))
    assert {k: x[0] for k, x in v.items()} == {
        "H1": "refuted",
        "H2": "supported",
        "H3": "supported",
        "H4": "refuted",
    }
    assert "quantization_mismatch" in v["H1"][1] and "0 of 4" in v["H1"][1]
    assert "22256" in v["H2"][1] and "kv_cache_insufficient" in v["H2"][1]
    assert "util 0.95" in v["H3"][1] and "gpu_mem_util_unavailable" in v["H3"][1]


def test_p40_main_effects_are_paired_differences():
    rows = fixture_rows("p40_factorial")
    launcher = effect(rows, "launcher")
    assert launcher["levels"] == "legacy -> head"
    assert (launcher["rate_low"], launcher["rate_high"], launcher["value"], launcher["n"]) == (
        0.0,
        0.25,
        0.25,
        4,
    )
    assert effect(rows, "max_model_len")["value"] == -0.25
    assert effect(rows, "memory")["levels"] == "util 0.85 -> util 0.95"


def test_fake_kv_budget_run_finds_the_length_budget_combination():
    rows = fixture_rows("fake_only")
    v = by_id(rows)
    assert {k: x[0] for k, x in v.items()} == {
        "H1": "refuted",
        "H2": "supported",
        "H3": "refuted",
        "H4": "supported",
    }
    assert "max_model_len x memory" in v["H4"][1] and "KV 8 MiB" in v["H4"][1]
    inter = effect(rows, "max_model_len x memory")
    assert (inter["value"], inter["n"]) == (1.0, 2)
    assert effect(rows, "launcher x max_model_len x memory")["value"] == 0.0
    assert effect(rows, "memory")["levels"] == "KV 8 MiB -> KV 12 MiB"


def test_classic_combination_supports_h4_only():
    v = by_id(factorial({("legacy", 22256, 0.95), ("head", 22256, 0.95)}))
    assert v["H4"][0] == "supported"
    assert "len 22256, util 0.95: failed" in v["H4"][1]
    # each knob alone also "fails where the lower works" at the other knob's high level
    assert v["H2"][0] == "supported" and v["H3"][0] == "supported"
    assert v["H1"][0] == "refuted"


def test_legacy_starting_where_head_fails_supports_h1():
    v = by_id(
        factorial(
            {("head", 16384, 0.85), ("head", 16384, 0.95), ("head", 22256, 0.85), ("head", 22256, 0.95)}
        )
    )
    assert v["H1"][0] == "supported"
    assert "4 of 4 pairs" in v["H1"][1]
    assert v["H4"][0] == "refuted"


def test_nothing_failing_refutes_every_hypothesis():
    v = by_id(factorial(set()))
    assert [x[0] for x in v.values()] == ["refuted"] * 4


def test_nothing_starting_tests_nothing():
    everything = {(lc, m, u) for lc in ("legacy", "head") for m in (16384, 22256) for u in (0.85, 0.95)}
    v = by_id(factorial(everything))
    assert [v[h][0] for h in ("H1", "H2", "H3")] == ["not tested"] * 3
    assert "nothing started" in v["H1"][1]


def test_missing_cells_are_not_guessed():
    rows = [
        r
        for r in factorial({("head", 22256, 0.95)})
        if r["launcher"] == "head" or r["max_model_len"] == 16384
    ]
    rows = [r for r in rows if not (r["launcher"] == "legacy" and r["gpu_memory_utilization"] == 0.95)]
    eff = hypotheses.effects(rows).set_index("effect")
    assert eff.loc["launcher", "n"] == 1  # only (16384, 0.85) has both launchers
    assert eff.loc["launcher x max_model_len x memory", "n"] == 0
    assert pd.isna(eff.loc["launcher x max_model_len x memory", "value"])
    assert by_id(rows)["H4"][0] == "supported"  # the head square is complete


def test_partial_run_reports_not_tested():
    v = by_id(fixture_rows("torn_partial"))
    assert v["H1"] == ("not tested", "no cell pair differing only in launcher")
    assert v["H2"][0] == "not tested" and v["H4"][0] == "not tested"
    assert v["H3"][0] == "refuted" and "KV 16 MiB" in v["H3"][1]


def test_repeated_trials_give_shares():
    rows = [*factorial(set()), trial("head", 22256, 0.95, False, n=1)]
    c = hypotheses.cells(rows)
    cell = c[(c.launcher == "head") & (c.max_model_len == 22256) & (c.memory == 0.95)].iloc[0]
    assert (cell["trials"], cell["rate"], cell["failures"]) == (2, 0.5, "kv_cache_insufficient")


def test_factorial_step_wins_over_other_steps():
    rows = factorial({("head", 22256, 0.85)})
    rows.append(
        new_record(
            step="02_context_budget_085",
            launcher="head",
            max_model_len=32768,
            gpu_memory_utilization=0.85,
            outcome="failed",
        )
    )
    assert hypotheses.effects(rows).set_index("effect").loc["max_model_len", "levels"] == "16384 -> 22256"


def test_memory_setting_prefers_util_then_kv_budget():
    df = hypotheses.prepare(
        [
            new_record(gpu_memory_utilization=0.9, kv_cache_memory_bytes=2**20),
            new_record(kv_cache_memory_bytes=3 * 2**30),
            new_record(),
        ]
    )
    assert df["memory_label"].tolist() == ["util 0.9", "KV 3 GiB", "default"]
    assert df["memory_kind"].tolist()[:2] == ["util", "kv"] and pd.isna(df["memory_kind"].iloc[2])


def test_stable_needs_ready_and_a_long_request():
    df = hypotheses.prepare(
        [
            new_record(outcome="ready", long_request_ok=True),
            new_record(outcome="ready", long_request_ok=False),
            new_record(outcome="failed", long_request_ok=True),
            new_record(outcome="ready"),
        ]
    )
    assert df["stable"].tolist() == [True, False, False, False]
