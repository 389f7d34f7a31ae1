"""--dry-run: every trial a plan would launch, with its predicted outcome; launches nothing."""

from __future__ import annotations

from vllm_lab.plan import Plan, Step, notebook_parameter_defaults
from vllm_lab.steps import planned_trials

SEARCH_LAUNCHES_GUESS = 2  # the search's target where vLLM reports capacity


def _trials(plan: Plan, step: Step):
    params = {
        **notebook_parameter_defaults(step.notebook),
        **plan.notebook_parameters(step, plan.path.parent),
    }
    return planned_trials(step.notebook, params)


def expected_trial_count(plan: Plan, steps: list[Step]) -> int:
    """The trials a run of these steps launches (the progress bar's total): each step's planned trials, a
    search's launches guessed (it stops where vLLM's own figures say)."""
    n = 0
    for s in steps:
        if s.notebook == "00_preflight":
            continue
        trials = _trials(plan, s)
        n += len(trials) if trials is not None else SEARCH_LAUNCHES_GUESS
    return n


def predicted(plan: Plan, trial) -> dict:
    """The memory model's prediction for one trial, or a plain 'no prediction' when it cannot say."""
    try:
        from vllm_lab.predict import predict_trial_outcome

        return predict_trial_outcome(
            trial.model, plan.gpu, trial.launcher, trial.quantization, trial.max_model_len,
            trial.gpu_memory_utilization, trial.kv_cache_memory_bytes, vllm_version=plan.vllm_version,
        )  # fmt: skip
    except Exception as e:  # a dry run must print every trial even where the model cannot predict
        return {"outcome": "?", "failure": None, "reason": f"no prediction ({type(e).__name__}: {e})"}


def print_dry_run(plan: Plan, steps: list[Step]) -> None:
    print(f"plan {plan.name}: {len(steps)} step(s), model {plan.model}")
    print(f"vllm_cmd: {plan.vllm_cmd}")
    for s in steps:
        trials = _trials(plan, s)
        print(f"\n[{s.name}] notebook {s.notebook}")
        if s.notebook == "00_preflight":
            print("  (no launch: inventory, memory model, verdict table)")
            continue
        if s.notebook == "05_engines":  # each engine: the memory model's and the rules' prediction
            from vllm_lab.engine_compare import dry_run_lines

            params = {
                **notebook_parameter_defaults(s.notebook),
                **plan.notebook_parameters(s, plan.path.parent),
            }
            for line in dry_run_lines(params, plan.gpu, plan.vllm_version):
                print(f"  {line}")
            continue
        if trials is None:
            print(f"  search: about {SEARCH_LAUNCHES_GUESS} launches where vLLM reports capacity")
            continue
        for t in trials:
            p = predicted(plan, t)
            mem = (f"kv={t.kv_cache_memory_bytes}" if t.kv_cache_memory_bytes is not None
                   else f"util={t.gpu_memory_utilization}")  # fmt: skip
            verdict = p.get("outcome", "?") + (f" ({p['failure']})" if p.get("failure") else "")
            print(
                f"  {t.trial_id:<58} {t.launcher:<8} len={t.max_model_len!s:<6} {mem:<14} predicted: {verdict}"
            )
            if p.get("reason"):
                print(f"      {p['reason']}")
    n, searches = expected_trial_count(plan, steps), sum(_trials(plan, s) is None for s in steps)
    guess = (
        f", counting {SEARCH_LAUNCHES_GUESS} per search: a guess, a search stops where it knows"
        if searches
        else ""
    )
    print(f"\n(dry run: nothing was launched; a run launches {n} trial(s){guess})")
