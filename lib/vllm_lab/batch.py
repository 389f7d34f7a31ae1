"""Run a plan: each step's notebook through papermill, in plan order, then the report notebook.

The only module that imports papermill. A failed trial is a row in trials.jsonl, never the end of the
batch; a notebook that raises is kept (papermill saves it with the error) and reported, and the batch goes on.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_lab import record
from vllm_lab.paths import NOTEBOOK_DIR, OUTPUTS_DIR
from vllm_lab.plan import Plan, load_plan
from vllm_lab.spec import SpecError

KERNELS = ("vllm-lab", "python3")  # `make setup` registers vllm-lab (this venv's python by path)
START_TIMEOUT_S = 120
REPORT_NOTEBOOK = "99_report"
LOCK_NAME = "vllm-lab.lock"


@dataclass
class RunSummary:
    run_dir: Path
    notebooks: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "step: what went wrong"
    report_paths: dict = field(default_factory=dict)


def new_run_dir(plan: Plan, out: str | None) -> Path:
    from vllm_lab.probe import new_run_id

    parent = Path(out).expanduser().absolute() if out else OUTPUTS_DIR  # notebooks get it: cwd differs
    d = parent / f"{new_run_id()}-{plan.name}"
    d.mkdir(parents=True, exist_ok=False)
    return d


class DeviceLock:
    """One batch per machine at a time: two batches on one GPU would measure each other."""

    def __init__(self, wait: bool):
        self.wait = wait
        self.path = Path(os.environ.get("VLLM_LAB_LOCK_DIR", "/tmp")) / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "another batch"
            os.close(self.fd)
            raise SpecError(
                f"lock: another vllm-lab batch is running on this machine (pid {holder}); wait for it, "
                "or run with VLLM_LAB_WAIT_LOCK=1 to queue behind it"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


class TrialProgress:
    """A progress bar over trials, fed by trials.jsonl growing (the notebooks run in a kernel).

    The total is dryrun.expected_trial_count: exact for every step but a search, whose launches are a guess
    until it ends; when the batch ends the total becomes the trials that ran, so the bar ends at n/n. A lost
    Ray attempt (failure infrastructure) is no trial: its rerun is."""

    def __init__(self, run_dir: Path, total: int | None):
        from tqdm import tqdm

        self.run_dir = run_dir
        self.bar = tqdm(total=total, unit="trial", desc="trials", file=sys.stderr, dynamic_ncols=True)
        self.start = self._count()
        self.bar.update(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _count(self) -> int:
        from vllm_lab.configs import INFRA

        rows = record.read_records(self.run_dir, keep_torn_aside=False).rows
        return sum(r.get("failure") != INFRA for r in rows)

    def _poll(self):
        while not self._stop.wait(1.0):
            self._catch_up()

    def _catch_up(self):
        n = self._count()
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc):
        self._stop.set()
        self._thread.join()
        self._catch_up()
        if (
            exc_type is None and self.bar.total != self.bar.n
        ):  # a search ran more or fewer launches than guessed
            self.bar.total = self.bar.n
            self.bar.refresh()
        self.bar.close()


def kernel_name() -> str:
    """The Jupyter kernel that runs this very Python, so the notebooks import this vllm-lab: `vllm-lab` as
    `make setup` registers it, else ipykernel's own `python3`. A user-level `python3` kernelspec (a conda's,
    say) wins over the native one in Jupyter's lookup and may run another Python: SpecError, one line."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm, seen = KernelSpecManager(), []
    for name in KERNELS:
        try:
            argv = ksm.get_kernel_spec(name).argv
        except NoSuchKernel:
            continue
        if argv and _is_this_python(argv[0]):
            return name
        seen.append(f"{name!r} runs {argv[0] if argv else 'nothing'}")
    raise SpecError(
        f"no Jupyter kernel runs this Python ({sys.executable}): {'; '.join(seen) or 'none found'}; run "
        f"`make setup`, or `{sys.executable} -m ipykernel install --sys-prefix --name vllm-lab`"
    )


def _is_this_python(exe: str) -> bool:
    """jupyter_client runs a bare "python"/"python3"/"python3.X" as sys.executable itself; otherwise the same
    bin folder (the same venv) and the same interpreter: a venv's python and python3 are one program, and
    pip's console scripts (pytest, vllm-lab) run as python3 where `ipykernel install` wrote python."""
    bare = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    if exe in bare:
        return True
    mine, theirs = os.path.abspath(sys.executable), os.path.abspath(exe)
    return os.path.dirname(mine) == os.path.dirname(theirs) and os.path.realpath(mine) == os.path.realpath(
        theirs
    )


