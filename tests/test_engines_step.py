"""Notebook 05_engines (engine_compare), its dry run on the team's P40 plan, and the report's "Engines side by
side" section (engines_report). Unit tiers use records and plans only; the real tier runs the notebook
through the batch with llama-server (the xllamacpp wheel) on the tiny GGUF under an address-space limit."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from conftest import FAKE_OLLAMA, ROOT, ollama_store
from vllm_lab import engine_compare, engines_report, search_llamacpp
from vllm_lab.batch import run_plan
from vllm_lab.cli import main
from vllm_lab.errors import SpecError

TINY_GGUF = ROOT / ".cache" / "models" / "tiny-qwen2.gguf"
LIMIT = 210 * 2**20


@pytest.mark.unit
@pytest.mark.parametrize(
    ("entries", "says"),
    [
        ([], "ENGINES: give a list"),
        ([{"name": "a", "engine": "tgi"}], "ENGINES[0].engine"),
        ([{"name": "a/b"}], "ENGINES[0].name"),
        ([{"name": "a"}, {"name": "a"}], "ENGINES[1].name: 'a' twice"),
        ([{"name": "a", "memory_limit_bytes": -1}], "ENGINES[0].memory_limit_bytes"),
        ([{"name": "a", "ctx": 1}], "ENGINES[0].ctx: unknown key"),
    ],
)
def test_bad_engines_are_one_line_before_any_launch(entries, says):
    with pytest.raises(SpecError) as e:
        engine_compare.check_entries(entries)
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.unit
def test_p40_plan_dry_run_predicts_each_engine(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))  # an empty store, whatever this box has
    assert main(["run", str(ROOT / "params" / "p40-engines.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split(" (")[0].strip(): ln for ln in out.splitlines() if "search, then LOAD" in ln}
    assert set(lines) == {"vllm-awq", "vllm-fp16", "llamacpp-q4km-f16kv", "llamacpp-q4km-q8kv", "ollama-q4km"}
    assert "does not start (quantization_unsupported_gpu)" in lines["vllm-awq"]  # what crashes on the P40
    assert "does not start" in lines["vllm-fp16"]  # mainline vLLM has no sm_61 kernels
    for name, kv in (("llamacpp-q4km-f16kv", "KV 5.62 GiB (f16/f16)"), ("llamacpp-q4km-q8kv", "(q8_0/q8_0)")):
        assert "predicted: starts, largest -c 40960" in lines[name] and kv in lines[name]
        assert "a prediction" in lines[name]
    # Ollama's model is not in this box's store: predicted from the published size, and said how to get it
    assert "predicted: starts, largest num_ctx 40960" in lines["ollama-q4km"]
    assert "ollama pull qwen3:8b-q4_K_M" in lines["ollama-q4km"]
    # each of Ollama's slots holds num_ctx: two slots at the full context are twice the KV
    two = {"name": "ol2", "engine": "ollama", "model": "qwen3:8b-q4_K_M", "env": {"OLLAMA_NUM_PARALLEL": "2"}}
    assert "KV 11.25 GiB" in engine_compare.predict_entry(two, "p40", None, "")


def _rec(step, n, outcome="ready", **kw):
    return {"step": step, "engine": kw.pop("engine", "llamacpp"), "model": "/m/tiny.gguf", "max_model_len": n,
            "outcome": outcome, "long_request_ok": outcome == "ready", "memory_limit": LIMIT,
            "backend": "llamacpp-cpu", **kw}  # fmt: skip


@pytest.mark.unit
def test_side_by_side_from_records_and_engines_json(tmp_path):
    level = {
        "concurrency": 2,
        "output_tokens_per_s": 123.456,
        "ttft_ms": {"p90": 7.25},
        "completed": 8,
        "requests": 8,
    }
    recs = [
        _rec("05_engines.lc", 13568, kv_cache_mib=6.62, n_ctx=13568),
        _rec("05_engines.lc", 13824, "unstable", failure=None),
        _rec("05_engines.lc", 13568, load={"levels": [level], "knee_concurrency": 2}, load_stable=True),
        _rec("05_engines.awq", 16384, "failed", engine="vllm", failure="quantization_unsupported_gpu",
             evidence="awq is not supported", memory_limit=None, gpu_memory_utilization=0.9),
        _rec("03_max_context_search", 20352),  # another step: not an engine entry
    ]  # fmt: skip
    summ = [{"step": "05_engines", "name": "lc", "verdict": "found", "predicted_context": 13312},
            {"step": "05_engines", "name": "awq", "verdict": "stopped"}]  # fmt: skip
    (tmp_path / "engines.json").write_text(json.dumps(summ))
    t = engines_report.table(recs, tmp_path).set_index("entry")
    assert list(t.index) == ["lc", "awq"]
    assert t.loc["lc", "starts"] == "yes" and t.loc["lc", "largest stable context"] == 13568
    assert t.loc["lc", "launches"] == 2 and t.loc["lc", "KV at it"] == "6.62 MiB (13568 cells)"
    assert t.loc["lc", "memory"] == "address space 210 MiB" and t.loc["lc", "knee (concurrency)"] == 2
    assert t.loc["lc", "predicted (memory model, a prediction)"] == 13312
    assert "on the GPU" not in t.columns  # no record says where the model ran: no column of dashes
    assert t.loc["awq", "starts"] == "no" and t.loc["awq", "why not"].startswith(
        "quantization_unsupported_gpu"
    )
    lt = engines_report.load_table(recs, tmp_path)
    assert (lt["output tok/s"].tolist(), lt["TTFT p90 ms"].tolist(), lt["knee"].tolist()) == (
        [123],
        [7.2],
        ["*"],
    )


@pytest.mark.unit
def test_each_load_level_is_judged_on_its_own(tmp_path):
    ok = {"concurrency": 1, "completed": 8, "requests": 8, "problems": []}
    bad = {"concurrency": 4, "completed": 7, "requests": 8,
           "problems": [{"kind": "failed", "words": "1 of 8 requests failed at concurrency 4"}]}  # fmt: skip
    recs = [_rec("05_engines.lc", 4096, load={"levels": [ok, bad]}, load_stable=False)]
    (tmp_path / "engines.json").write_text(json.dumps([{"step": "05_engines", "name": "lc"}]))
    lt = engines_report.load_table(recs, tmp_path)
    assert lt["clean"].tolist() == ["yes", "no: failed"]  # not the whole load's "no" on every level
    assert lt["backend"].tolist() == ["llamacpp-cpu"] * 2  # a stand-in's figures say so on every row


@pytest.mark.unit
def test_an_ollama_context_partly_on_the_cpu_is_shown_not_counted(tmp_path):
    recs = [
        _rec("05_engines.ol", 5120, engine="ollama", offload_fraction=1.0, memory_limit=None, context_used=5120),
        _rec("05_engines.ol", 5376, engine="ollama", offload_fraction=0.995, memory_limit=None),
    ]  # fmt: skip
    (tmp_path / "engines.json").write_text(json.dumps([{"step": "05_engines", "name": "ol"}]))
    t = engines_report.table(recs, tmp_path).set_index("entry")
    assert t.loc["ol", "largest stable context"] == 5120 and t.loc["ol", "context used"] == 5120
    assert t.loc["ol", "on the GPU"].startswith("from 5376: only 99.5% of the model on the GPU")
    assert "not a fit" in t.loc["ol", "on the GPU"]


@pytest.mark.unit
def test_no_section_without_engines():
    import pandas as pd

    df = pd.DataFrame([_rec("03_max_context_search", 20352, engine="vllm")])
    assert engines_report.engine_blocks(df) == []


@pytest.mark.llamacpp
def test_notebook_05_with_the_real_llama_server_and_the_ollama_stand_in(tmp_path):
    store = ollama_store(tmp_path / "ollama-models")  # as `ollama pull qwen3:8b-q4_K_M` leaves it
    ollama = {"name": "ol", "engine": "ollama", "model": "qwen3:8b-q4_K_M", "low": 1024, "high": 4096,
              "vllm_cmd": FAKE_OLLAMA,
              "env": {"OLLAMA_MODELS": str(store), "FAKE_OLLAMA_FIT_CTX": "3000"}}  # fmt: skip
    plan = {
        "name": "engines", "model": str(ROOT / ".cache" / "models" / "tiny-qwen2"),
        "vllm_cmd": str(ROOT / ".venv-vllm" / "bin" / "python") + " -m vllm.entrypoints.openai.api_server",
        "defaults": {"startup_timeout_s": 120, "request_timeout_s": 120},
        "steps": [{"name": "05_engines", "notebook": "05_engines", "parameters": {
            "LOAD": {"concurrency": [1, 2], "requests": 4, "prompt_tokens": 64, "output_tokens": 16},
            "ENGINES": [{"name": "lc", "engine": "llamacpp", "model": str(TINY_GGUF), "memory_limit_bytes": LIMIT},
                        ollama],
        }}],
    }  # fmt: skip
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    res = run_plan(str(path), out=str(tmp_path / "out"))
    assert not res.errors, res.errors
    run_dir = res.run_dir
    summ, ol = json.loads((run_dir / "engines.json").read_text())
    assert summ["verdict"] == "found" and summ["block_size"] == 256 and summ["max_context"] % 256 == 0
    assert summ["memory_limit"] == LIMIT and summ["load_stable"] is True
    assert summ["launches"] <= (3 if os.cpu_count() == search_llamacpp.MEASURED_ON_CPUS else 10)
    # Ollama (the stand-in: backend fake): lowered silently above 3000, so 2816 at its block; then the load
    assert (ol["engine"], ol["verdict"], ol["max_context"], ol["block_size"]) == (
        "ollama",
        "found",
        2816,
        256,
    )
    assert ol["load_stable"] is True
    md = (run_dir / "report.md").read_text()
    assert "## Engines side by side" in md and "address space 210 MiB" in md
    section = md[md.index("## Engines side by side") :]
    row = next(ln for ln in section.splitlines() if ln.startswith("| ollama"))
    assert (
        "| ol |" in row and "| fake |" in row and "| 2816 |" in row
    )  # beside llama.cpp, said to be the fake
    assert md.startswith("# llama.cpp and Ollama startup report")
    assert "Engines side by side" in (run_dir / "report-issue.md").read_text()
    assert "Engines side by side" in (run_dir / "report.html").read_text()


@pytest.mark.unit
def test_the_report_title_names_the_engines_the_run_started():
    import pandas as pd
    from vllm_lab import report

    recs = [_rec("05_engines.lc", 4096), _rec("05_engines.ol", 4096, engine="ollama"),
            _rec("05_engines.v", 4096, engine="vllm")]  # fmt: skip
    assert report._engines_named(pd.DataFrame(recs)) == "vLLM, llama.cpp and Ollama"
    old = pd.DataFrame([_rec("s", 1, engine=None)])  # records from before the engine field
    assert report._engines_named(old) == "vLLM"


@pytest.mark.unit
def test_a_start_partly_on_the_cpu_is_named_in_the_verdict_and_the_grid(tmp_path):
    from vllm_lab import plots, record, report

    for n, frac in ((1536, 1.0), (4608, 0.8)):
        record.append_record(tmp_path, _rec("05_engines.ol", n, engine="ollama", offload_fraction=frac,
                                            memory_limit=None, backend="fake", launcher="head",
                                            trial_id=f"ol-{n}", argv=[]))  # fmt: skip
    df = report.load_run(tmp_path)
    working = report.verdict(df)["working"].set_index("max_model_len")
    assert working.loc[1536, "long request"] == "ok"
    assert working.loc[4608, "long request"] == "ok, but partial_offload: not stable"
    largest = report.verdict(df)["largest_stable"]
    assert largest["largest stable max_model_len"].tolist() == [1536]
    rows = plots.grid_rows(df)
    assert plots.cell_text(rows[rows["max_model_len"] == 4608]) == "partial_offload\n(fake)"


@pytest.mark.unit
def test_every_entry_is_checked_before_the_first_launch(tmp_path, monkeypatch):
    from vllm_lab import search, steps

    launched = []
    monkeypatch.setattr(search, "run_search", lambda *a, **k: launched.append(a) or None)
    p = steps.step_params({"RUN_DIR": str(tmp_path), "STEP": "05_engines", "MODEL": str(TINY_GGUF)})
    entries = [{"name": "lc", "engine": "llamacpp", "model": str(TINY_GGUF), "memory_limit_bytes": LIMIT},
               {"name": "ol", "engine": "ollama", "model": "qwen3:8b-q4_K_M",
                "env": {"OLLAMA_MODELS": str(tmp_path / "empty-store")}}]  # fmt: skip
    with pytest.raises(
        SpecError, match=r"^ENGINES\[1\] \(ol\): model: qwen3:8b-q4_K_M is not in the Ollama store"
    ):
        engine_compare.run_engines(p, entries, low=None, high=None, load=None)
    assert launched == []  # the llama.cpp entry before it did not run either
