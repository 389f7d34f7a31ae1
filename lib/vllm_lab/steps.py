"""What each notebook step runs, as plain functions, so notebooks stay thin and the batch can plan ahead.

A notebook's parameters become `StepParams`; `planned_trials` says which trials a step will launch (the
batch's --dry-run uses it); `run_or_reuse` launches a trial unless the run folder already recorded it
(that is how --resume skips finished work).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from vllm_lab import record
from vllm_lab.spec import DEFAULT_VLLM_CMD, SpecError, Trial, split_cmd

NOTEBOOKS = (
    "00_preflight",
    "01_restore_launcher",
    "02_context_budget",
    "03_max_context_search",
    "04_hypotheses",
    "05_engines",
)


@dataclass
class StepParams:
    """The parameters every trial notebook takes (UPPER_CASE in the notebook, lower here)."""

    run_dir: str
    step: str
    model: str
    vllm_cmd: str | list[str] = DEFAULT_VLLM_CMD
    launcher: str = "head"
    quantization: str | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_memory_bytes: int | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 120.0
    load: dict | None = None  # LOAD: a load phase after the long request (load_params), None: none
    memory_limit_bytes: int | None = None  # MEMORY_LIMIT_BYTES: the server's address space (CPU)

    def trial(self, **override) -> Trial:
        values = {
            "model": self.model, "launcher": self.launcher, "quantization": self.quantization,
            "max_model_len": self.max_model_len, "gpu_memory_utilization": self.gpu_memory_utilization,
            "kv_cache_memory_bytes": self.kv_cache_memory_bytes, "vllm_cmd": self.vllm_cmd,
            "extra_args": list(self.extra_args), "env": dict(self.env), "startup_timeout_s": self.startup_timeout_s,
            "request_timeout_s": self.request_timeout_s, "step": self.step, "load": self.load,
            "memory_limit_bytes": self.memory_limit_bytes,
        }  # fmt: skip
        values.update(override)
        return Trial(**values)


def memory_levels(utils: list | None, kv_budgets: list | None) -> list[dict]:
    """The memory factor's levels: util fractions on a GPU, KV budgets in bytes on the CPU build."""
    if kv_budgets:
        return [{"kv_cache_memory_bytes": int(b), "gpu_memory_utilization": None} for b in kv_budgets]
    if utils:
        return [{"gpu_memory_utilization": float(u), "kv_cache_memory_bytes": None} for u in utils]
    raise SpecError("memory levels: give UTILIZATIONS (e.g. [0.85, 0.95]) or KV_BUDGETS_BYTES")


def factorial_trials(
    p: StepParams, launchers: list[str], lengths: list[int], mems: list[dict], eager: list | None = None
) -> list[Trial]:
    """H1-H4 as a full factorial: launcher x max_model_len x memory setting [x enforce_eager levels]."""
    if eager is not None and (not eager or not all(isinstance(e, bool) for e in eager)):
        raise SpecError(f"ENFORCE_EAGER: {eager!r} must be a list of true/false levels, e.g. [false, true]")
    # A level sets --enforce-eager in the extra args (removing it for False); None leaves them as given.
    eager_args = [None] if eager is None else [
        [a for a in p.extra_args if a != "--enforce-eager"] + (["--enforce-eager"] if e else []) for e in eager
    ]  # fmt: skip
    return [
        p.trial(launcher=lch, max_model_len=int(n), **m, **({"extra_args": x} if x is not None else {}))
        for lch, n, m, x in itertools.product(launchers, lengths, mems, eager_args)
    ]


def install_factor(trials: list[Trial], installs: dict | None) -> list[Trial]:
    """INSTALLS as a factor: every trial once per install ({name: {vllm_cmd, env}}; the batch fills it from
    the plan's installs). None: not a factor, the trials as they are."""
    if installs is None:
        return trials
    if not isinstance(installs, dict) or not installs:
        raise SpecError(
            f"INSTALLS: {installs!r} must name installs of the plan (installs: section), or in a notebook "
            "of its own map NAME: {vllm_cmd: ..., env: {...}}"
        )
    from dataclasses import replace

    from vllm_lab.paths import resolve_cmd

    return [
        replace(
            t,
            vllm_cmd=split_cmd(resolve_cmd(spec["vllm_cmd"])),
            env={**t.env, **(spec.get("env") or {})},
            install=str(name),
            trial_id="",
        )
        for name, spec in installs.items()
        for t in trials
    ]