def execute(notebook: str, out_path: Path, parameters: dict, timeout_s: float) -> str | None:
    """Run one notebook; return None on success or a one-line error (the executed notebook is kept)."""
    import papermill as pm
    import zmq
    from traitlets.config import Config

    # The kernel logs to our terminal. Its channels get CurveZMQ keys (ipykernel's kernelspec declares them)
    # instead of its plain-TCP warning; its log stays at CRITICAL because jupyter_client SIGINTs every kernel
    # before shutting it down, and one caught mid-reply logs a harmless "KeyboardInterrupt caught in kernel".
    kernel = Config(KernelManager={"transport_encryption": "auto" if zmq.has("curve") else "disabled"})
    try:
        pm.execute_notebook(
            str(NOTEBOOK_DIR / f"{notebook}.ipynb"), str(out_path), parameters=parameters, kernel_name=kernel_name(),
            start_timeout=START_TIMEOUT_S, execution_timeout=int(timeout_s), progress_bar=False,
            cwd=str(NOTEBOOK_DIR.parent), log_output=False,
            config=kernel, extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
        )  # fmt: skip
    except pm.PapermillExecutionError as e:
        return f"{e.ename}: {e.evalue}".splitlines()[0]
    except Exception as e:  # kernel died, timeout, ...: keep going with the next step
        return f"{type(e).__name__}: {e}".splitlines()[0]
    finally:
        redact_executed(out_path)
    return None


def redact_executed(path: Path) -> None:
    """Executed notebooks carry the injected parameters (extra args, env): no secret may stay in them."""
    import nbformat

    from vllm_lab.redact import redact_obj
    from vllm_lab.render import redact_notebook

    if path.exists():
        nb = redact_notebook(nbformat.read(path, as_version=4), runnable=True)
        nb.metadata = nbformat.from_dict(redact_obj(nb.metadata))  # papermill keeps the parameters here too
        nbformat.write(nb, path)


def _mark_kernels_as_ours() -> None:
    from vllm_lab.launcher import BATCH_PID_ENV

    os.environ[BATCH_PID_ENV] = str(os.getpid())  # kernels inherit it: see launcher.bind_kernel_to_batch


def run_plan(plan_path: str, *, out: str | None = None, resume: str | None = None, dry_run: bool = False,
             only: list[str] | None = None, ray: str | None = None) -> RunSummary:  # fmt: skip
    plan = load_plan(plan_path, check_command=not dry_run)
    if plan.per_gpu_type and ray is None and not dry_run:
        raise SpecError(
            "per_gpu_type: true needs a Ray cluster with several GPU types; run with --ray ADDRESS (or "
            "--ray local), or set per_gpu_type: false"
        )
    steps = [s for s in plan.steps if not only or s.name in only]
    if only and len(steps) != len(set(only)):
        missing = sorted(set(only) - {s.name for s in plan.steps})
        raise SpecError(
            f"--only: no step named {missing[0]!r}; steps are {', '.join(s.name for s in plan.steps)}"
        )
    if dry_run:
        from vllm_lab.dryrun import print_dry_run

        print_dry_run(plan, steps)
        return RunSummary(run_dir=Path("-"))
    if resume:
        run_dir = Path(resume).expanduser().absolute()
        if not run_dir.is_dir():
            raise SpecError(
                f"--resume: {resume} is not a run folder; pass an earlier outputs/<run_id> folder"
            )
        _report_torn(run_dir)
    else:
        run_dir = None
    kernel_name()  # a kernel that runs another Python would fail every step: say so before anything runs
    from vllm_lab.hub import prefetch

    # a hub model is downloaded once, before the first trial (not inside a trial's start-up timeout)
    for model in dict.fromkeys(s.model for s in steps):
        prefetch(model, plan.vllm_cmd, plan.defaults.get("env"), plan.defaults.get("extra_args", ()))
    from vllm_lab.installs import ensure_plan

    ensure_plan(plan)  # pinned vLLM releases: installed once (cached) before the first trial
    wait = os.environ.get("VLLM_LAB_WAIT_LOCK") == "1"
    with DeviceLock(wait=wait):
        if run_dir is not None:  # a killed run may have left its servers behind: they are ours to end
            from vllm_lab.launcher import reap

            for pid in reap(run_dir):
                print(f"ended server pid {pid} left by the interrupted run", file=sys.stderr)
        run_dir = run_dir or new_run_dir(plan, out)
        summary = RunSummary(run_dir=run_dir)
        _mark_kernels_as_ours()
        nb_dir = run_dir / "notebooks"
        nb_dir.mkdir(exist_ok=True)
        print(f"run folder: {run_dir}", flush=True)
        from vllm_lab.dryrun import expected_trial_count

        try:
            if ray is not None:
                steps = _start_ray(ray, plan, steps, run_dir, resumed=resume is not None)
            with TrialProgress(run_dir, expected_trial_count(plan, steps)):
                _run_steps(plan, steps, run_dir, nb_dir, summary, parallel=ray is not None)
        finally:
            if ray is not None:
                from vllm_lab import ray_exec

                ray_exec.end_session()
        summary.report_paths = build_report(run_dir, nb_dir, summary)
    return summary


