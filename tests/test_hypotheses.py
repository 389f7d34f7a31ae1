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
    # 22256 fails only at the smaller budget: two pairs favour H2, two show no effect -> mixed, not supported
    assert {k: x[0] for k, x in v.items()} == {
        "H1": "refuted",
        "H2": "mixed",
        "H3": "refuted",
        "H4": "supported",
    }
    assert "2 of 4 pairs favour it" in v["H2"][1] and "2 do not" in v["H2"][1]
    assert "max_model_len x memory" in v["H4"][1] and "KV 8 MiB" in v["H4"][1]
    inter = effect(rows, "max_model_len x memory")
    assert (inter["value"], inter["n"]) == (1.0, 2)
    assert effect(rows, "launcher x max_model_len x memory")["value"] == 0.0
    assert effect(rows, "memory")["levels"] == "KV 8 MiB -> KV 12 MiB"


def test_classic_combination_supports_h4_only():
    v = by_id(factorial({("legacy", 22256, 0.95), ("head", 22256, 0.95)}))
    assert v["H4"][0] == "supported"
    assert "len 22256, util 0.95: failed" in v["H4"][1]
    # each knob fails only at the other knob's high level: half the pairs favour it, half show no effect
    assert v["H2"][0] == "mixed" and v["H3"][0] == "mixed"
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


def test_one_favouring_pair_does_not_support_when_another_contradicts():
    # legacy: 16384 starts, 22256 fails (favours H2); head: 16384 fails, 22256 starts (contradicts H2)
    v = by_id(factorial({("legacy", 22256, 0.85), ("head", 16384, 0.85)}))
    assert v["H2"][0] == "mixed"
    assert "1 of 4 pairs favour it" in v["H2"][1] and "3 do not" in v["H2"][1]
    assert "head, len 22256, util 0.85: started" in v["H2"][1]


def test_every_pair_favouring_supports_and_every_pair_against_refutes():
    v = by_id(factorial({(lc, 22256, u) for lc in ("legacy", "head") for u in (0.85, 0.95)}))
    assert (v["H2"][0], v["H3"][0]) == ("supported", "refuted")
    assert v["H2"][1].startswith("4 of 4 pairs: ")


def test_texts_name_the_runs_own_levels():
    rows = [
        trial(lc, mml, u, True) for lc in ("legacy", "head") for mml in (16384, 32768) for u in (0.8, 0.9)
    ]
    texts = hypotheses.verdicts(rows).set_index("id")["hypothesis"]
    assert texts["H2"] == "the larger max_model_len (32768 vs 16384) is too much"
    assert texts["H3"] == "the higher memory setting (util 0.9 vs util 0.8) is too much"
    assert not any("22256" in t or "0.95" in t for t in texts)
    kv = [new_record(**{**r, "gpu_memory_utilization": None, "kv_cache_memory_bytes": int(r["gpu_memory_utilization"] * 10) * 2**20}) for r in rows]  # fmt: skip
    assert (
        hypotheses.hypothesis_texts(kv)["H3"]
        == "the higher memory setting (KV 9 MiB vs KV 8 MiB) is too much"
    )
    # one level only: no numbers to name
    assert hypotheses.hypothesis_texts(rows[:1])["H2"] == "the larger max_model_len is too much"


# ---- enforce_eager as a factor (issue 10) --------------------------------------------------------------

EAGER_ARGV = ["vllm", "serve", "m", "--enforce-eager"]


def eager_factorial(fails, launchers=("legacy", "head")) -> list[dict]:
    """launcher x max_model_len x util x enforce_eager; `fails(launcher, mml, util, eager)` says which fail."""
    return [
        trial(lc, mml, u, not fails(lc, mml, u, e), failure="cuda_oom", vllm_version="0.10.2",
              argv=EAGER_ARGV if e else EAGER_ARGV[:-1], n=int(e))
        for lc in launchers for mml in (16384, 22256) for u in (0.85, 0.95) for e in (False, True)
    ]  # fmt: skip


def test_enforce_eager_as_a_fourth_factor():
    rows = eager_factorial(lambda lc, mml, u, e: u == 0.95 and not e)  # CUDA graphs do not fit at 0.95
    eff = hypotheses.effects(rows).set_index("effect")
    assert len(eff) == 4 + 6 + 4 + 1  # main effects, 2-, 3- and 4-way interactions
    assert eff.loc["enforce_eager", "levels"] == "CUDA graphs -> eager"
    assert (eff.loc["enforce_eager", "value"], eff.loc["enforce_eager", "n"]) == (0.5, 8)
    assert (eff.loc["memory x enforce_eager", "value"], eff.loc["memory x enforce_eager", "n"]) == (1.0, 4)
    assert eff.loc["launcher x max_model_len x memory x enforce_eager", "n"] == 1
    v = by_id(rows)
    assert list(v) == ["H1", "H2", "H3", "H4", "H5"]
    assert v["H5"][0] == "mixed" and "CUDA graphs: failed (cuda_oom)" in v["H5"][1]
    assert v["H4"][0] == "supported" and "memory x enforce_eager" in v["H4"][1]
    assert v["H1"][0] == "refuted" and v["H2"][0] == "refuted"
    assert "ENFORCE_EAGER" not in v["H3"][1]  # it is already a factor: no suggestion to add it


def test_enforce_eager_replacing_the_launcher_factor():
    rows = eager_factorial(lambda lc, mml, u, e: not e, launchers=("head",))  # graphs fail everywhere
    v = by_id(rows)
    assert v["H1"] == ("not tested", "the data holds fewer than two launcher levels")
    assert v["H5"][0] == "supported" and v["H5"][1].startswith("4 of 4 pairs: ")
    assert hypotheses.effects(rows).set_index("effect").loc["enforce_eager", "value"] == 1.0


