"""Issue 22, reports that stay true: configurations never merged (17), lost Ray attempts apart (13), two
models labelled everywhere (18), one direction through the report rooms (19), no local path (23)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from vllm_lab import configs, hypotheses, plots, render, report
from vllm_lab.paths import REPO_ROOT
from vllm_lab.record import new_record

pytestmark = pytest.mark.unit

LIB = Path(report.__file__).parent
HOME_MODELS = Path.home() / "models"  # where a user keeps their models: never printed in a report


def rec(step: str, launcher: str, mml: int, kv: int, outcome: str, **kw) -> dict:
    defaults = {
        "run_id": "r1", "backend": "vllm-cpu", "vllm_version": "0.32.0", "model": str(HOME_MODELS / "tiny-qwen2"),
        "seconds_to_outcome": 30.0, "argv": ["python", "-m", "vllm", "--model", "m", "--port", "1"],
        "long_request_ok": outcome == "ready" or None, "failure": None if outcome == "ready" else "cuda_oom",
    }  # fmt: skip
    defaults.update(kw)
    tid = defaults.pop("trial_id", None) or f"{step}-{launcher}-len{mml}-kv{kv}-{len(str(kw))}"
    return new_record(step=step, trial_id=tid, launcher=launcher, max_model_len=mml,
                      kv_cache_memory_bytes=kv, outcome=outcome, **defaults)  # fmt: skip


def load(users: int, tps: float) -> dict:
    level = {"concurrency": users, "requests": users, "completed": users, "failed": 0, "errors_in_stream": 0,
             "output_tokens_per_s": tps}  # fmt: skip
    return {"load": {"levels": [level], "knee_concurrency": None}, "load_stable": True, "load_reason": "ok"}


def write_run(tmp_path: Path, rows: list[dict]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    nxt = text.find("\n## ", start + len(heading))
    return text[start : nxt if nxt != -1 else None]


# ---- 17: INSTALLS [old, new] x ENFORCE_EAGER [false, true], old fails without --enforce-eager -------------

EAGER = ["python", "-m", "vllm", "--model", "m", "--port", "1", "--enforce-eager"]


def installs_by_eager() -> list[dict]:
    rows = []
    for install, version in (("old", "0.27.0"), ("new", "0.32.0")):
        for eager in (False, True):
            ok = install == "new" or eager
            rows.append(rec("02_context_budget", "head", 4096, 8 << 20, "ready" if ok else "failed",
                            install=install, vllm_version=version, argv=EAGER if eager else EAGER[:-1],
                            trial_id=f"{install}-{eager}", **(load(4, 100.0 + eager) if ok else {})))  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory):
    run = write_run(tmp_path_factory.mktemp("eager"), installs_by_eager())
    return run, report.build_report(run, for_issue=True)


def test_which_version_changed_what_names_the_flag(eager_run):
    text = eager_run[1]["md"].read_text()
    installs = section(text, "## vLLM installs side by side")
    assert "Nothing: every configuration did the same" not in installs
    assert (
        "flags none, head, max_model_len 4096, KV 8 MiB: old (vLLM 0.27.0) failed: cuda_oom; "
        "new (vLLM 0.32.0) starts." in installs
    )
    assert "| flags | launcher | max_model_len | memory | old (vLLM 0.27.0) | new (vLLM 0.32.0) |" in installs


def test_working_configs_headline_and_frontier_keep_every_configuration(eager_run):
    df = report.load_run(eager_run[0])
    working = report.working_configs(df)
    assert len(working) == 3 and list(working.columns[:1]) == ["install, flags"]
    assert set(working["install, flags"]) == {
        "old (vLLM 0.27.0), --enforce-eager", "new (vLLM 0.32.0), none", "new (vLLM 0.32.0), --enforce-eager",
    }  # fmt: skip
    assert working["ready"].tolist() == ["1/1"] * 3  # never "1/2": old without the flag is its own row
    headline = report.verdict(df)["headline"]
    assert "**Nothing started** for install, flags `old (vLLM 0.27.0), none` (1 trial(s))" in headline
    assert "old (vLLM 0.27.0), none" not in headline.split("**Nothing started**")[0]  # not under "Works"
    frontier = report.load_report.frontier(df)
    assert len(frontier) == 3 and sorted(frontier["output tok/s at that"]) == [100.0, 101.0, 101.0]


def test_every_summary_groups_by_the_whole_key():
    """The configuration key includes engine (vllm where a record has none), so engines never merge."""
    df = hypotheses.prepare(
        [rec("s", "head", 4096, 1, "ready"), rec("s", "head", 4096, 1, "failed", engine="llamacpp")]
    )
    assert df["engine"].tolist() == ["vllm", "llamacpp"]
    assert "engine" in configs.key_columns()
    assert report.working_configs(df)["engine"].tolist() == ["vllm"]
    assert configs.engine_flags(
        ["vllm", "serve", "m", "--port", "9", "--enforce-eager", "--dtype", "half"]
    ) == ("--dtype half --enforce-eager")


# ---- 13: a lost Ray attempt is no trial --------------------------------------------------------------------


def test_a_lost_attempt_is_listed_apart_and_counted_nowhere(tmp_path):
    lost = rec("02_context_budget", "head", 4096, 8 << 20, "failed", failure="infrastructure", trial_id="t1",
               evidence="worker died", node="gpu-box-2")  # fmt: skip
    again = rec("02_context_budget", "head", 4096, 8 << 20, "ready", trial_id="t1")
    run = write_run(tmp_path, [lost, again])
    paths = report.build_report(run, for_issue=True)
    text = paths["md"].read_text()
    verdict = section(text, "## Verdict")
    assert "(ready 1/1, long request ok)" in verdict and "1/2" not in text
    assert "infrastructure" not in section(text, "## Trials").split("## Lost attempts")[0]
    lost_part = section(text, "## Lost attempts (infrastructure)")
    assert "| t1 | 02_context_budget | gpu-box-2 |" in lost_part
    grid = plots.grid_rows(report.load_run(run))
    assert len(grid) == 1 and plots.cell_text(grid) == "ready"
    issue = paths["issue"].read_text()
    assert "Lost attempts" in issue and "1/2" not in issue


# ---- 18: two models, which row is which ------------------------------------------------------------------


def two_models() -> list[dict]:
    awq = str(HOME_MODELS / "tiny-qwen2-awq")
    return [
        rec("01_restore_launcher", "legacy", 16384, 10 << 20, "failed", model=awq, failure="quantization_mismatch",
            evidence=f"Quantization method in {awq}/config.json (awq) does not match awq_marlin"),
        rec("02_context_budget", "head", 16384, 10 << 20, "unstable", model=awq, long_request_ok=False, failure=None),
        rec("02_context_budget", "head", 20352, 10 << 20, "ready", kv_cache_tokens=20352,
            predicted_kv_cache_tokens=20352, log_path=str(REPO_ROOT / "outputs" / "r1" / "logs" / "a.log")),
        rec("02_context_budget", "head", 32768, 20 << 20, "ready", model=awq, kv_cache_tokens=40832),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def models_run(tmp_path_factory):
    run = write_run(tmp_path_factory.mktemp("models"), two_models())
    return run, report.build_report(run, for_issue=True)


def test_every_table_says_which_model(models_run):
    text = models_run[1]["md"].read_text()
    verdict = section(text, "## Verdict")
    assert "| model | launcher | max_model_len | memory | ready |" in verdict
    assert "| tiny-qwen2 | head | 20352 | KV 10 MiB | 1/1 |" in verdict
    assert "| tiny-qwen2-awq | head | 16384 | KV 10 MiB | 0/1, 1 unstable | failed |" in verdict
    assert "model `tiny-qwen2`: launcher `head`, max_model_len 20352" in verdict
    assert "| model | launcher | memory | largest stable max_model_len |" in verdict
    assert "**Largest stable max_model_len** per model, launcher and memory setting" in verdict
    capacity = section(text, "## Capacity against memory setting")
    assert (
        "| model | trial |" in capacity and "| tiny-qwen2-awq | 02_context_budget-head-len32768" in capacity
    )
    assert "| # | trial | step | model | backend |" in section(text, "## Trials")
    issue = models_run[1]["issue"].read_text()
    assert "| model, launcher, max_model_len | KV 10 MiB | KV 20 MiB |" in issue
    assert "| tiny-qwen2-awq, head, len 16384 | unstable |" in issue
    assert "| tiny-qwen2, head, len 20352 | ready |" in issue
    assert 'title "KV cache tokens per memory setting: model tiny-qwen2-awq"' in issue
    html = models_run[1]["html"].read_text()
    assert "<th>model</th>" in html and "<td>tiny-qwen2-awq</td>" in html


def test_unstable_never_takes_the_colour_of_a_clean_start():
    df = hypotheses.prepare(two_models())
    fig = plots.outcome_grid_figure(df)
    ax = fig.axes[0]
    colors = {tuple(c) for c in ax.collections[0].get_facecolors().round(3) if c[3] > 0}  # not run: none
    assert len(colors) == 3  # ready, unstable, failed: three colours
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "tiny-qwen2-awq · head · len 16384" in labels and "tiny-qwen2 · head · len 20352" in labels
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "unstable (came up, then failed)" in legend and "ready (every trial)" in legend


# ---- 23: no absolute local path --------------------------------------------------------------------------


def test_reports_print_no_local_path(models_run):
    _, paths = models_run
    for name in ("md", "html", "issue"):
        text = paths[name].read_text()
        assert str(Path.home()) not in text and str(REPO_ROOT) not in text, name
    text = paths["md"].read_text()
    assert "model tiny-qwen2-awq, tiny-qwen2." in text  # the run line names the models, in run order
    assert "Quantization method in ~/models/tiny-qwen2-awq/config.json" in text
    assert render.local_paths(f"{REPO_ROOT}/outputs/x and {Path.home()}/m") == "outputs/x and ~/m"


def test_model_names_never_paths():
    assert configs.model_name("/home/ann/models/Qwen3-8B-AWQ/") == "Qwen3-8B-AWQ"
    assert configs.model_name("Qwen/Qwen3-8B-AWQ") == "Qwen/Qwen3-8B-AWQ"
    hub = "/home/ann/.cache/huggingface/hub/models--Qwen--Qwen3-8B/snapshots/abc123"
    assert configs.model_name(hub) == "Qwen/Qwen3-8B"
    assert configs.model_name(".cache/models/tiny-qwen2") == "tiny-qwen2"


# ---- 19: the renderers are leaves ------------------------------------------------------------------------


def imports(module: str) -> set[str]:
    tree = ast.parse((LIB / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):  # function-level imports too
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m.removeprefix("vllm_lab.") for m in out if m.startswith("vllm_lab")}


@pytest.mark.parametrize("leaf", ["render", "issue_report", "attach"])
def test_renderers_never_import_the_summary(leaf):
    seen = imports(leaf)
    assert not seen & {"report", "issue_report", "attach"} - {leaf}, seen
    assert "render" not in seen or leaf != "render"


def test_the_summary_feeds_every_renderer():
    seen = imports("report")
    assert {"render", "issue_report", "attach", "configs"} <= seen


def test_executed_notebooks_show_no_local_path_but_stay_runnable(tmp_path):
    import nbformat
    from vllm_lab.batch import redact_executed

    model = str(HOME_MODELS / "tiny-qwen2")
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(f'MODEL = "{model}"')
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"loaded {model}\n")]
    nb.cells = [cell]
    path = tmp_path / "01.ipynb"
    nbformat.write(nb, path)
    redact_executed(path)
    (cell,) = nbformat.read(path, as_version=4).cells
    assert cell.source == f'MODEL = "{model}"'  # a rerun from the run folder finds the model
    assert cell.outputs[0]["text"] == "loaded ~/models/tiny-qwen2\n"
    shared = render.redact_notebook(nbformat.read(path, as_version=4))  # the zip's and the HTML's copy
    assert shared.cells[0].source == 'MODEL = "~/models/tiny-qwen2"'


def test_gpu_types_side_by_side_keep_two_models_apart():
    from vllm_lab import gpu_axis

    awq = str(HOME_MODELS / "tiny-qwen2-awq")
    rows = [
        rec("02", "head", 4096, 1, outcome, model=m, gpu=g, trial_id=f"{m}-{g}")
        for m, outcome in ((awq, "failed"), (str(HOME_MODELS / "tiny-qwen2"), "ready"))
        for g in ("A100", "L4")
    ]
    grid = gpu_axis.outcome_by_gpu(hypotheses.prepare(rows))
    assert grid[["model", "A100", "L4"]].values.tolist() == [
        ["tiny-qwen2", "stable", "stable"],
        ["tiny-qwen2-awq", "failed (cuda_oom)", "failed (cuda_oom)"],
    ]  # merged, one cell read "failed (cuda_oom), stable"
    largest = gpu_axis.largest_by_gpu(hypotheses.prepare(rows))
    assert len(largest) == 4 and "model" in largest.columns


def test_seconds_to_outcome_names_the_model_of_each_bar():
    fig = plots.seconds_figure(hypotheses.prepare(two_models()))
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0].startswith("01_restore_launcher") and labels[0].endswith("(tiny-qwen2-awq)")


def test_a_llamacpp_row_names_its_memory_limit_and_no_vllm_launcher():
    """Before: llama.cpp trials read "launcher head, memory default" (H7's run): a limit is its memory setting."""
    rows = [
        new_record(model="/x/tiny.gguf", engine="llamacpp", launcher="head", max_model_len=13568,
                   memory_limit=210 << 20, outcome="ready", long_request_ok=True, argv=["llama-server"]),
        new_record(model="/x/tiny", launcher="head", max_model_len=20352, kv_cache_memory_bytes=10 << 20,
                   outcome="ready", long_request_ok=True, argv=["python", "-m", "vllm"]),
    ]  # fmt: skip
    df = hypotheses.prepare(rows)
    by = df.set_index("engine")
    assert by.loc["llamacpp", "memory_label"] == "limit 210 MiB" and by.loc["llamacpp", "launcher"] == "—"
    assert by.loc["vllm", "memory_label"] == "KV 10 MiB" and by.loc["vllm", "launcher"] == "head"


def test_an_install_of_another_engine_is_labelled_with_its_own_version():
    """Before: a llama.cpp install read "llamacpp (vLLM version not reported)"."""
    rows = [
        new_record(model="/x/tiny.gguf", engine="llamacpp", engine_version="11549", install="cpp", outcome="failed"),
        new_record(model="/x/tiny", install="new", vllm_version="0.32.0", outcome="ready"),
    ]  # fmt: skip
    labels = set(hypotheses.prepare(rows)["install_label"])
    assert labels == {"cpp (llama.cpp build 11549)", "new (vLLM 0.32.0)"}


def test_an_install_of_another_engine_is_no_vllm_version_to_compare():
    """Before: the CPU demo's llama.cpp install made "vLLM installs side by side" say "Nothing: every
    configuration did the same on vLLM 0.32.0, llamacpp (llama.cpp build 11549)"."""
    from vllm_lab.install_compare import compare_blocks

    rows = [
        new_record(model="/x/tiny.gguf", engine="llamacpp", engine_version="11549", install="cpp", outcome="failed",
                   launcher="head", max_model_len=4096),
        new_record(model="/x/tiny", vllm_version="0.32.0", outcome="ready", launcher="head", max_model_len=4096),
    ]  # fmt: skip
    assert compare_blocks(hypotheses.prepare(rows)) == []
