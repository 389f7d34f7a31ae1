"""JupyterLab reruns: RUN_DIR from the repo root or the run folder, reuse said out loud, and real browsers.

The browser tests start a JupyterLab server of this venv and Debian's chromium (driven by Playwright for
Python through executable_path; `make browser` installs it), run 02_context_budget with "Run All" as a
person would, and open report.html; servers and browsers are always ended by their fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nbformat
import psutil
import pytest
from conftest import FAKE_CMD
from vllm_lab import paths, record, steps

REPO = paths.REPO_ROOT


# ---- RUN_DIR -----------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_relative_run_dir_is_the_repo_roots_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO / "notebooks")  # where JupyterLab runs a notebook of notebooks/
    assert paths.resolve_run_dir("outputs/adhoc") == REPO / "outputs" / "adhoc"
    monkeypatch.chdir(tmp_path)
    assert paths.resolve_run_dir("outputs/adhoc") == REPO / "outputs" / "adhoc"
    assert paths.resolve_run_dir(tmp_path / "run") == tmp_path / "run"


@pytest.mark.unit
def test_step_params_resolve_run_dir_from_the_repo_root(monkeypatch, fake_model):
    monkeypatch.chdir(REPO / "notebooks")
    p = steps.step_params(
        {"RUN_DIR": "outputs/adhoc", "STEP": "s", "MODEL": str(fake_model), "VLLM_CMD": FAKE_CMD}
    )
    assert p.run_dir == str(REPO / "outputs" / "adhoc")


@pytest.mark.unit
def test_a_moved_run_folder_is_found_from_its_notebook(tmp_path, capsys):
    run = tmp_path / "unzipped" / "20261129-demo"
    (run / "notebooks").mkdir(parents=True)
    record.append_record(run, record.new_record(trial_id="t", outcome="ready"))
    gone = "/home/someone/vllm-lab/outputs/20261129-demo"  # the RUN_DIR the batch wrote into the notebook
    assert paths.resolve_run_dir(gone, cwd=run / "notebooks") == run
    assert f"using the run folder of this notebook: {run}" in capsys.readouterr().out
    assert paths.resolve_run_dir(run, cwd=run / "notebooks") == run  # a RUN_DIR that holds records stays
    assert paths.resolve_run_dir(gone, cwd=tmp_path) == Path(gone)  # not in a run folder: as given


@pytest.mark.unit
def test_a_trial_already_recorded_is_reused_and_says_so(run_dir, fake_model, capsys):
    from conftest import fake_trial

    trial = fake_trial(fake_model)
    rec = record.new_record(trial_id=trial.trial_id, outcome="ready", started_at="2026-11-29T01:00:00+00:00")
    record.append_record(run_dir, rec)
    assert steps.run_or_reuse(trial, run_dir)["outcome"] == "ready"
    out = capsys.readouterr().out
    assert f"{trial.trial_id}: reused the record from 2026-11-29T01:00:00+00:00" in out
    assert "change one to launch again" in out
    assert len(record.read_records(run_dir).rows) == 1


# ---- browsers: JupyterLab and report.html in Debian's chromium --------------------------------------------

KV_LOW = 10 * 2**20  # the fake's 512 B/token: 20480 tokens, so 32768 fails with kv_cache_insufficient
TOKEN = "vllm-lab-test-token"
RUNS = Path(__file__).parent / "fixtures" / "runs"


def chromium_path() -> str:
    """Debian's chromium binary (its /usr/bin/chromium is a shell wrapper); `make browser` installs it."""
    for path in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if path and Path(path).is_file():
            return path
    pytest.fail("chromium not found: `make browser` installs Debian's chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def keep_screenshot(page, tmp: Path, name: str) -> Path:
    """A screenshot under the test's tmp dir, copied to outputs/screenshots/ for a person to look at."""
    shot = page.screenshot(path=str(tmp / name))
    kept = REPO / "outputs" / "screenshots" / name
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(shot)
    print(f"screenshot: {kept}")
    return kept


class Lab:
    """A JupyterLab server of this venv on loopback, isolated from the user's Jupyter config."""

    def __init__(self, root: Path, state: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "JUPYTER_CONFIG_DIR": str(state / "config"), "JUPYTER_RUNTIME_DIR": str(state / "rt"),
               "JUPYTERLAB_SETTINGS_DIR": str(state / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(state / "ws"),
               "IPYTHONDIR": str(state / "ipython")}  # fmt: skip
        # every cell rendered (JupyterLab 4 draws only visible ones) and the notebook's own kernel started
        tracker = state / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
        tracker.parent.mkdir(parents=True)
        tracker.write_text(json.dumps({"windowingMode": "none", "autoStartDefaultKernel": True}))
        news = state / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        news.parent.mkdir(parents=True)
        news.write_text(json.dumps({"fetchNews": "false"}))  # no news prompt over the outputs
        self.log = (state / "lab.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}",
             f"--ServerApp.root_dir={root}", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             "--LabApp.news_url=None", *(["--ServerApp.allow_root=True"] if os.geteuid() == 0 else [])],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"jupyter lab exited: {Path(self.log.name).read_text()[-2000:]}"
            try:
                if httpx.get(f"{self.url}/api/status", params={"token": TOKEN}, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"jupyter lab not ready in {timeout_s} s: {Path(self.log.name).read_text()[-2000:]}")

    def shutdown_kernels(self) -> None:
        """Every kernel this server started, shut down and gone (each test ends its own)."""
        api = f"{self.url}/api/kernels"
        for kernel in httpx.get(api, params={"token": TOKEN}).json():
            httpx.delete(f"{api}/{kernel['id']}", params={"token": TOKEN}, timeout=60)
        gone = psutil.wait_procs(psutil.Process(self.proc.pid).children(recursive=True), timeout=30)[1]
        assert not gone, f"kernels still alive: {gone}"

    def stop(self) -> None:
        """The server and every kernel it started (its session), TERM then KILL."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        finally:
            self.log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "root"
    root.mkdir()
    server = Lab(root, tmp)
    try:
        server.wait_ready()
        specs = httpx.get(f"{server.url}/api/kernelspecs", params={"token": TOKEN}).json()["kernelspecs"]
        assert "vllm-lab" in specs, "kernel vllm-lab not registered: `make setup` registers it"
        assert Path(specs["vllm-lab"]["spec"]["argv"][0]).parent == Path(sys.executable).parent  # this venv
        yield server
    finally:
        server.stop()
        assert server.proc.poll() is not None


def executed_step_notebook(run: Path, name: str, params: dict) -> Path:
    """notebooks/02_context_budget.ipynb as the batch leaves it in <run>/notebooks/: parameters injected."""
    nb = nbformat.read(REPO / "notebooks" / "02_context_budget.ipynb", as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "# Parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(at + 1, cell)
    path = run / "notebooks" / f"{name}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def run_all(page, lab: Lab, path: Path, wait_for: str, timeout_s: float = 120) -> None:
    """Open the notebook (or reuse its tab), Run > Run All Cells, wait for wait_for and an idle kernel."""
    from playwright.sync_api import expect

    rel = path.relative_to(lab.root).as_posix()
    if f"/lab/tree/{rel}" not in page.url:
        page.goto(f"{lab.url}/lab/tree/{rel}?token={TOKEN}")
    idle = page.locator(
        ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator[data-status='idle']"
    )
    expect(idle).to_be_visible(timeout=60_000)
    select = page.locator(".jp-Dialog", has_text="Select Kernel")  # kernelspecs not loaded yet: its own pick
    with contextlib.suppress(AssertionError):
        expect(select).to_be_visible(timeout=2_000)
        assert select.locator("select").input_value() == "vllm-lab"
        select.get_by_role("button", name="Select").click()
    done = page.locator(".jp-OutputArea-output", has_text=wait_for).first
    busy = page.locator(".jp-InputPrompt", has_text="[*]").first
    for _ in range(3):  # a click while the kernel is still connecting can be dropped: click again
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        with contextlib.suppress(AssertionError):
            expect(done.or_(busy)).to_be_attached(timeout=15_000)
            break
    expect(done).to_be_attached(timeout=timeout_s * 1000)
    expect(page.locator(".jp-InputPrompt", has_text="[*]")).to_have_count(0, timeout=timeout_s * 1000)
    expect(idle).to_be_visible(timeout=30_000)


def error_outputs(page) -> list[str]:
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    return [errors.nth(i).inner_text() for i in range(errors.count())]


def lab_rerun(browser, lab: Lab, vllm_cmd: str, model: Path, kv_bytes: int, tmp: Path, shot: str, again=True):
    """The issue's scenario: a run folder's executed 02_context_budget, Run All in JupyterLab; then (again)
    MAX_MODEL_LEN changed and Run All (a second record), and once more unchanged (reused, said in the page)."""
    # One run folder per scenario: the module-scoped JupyterLab serves both the fake and the real run.
    run = lab.root / "outputs" / f"20261129-000000-lab-{Path(shot).stem}"
    params = {"RUN_DIR": str(run), "STEP": "02_context_budget_085", "MODEL": str(model), "VLLM_CMD": vllm_cmd,
              "MAX_MODEL_LEN": 32768, "KV_CACHE_MEMORY_BYTES": kv_bytes, "STARTUP_TIMEOUT_S": 300.0}  # fmt: skip
    nb_path = executed_step_notebook(run, "02_context_budget_085", params)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        run_all(page, lab, nb_path, "evidence: ", timeout_s=300)
        (first,) = record.read_records(run).rows
        assert first["outcome"] == "failed" and first["failure"] == "kv_cache_insufficient", first
        evidence = page.get_by_text(f"evidence: {first['evidence']}")
        evidence.scroll_into_view_if_needed()
        assert evidence.is_visible()
        assert error_outputs(page) == []
        keep_screenshot(page, tmp, shot)
        if again:
            rerun_changed_then_same(page, lab, run, nb_path, first)
        return run
    except Exception:
        keep_screenshot(page, tmp, "failed-" + shot)
        raise
    finally:
        page.close()
        lab.shutdown_kernels()


def rerun_changed_then_same(page, lab: Lab, run: Path, nb_path: Path, first: dict) -> None:
    # MAX_MODEL_LEN changed in the injected cell, as a person would: a new trial, nothing overwritten
    editor = page.locator(".jp-Cell", has_text="# Parameters").locator(".cm-content")
    editor.click()
    page.keyboard.press("Control+End")
    page.keyboard.type("\nMAX_MODEL_LEN = 16384")
    run_all(page, lab, nb_path, "outcome:  ready", timeout_s=300)
    rows = record.read_records(run).rows
    assert [r["max_model_len"] for r in rows] == [32768, 16384] and rows[0] == first
    assert rows[1]["outcome"] == "ready"
    run_all(page, lab, nb_path, "reused the record from")  # same parameters again: nothing launched
    assert len(record.read_records(run).rows) == 2
    assert error_outputs(page) == []


@pytest.mark.fake
def test_jupyterlab_run_all_of_a_run_folder_notebook_records_and_shows_the_evidence(
    browser, lab, tmp_path, capsys
):
    from conftest import FAKE_MODEL_CONFIG
    from vllm_lab.cli import main

    model = lab.root / "models" / "tiny-fake"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(FAKE_MODEL_CONFIG))
    run = lab_rerun(browser, lab, FAKE_CMD, model, KV_LOW, tmp_path, "lab-02-fake.png")
    assert main(["report", str(run)]) == 0  # the report rebuilds with both records
    md = (run / "report.md").read_text()
    assert "02_context_budget_085-head-len16384" in md and "02_context_budget_085-head-len32768" in md


@pytest.mark.vllm
def test_jupyterlab_run_all_against_the_real_cpu_build(browser, lab, tmp_path):
    from conftest import REAL_CMD, TINY_MODEL

    # once: the launch that fails (kv_cache_insufficient, vLLM's own line); the reruns are the fake's part
    lab_rerun(browser, lab, REAL_CMD, TINY_MODEL, KV_LOW, tmp_path, "lab-02-vllm-cpu.png", again=False)


# ---- report.html: one file, every image loaded, no console error ------------------------------------------


def open_offline(browser, path: Path, tmp: Path, shot: str) -> tuple[list, list]:
    """report.html in chromium with the network cut: (console errors, [naturalWidth of each image])."""
    context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
        page.goto(path.as_uri(), wait_until="load")
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        page.locator("img").first.scroll_into_view_if_needed()
        keep_screenshot(page, tmp, shot)
        return errors, widths
    finally:
        context.close()


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    """A run folder's report both ways: 99_report executed by papermill (as `vllm-lab run` does) and
    `vllm-lab report` (no kernel)."""
    from vllm_lab import batch, report

    run = tmp_path_factory.mktemp("report") / "p40_factorial"
    shutil.copytree(RUNS / "p40_factorial", run)
    (run / "notebooks").mkdir()
    executed = run / "notebooks" / "99_report.ipynb"
    assert batch.execute("99_report", executed, {"RUN_DIR": str(run)}, 600) is None
    report.build_report(run)
    return run, executed, report.export_html(executed, run / "report-notebook.html")


@pytest.mark.notebook
def test_report_notebook_figures_are_images(report_run):
    _, executed, _ = report_run
    nb = nbformat.read(executed, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    figures = [o for o in outputs if str(o.get("data", {}).get("text/plain", "")).startswith("<Figure")]
    assert len(figures) >= 5  # grid, capacity, seconds, timeline, search (the load's when a trial ran one)
    assert all("image/png" in o["data"] for o in figures)


@pytest.mark.notebook
@pytest.mark.parametrize("name", ["report.html", "report-notebook.html"])
def test_report_html_opens_offline_with_every_image_and_no_console_error(report_run, browser, tmp_path, name):
    run, _, _ = report_run
    errors, widths = open_offline(browser, run / name, tmp_path, f"report-{Path(name).stem}.png")
    assert errors == []
    assert len(widths) >= 5 and all(w > 0 for w in widths), widths


# ---- make lab and the kernel ------------------------------------------------------------------------------


@pytest.mark.unit
def test_make_lab_serves_loopback_with_a_token_at_notebooks():
    out = subprocess.run(["make", "-n", "lab"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    line = " ".join(out.replace("\\\n", " ").split())
    assert "jupyter lab --ServerApp.ip=127.0.0.1" in line and f"--ServerApp.root_dir={REPO}" in line
    token = line.split("--IdentityProvider.token=")[1].split()[0]
    assert len(token) >= 32 and "--LabApp.default_url=/lab/tree/notebooks" in line


@pytest.mark.unit
def test_notebooks_ask_for_the_projects_kernel():
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        assert nbformat.read(path, as_version=4).metadata["kernelspec"]["name"] == "vllm-lab", path.name