def test_one_eager_level_keeps_the_2x3_design():
    rows = [{**r, "argv": EAGER_ARGV} for r in factorial({("head", 22256, 0.95)})]  # the CPU demo: all eager
    assert "H5" not in by_id(rows)
    assert len(hypotheses.effects(rows)) == 7


def test_a_crash_at_high_util_names_cuda_graphs_before_0_21():
    rows = [{**r, "vllm_version": "0.10.2"} for r in factorial({("legacy", 16384, 0.95), ("head", 16384, 0.95),
            ("legacy", 22256, 0.95), ("head", 22256, 0.95)})]  # fmt: skip
    for r in rows:
        r["failure"] = "cuda_oom" if r["outcome"] == "failed" else None
    reason = by_id(rows)["H3"][1]
    assert "CUDA-graph memory outside the budget" in reason and "ENFORCE_EAGER = [False, True]" in reason
    newer = [{**r, "vllm_version": "0.21.0"} for r in rows]
    assert "CUDA-graph" not in by_id(newer)["H3"][1]
    busy = [{**r, "failure": "gpu_mem_util_unavailable" if r["failure"] else None} for r in rows]
    assert "memory held by other processes" in by_id(busy)["H3"][1]


def test_report_summary_names_mixed_verdicts():
    from vllm_lab import report

    summary = report._hypothesis_summary(hypotheses.verdicts(fixture_rows("fake_only")))
    assert summary == "**Hypotheses.** Supported: H4. Refuted: H1, H3. Mixed: H2. Not tested: none."


def test_enforce_eager_levels_become_trials_with_and_without_the_flag(tmp_path):
    from vllm_lab import steps
    from vllm_lab.spec import SpecError

    p = steps.StepParams(
        run_dir=str(tmp_path), step="04_hypotheses", model="/m", extra_args=["--enforce-eager", "-x"]
    )
    mems = steps.memory_levels([0.85, 0.95], None)
    default = steps.factorial_trials(p, ["legacy", "head"], [16384, 22256], mems)
    assert len(default) == 8 and all(
        "--enforce-eager" in t.extra_args for t in default
    )  # EXTRA_ARGS as given
    trials = steps.factorial_trials(p, ["head"], [16384, 22256], mems, [False, True])  # replaces the launcher
    assert len(trials) == 8 and len({t.trial_id for t in trials}) == 8
    assert sorted(t.extra_args for t in trials)[::4] == [["-x"], ["-x", "--enforce-eager"]]
    planned = steps.planned_trials("04_hypotheses", {"RUN_DIR": str(tmp_path), "STEP": "h", "MODEL": "/m",
        "LAUNCHERS": ["legacy", "head"], "MAX_MODEL_LENS": [1, 2], "UTILIZATIONS": [0.8, 0.9],
        "ENFORCE_EAGER": [False, True]})  # fmt: skip
    assert len(planned) == 16
    with pytest.raises(SpecError, match="ENFORCE_EAGER"):
        steps.factorial_trials(p, ["head"], [1], mems, ["yes"])


def test_a_server_that_came_up_but_could_not_serve_counts_as_started():
    """The CPU demo's AWQ twin: legacy fails on its flag, head comes up (then dies on a request: unstable).
    The hypotheses ask "does it start": H1 is refuted, and the unstable cells are not "nothing started"."""
    recs = factorial(set())
    for r in recs:
        if r["launcher"] == "legacy":
            r.update(outcome="failed", failure="quantization_mismatch")
        else:
            r.update(outcome="unstable", failure=None, long_request_ok=False)
    v = by_id(recs)
    assert v["H1"][0] == "refuted"
    assert "nothing started" not in v["H2"][1]
    assert hypotheses.prepare(recs)["stable"].sum() == 0  # started, but not one is stable


# ---- issue 22: configurations never merged (17), lost attempts never counted (13) -------------------------


def installs_by_eager() -> list[dict]:
    """INSTALLS [old, new] x ENFORCE_EAGER [false, true] on head: old starts only with --enforce-eager."""
    return [
        trial("head", 4096, 0.9, ok=not (inst == "old" and not e), failure="cuda_oom", install=inst,
              vllm_version={"old": "0.27.0", "new": "0.32.0"}[inst], argv=EAGER_ARGV if e else EAGER_ARGV[:-1],
              n=f"{inst}{int(e)}")
        for inst in ("old", "new") for e in (False, True)
    ]  # fmt: skip


def test_cells_of_two_installs_are_never_one_cell():
    cells = hypotheses.cells(installs_by_eager())
    assert len(cells) == 4 and cells["trials"].tolist() == [1, 1, 1, 1]
    by = {(r.stratum, bool(r.enforce_eager)): r.rate for r in cells.itertuples()}
    assert by[("old (vLLM 0.27.0)", False)] == 0.0 and by[("new (vLLM 0.32.0)", False)] == 1.0
    verdict, reason = by_id(installs_by_eager())["H5"]
    # graphs fail on old only: one pair for, one against (merged, 0.5 against 1.0 read "supported")
    assert verdict == "mixed" and "old (vLLM 0.27.0): head, len 4096" in reason


def test_a_lost_ray_attempt_is_no_trial_of_the_factorial():
    rows = factorial({("head", 22256, 0.95)})
    lost = trial("legacy", 16384, 0.85, ok=False, failure="infrastructure", n=9)  # its worker died
    cells = hypotheses.cells([lost, *rows])
    cell = cells[
        (cells["launcher"] == "legacy") & (cells["max_model_len"] == 16384) & (cells["memory"] == 0.85)
    ]
    assert cell[["trials", "rate", "failures"]].values.tolist() == [[1, 1.0, ""]]
    assert by_id([lost, *rows]) == by_id(rows)