def run_or_reuse(trial: Trial, run_dir: str | Path) -> dict:
    """Launch the trial unless this run folder already recorded it (resume)."""
    from vllm_lab.probe import run_trial

    for row in record.read_records(run_dir).rows:
        if row.get("trial_id") == trial.trial_id:
            waited = row.get("seconds_to_outcome") or 0
            if row.get("outcome") == "timeout" and waited < trial.startup_timeout_s * 0.95:
                # the startup timeout is not in the trial id: a start given up sooner is no answer for
                # a run that allows longer (a cold compile cache, a slow disk)
                longer = dataclasses.replace(
                    trial, trial_id=f"{trial.trial_id}-t{int(trial.startup_timeout_s)}"
                )
                print(f"{trial.trial_id}: the record from {row.get('started_at')} timed out after {waited:.0f} s; "
                      f"this run allows {trial.startup_timeout_s:.0f} s: launched again as {longer.trial_id}")  # fmt: skip
                return run_or_reuse(longer, run_dir)
            print(f"{trial.trial_id}: reused the record from {row.get('started_at')} in "
                  f"{Path(run_dir) / record.TRIALS_FILE} (same parameters; change one to launch again)")  # fmt: skip
            return row
    from vllm_lab import ray_exec  # imports ray only under `run --ray`

    if ray_exec.active():  # `vllm-lab run --ray`: the trial runs as a Ray task; the record comes back here
        return ray_exec.run_remote([trial], run_dir)[0]
    return run_trial(trial, run_dir)


def run_trials(trials: list[Trial], run_dir: str | Path, progress: bool = True) -> list[dict]:
    """Run trials in order; a failed trial is a row, never the end of the step."""
    from vllm_lab import ray_exec

    remote = iter(ray_exec.run_remote(trials, run_dir)) if ray_exec.active() else None  # Ray: all at once
    out = []
    for t in trials:
        rec = next(remote) if remote else run_or_reuse(t, run_dir)
        if progress:
            print(f"{t.trial_id}: {rec['outcome']} {rec.get('failure') or ''}".rstrip(), flush=True)
        out.append(rec)
    return out


def records_frame(records: list[dict]):
    """A compact table of records for a notebook's output."""
    import pandas as pd

    cols = ["trial_id", "backend", "launcher", "quantization", "max_model_len", "gpu_memory_utilization",
            "kv_cache_memory_bytes", "outcome", "failure", "kv_cache_tokens", "estimated_max_model_len",
            "long_request_ok", "load_stable", "load_output_tokens_per_s", "seconds_to_outcome", "evidence"]  # fmt: skip
    return pd.DataFrame(records, columns=cols) if records else pd.DataFrame(columns=cols)


def step_params(nb: dict) -> StepParams:
    """A notebook's UPPER_CASE parameters -> StepParams (unknown names are ignored here; plans check them)."""
    from vllm_lab.launcher import bind_kernel_to_batch
    from vllm_lab.paths import resolve_cmd, resolve_path, resolve_run_dir

    bind_kernel_to_batch()  # every trial notebook starts here
    names = {f.upper(): f for f in StepParams.__dataclass_fields__}
    values = {names[k]: v for k, v in nb.items() if k in names}
    values["model"] = resolve_path(values["model"])
    values["run_dir"] = str(resolve_run_dir(values["run_dir"]))  # the repo's outputs/, even from notebooks/
    # .venv-vllm/bin/python from the repo root, whatever the cwd (notebooks/ in JupyterLab)
    values["vllm_cmd"] = split_cmd(resolve_cmd(values.get("vllm_cmd", DEFAULT_VLLM_CMD)))
    values["env"] = {str(k): str(v) for k, v in (values.get("env") or {}).items()}
    values["load"] = load_params(values.get("load"))  # a bad LOAD stops here, before any launch
    return StepParams(**values)


def load_params(value, where: str = "LOAD") -> dict | None:
    """A LOAD parameter as a trial carries it: every LoadSpec field, checked (SpecError).

    All fields, defaults included, so `{concurrency: [1, 2, 4]}` and the same load spelled out in full are
    one trial (one fingerprint) on resume.
    """
    if value is None:
        return None
    from vllm_lab.load import LoadSpec

    return LoadSpec.from_params(value, where=where).to_dict()


def planned_trials(notebook: str, nb: dict) -> list[Trial] | None:
    """The trials a step will launch; None where the count depends on what vLLM reports (the search)."""
    p = step_params(nb)
    if notebook in ("01_restore_launcher", "02_context_budget"):
        return [p.trial()]
    if notebook == "04_hypotheses":
        mems = memory_levels(nb.get("UTILIZATIONS"), nb.get("KV_BUDGETS_BYTES"))
        trials = factorial_trials(p, nb["LAUNCHERS"], nb["MAX_MODEL_LENS"], mems, nb.get("ENFORCE_EAGER"))
        return install_factor(trials, nb.get("INSTALLS"))
    return None


def search_step(p: StepParams, low: int | None, high: int | None):
    """Step 4: the largest stable max_model_len at this memory setting; every launch is a recorded trial.

    Launches go through run_or_reuse, so a resumed run reuses the launches it already recorded.
    """
    from vllm_lab import search

    template = p.trial(max_model_len=high or low)
    return search.run_search(template, p.run_dir, low=low, high=high, run_trial=run_or_reuse)