def _start_ray(address: str, plan: Plan, steps: list, run_dir: Path, *, resumed: bool) -> list:
    """Connect the run to Ray (its kernels send their trials there); the steps, once per GPU type if asked."""
    from vllm_lab import ray_exec

    ray_exec.connect(address)
    if resumed:  # servers a killed run left on other nodes are ours to end too
        for node in ray_exec.reap_nodes(run_dir, address):
            for e in node["ended"]:
                print(
                    f"ended server pid {e['pid']} on {node['node']} left by the interrupted run",
                    file=sys.stderr,
                )
    pins: dict[str, str] = {}
    if plan.per_gpu_type:
        steps, pins = ray_exec.per_gpu_type_steps(steps, ray_exec.gpu_types())
    ray_exec.start_session(address, run_dir, pins=pins, retries=plan.retries, plan=plan, steps=steps)
    return steps


def _run_steps(plan: Plan, steps: list, run_dir: Path, nb_dir: Path, summary: RunSummary, *,
               parallel: bool) -> None:  # fmt: skip
    """Each step's notebook through papermill: in plan order, or under Ray several at once (the cluster
    queues their trials); notebooks and errors are listed in plan order either way."""

    def one(step) -> tuple[Path, str | None]:
        out_nb = nb_dir / f"{step.name}.ipynb"
        err = execute(step.notebook, out_nb, plan.notebook_parameters(step, run_dir), step.timeout_s)
        if err:
            print(f"step {step.name} raised {err} (notebook kept: {out_nb})", file=sys.stderr, flush=True)
        return out_nb, err

    if parallel and len(steps) > 1:
        from concurrent.futures import ThreadPoolExecutor

        workers = max(1, min(len(steps), int(os.environ.get("VLLM_LAB_RAY_STEPS", "4"))))  # one kernel each
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="step") as pool:
            results = list(pool.map(one, steps))
    else:
        results = [one(step) for step in steps]
    for step, (out_nb, err) in zip(steps, results, strict=True):
        summary.notebooks.append(out_nb)
        if err:
            summary.errors.append(f"{step.name}: {err}")


REPORT_NOTEBOOK_HTML = "report-notebook.html"


def build_report(run_dir: Path, nb_dir: Path, summary: RunSummary) -> dict:
    """report.html, report.md and report-issue.md from the run's one summary (report.build_report); the
    executed report notebook beside them (its HTML as report-notebook.html), never in report.html's place."""
    from vllm_lab.render import export_html
    from vllm_lab.report import build_report as write_reports

    out_nb = nb_dir / f"{REPORT_NOTEBOOK}.ipynb"
    err = execute(REPORT_NOTEBOOK, out_nb, {"RUN_DIR": str(run_dir)}, 900)
    paths = write_reports(run_dir, for_issue=True)
    if err:
        summary.errors.append(f"{REPORT_NOTEBOOK}: {err}")
    else:
        paths["report_notebook_html"] = export_html(out_nb, run_dir / REPORT_NOTEBOOK_HTML)
    paths["report_notebook"] = out_nb
    return paths


def _report_torn(run_dir: Path) -> None:
    torn = record.read_records(run_dir).torn
    if torn:
        print(f"{len(torn)} torn line(s) in {run_dir / record.TRIALS_FILE} (a crash mid-write) kept aside in "
              f"{record.TRIALS_FILE}.torn; those trials run again", file=sys.stderr)  # fmt: skip


def cli_run(args) -> int:
    t0 = time.monotonic()
    summary = run_plan(args.plan, out=args.out, resume=args.resume, dry_run=args.dry_run, only=args.only,
                       ray=getattr(args, "ray", None))  # fmt: skip
    if args.dry_run:
        return 0
    print_answer(summary, time.monotonic() - t0)
    for e in summary.errors:
        print(f"ERROR in {e}", file=sys.stderr)
    return 1 if summary.errors else 0


def _shown(path: Path) -> str:
    """A path as short as it is true: relative to the working folder when under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def print_answer(summary: RunSummary, seconds: float) -> None:
    """The run's answer first (report.verdict_lines: what works, the largest stable context per memory
    setting, the hypotheses, the load's frontier), then where the reports are: a few lines, not every file."""
    from vllm_lab.report import load_run, verdict_lines

    run = summary.run_dir
    print(f"\nVerdict ({run.name}, {seconds:.0f} s):")
    if (run / record.TRIALS_FILE).is_file():
        for line in verdict_lines(load_run(run)):
            print(f"  {line}")
    else:
        print("  no trial was recorded")
    paths = summary.report_paths
    reports = [paths[k] for k in ("html", "md", "issue") if paths.get(k)]
    print(f"\nReports in {_shown(run)}/:")
    if reports:
        print("  " + ", ".join(p.name for p in reports) + "  (report.html opens in a browser; report-issue.md "
              "pastes into a GitHub issue)")  # fmt: skip
    figures = sorted(run.glob("plots/*.png"))
    print(f"  plots/ ({len(figures)} figures), notebooks/ ({len(summary.notebooks)} executed notebooks"
          f"{', ' + paths['report_notebook_html'].name if paths.get('report_notebook_html') else ''}), "
          f"{record.TRIALS_FILE} (every trial)")  # fmt: skip
