"""A plan (params/*.yaml): the model, the vLLM command, defaults, and the steps (notebook + parameters).

Everything is checked before anything runs: unknown keys, wrong types, values out of range, a missing
model folder, a vLLM command that does not exist, duplicate step names, an unknown notebook. Each problem
is one SpecError line naming the key and the fix.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vllm_lab import engines
from vllm_lab.paths import NOTEBOOK_DIR, resolve_cmd, resolve_path
from vllm_lab.spec import ENGINE_ENV, LAUNCHERS, SpecError, Trial, check_vllm_cmd

PLAN_KEYS = {"name", "description", "model", "vllm_cmd", "gpu", "vllm_version", "defaults", "steps"}
PLAN_KEYS |= {"per_gpu_type", "retries"}  # `run --ray`: the steps once per GPU type; reruns of lost trials
PLAN_KEYS |= {"cpu_trials_per_node"}  # `run --ray`: CPU-build trials at once on one node (0: no limit)
DEFAULT_KEYS = {"extra_args", "env", "startup_timeout_s", "request_timeout_s", "launcher", "quantization",
                "step_timeout_s"}  # fmt: skip
STEP_KEYS = {"name", "notebook", "parameters", "timeout_s", "model"}
PLAN_KEYS |= {"installs"}  # named vLLM installs (installs.py); a step names one with `install:`
STEP_KEYS |= {"install"}
STEP_KEYS |= {"engine"}  # which server the step's trials start (engines.names(); vllm when missing)
# Notebook parameters the batch fills from the plan itself; a step may not set them.
PLAN_OWNED = {
    "RUN_DIR",
    "STEP",
    "MODEL",
    "VLLM_CMD",
    "EXTRA_ARGS",
    "ENV",
    "STARTUP_TIMEOUT_S",
    "REQUEST_TIMEOUT_S",
}


@dataclass
class Step:
    name: str
    notebook: str
    parameters: dict
    timeout_s: float
    model: str
    install: str | None = None  # a name from the plan's installs: its vllm_cmd and env for this step
    engine: str | None = None  # reaches the notebook's trials through ENV (spec.ENGINE_ENV), like install


@dataclass
class Plan:
    path: Path
    name: str
    model: str
    vllm_cmd: str
    defaults: dict
    steps: list[Step] = field(default_factory=list)
    gpu: str | None = None
    vllm_version: str | None = None
    per_gpu_type: bool = False  # `run --ray`: run the steps on each GPU type of the cluster
    retries: int = 0  # `run --ray`: how often a trial whose worker or node died runs again
    cpu_trials_per_node: int = 1  # `run --ray`: each CPU-build server sizes itself for the whole machine
    installs: dict = field(default_factory=dict)  # name -> installs.Install

    def step_engine(self, step: Step) -> str:
        """The server a step runs: its own `engine:`, else its install's, else vLLM."""
        if step.engine:
            return step.engine
        return self.installs[step.install].engine if step.install else "vllm"

    def notebook_parameters(self, step: Step, run_dir: Path) -> dict:
        d = self.defaults
        # defaults' extra_args and env are the plan's vLLM command's: a step on another engine starts without
        # them (--enforce-eager ends llama-server), as 05_engines' entries do
        vllm_step = self.step_engine(step) == "vllm"
        base = {
            "RUN_DIR": str(run_dir), "STEP": step.name, "MODEL": step.model, "VLLM_CMD": self.vllm_cmd,
            "EXTRA_ARGS": list(d.get("extra_args", [])) if vllm_step else [],
            "ENV": dict(d.get("env", {})) if vllm_step else {},
            "STARTUP_TIMEOUT_S": float(d.get("startup_timeout_s", 600)),
            "REQUEST_TIMEOUT_S": float(d.get("request_timeout_s", 120)),
        }  # fmt: skip
        from vllm_lab.installs import step_parameters

        # the step's install (its command and env); INSTALLS names -> their commands
        merged = step_parameters(self, step, {**base, **step.parameters})
        if step.engine:
            merged["ENV"] = {**merged.get("ENV", {}), ENGINE_ENV: step.engine}
        declared = notebook_parameter_defaults(step.notebook)  # papermill only warns on extra names
        return {k: v for k, v in merged.items() if k in declared}


def _type_name(v) -> str:
    return type(v).__name__


def _expect(where: str, value, types, example: str):
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise SpecError(f"{where}: {value!r} is a {_type_name(value)}, expected e.g. {example}")
    if not isinstance(value, types):
        raise SpecError(f"{where}: {value!r} is a {_type_name(value)}, expected e.g. {example}")
    return value


def _unknown(where: str, got: dict, allowed: set) -> None:
    extra = sorted(set(got) - allowed)
    if extra:
        raise SpecError(f"{where}{extra[0]}: unknown key; allowed keys are {', '.join(sorted(allowed))}")


# Range rules for notebook parameters, by name. (papermill itself only warns on unknown names.)
def check_parameter(where: str, name: str, value) -> None:
    if value is None:
        return
    if name in ("MAX_MODEL_LEN", "LOW", "HIGH", "BLOCK_SIZE") or name == "KV_CACHE_MEMORY_BYTES":
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SpecError(f"{where}{name}: {value!r} must be a positive integer")
    elif name == "GPU_MEMORY_UTILIZATION":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise SpecError(f"{where}{name}: {value!r} must be a fraction in (0, 1], e.g. 0.85")
    elif name == "LAUNCHER":
        if value not in LAUNCHERS:
            raise SpecError(f"{where}{name}: {value!r} is not one of {', '.join(LAUNCHERS)}")
    elif name in ("LAUNCHERS", "MAX_MODEL_LENS", "UTILIZATIONS", "KV_BUDGETS_BYTES"):
        _expect(f"{where}{name}", value, list, "[16384, 22256]")
        inner = {"LAUNCHERS": "LAUNCHER", "MAX_MODEL_LENS": "MAX_MODEL_LEN", "UTILIZATIONS": "GPU_MEMORY_UTILIZATION",
                 "KV_BUDGETS_BYTES": "KV_CACHE_MEMORY_BYTES"}[name]  # fmt: skip
        if not value:
            raise SpecError(f"{where}{name}: is empty; give at least one value")
        for v in value:
            check_parameter(where, inner, v)
    elif name == "LOAD":
        from vllm_lab.steps import load_params

        load_params(value, where=f"{where}{name}")


def notebook_parameter_defaults(notebook: str) -> dict:
    """Names and defaults of a notebook's `parameters` cell (papermill's own inspection)."""
    import papermill

    path = NOTEBOOK_DIR / f"{notebook}.ipynb"
    info = papermill.inspect_notebook(str(path))
    out = {}
    for name, p in info.items():
        try:
            out[name] = eval(p["default"], {}, {})  # defaults are literals in our notebooks
        except Exception:
            out[name] = None
    return out


def load_plan(path: str | Path, *, check_command: bool = True) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"plan: {path} does not exist; pass a YAML plan such as params/demo-cpu.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"plan: {path} is not valid YAML{at}; fix the syntax") from None
    if not raw:
        raise SpecError(f"plan: {path} is empty; it needs model, vllm_cmd and steps")
    _expect("plan", raw, dict, "a mapping with model, vllm_cmd, steps")
    _unknown("plan key ", raw, PLAN_KEYS)
    for key in ("model", "vllm_cmd", "steps"):
        if key not in raw:
            raise SpecError(f"{key}: missing; every plan needs model, vllm_cmd and steps")
    model = resolve_path(_expect("model", raw["model"], str, "'.cache/models/tiny-qwen2'"), base=path.parent)
    vllm_cmd = raw["vllm_cmd"]
    _expect("vllm_cmd", vllm_cmd, (str, list), "'vllm serve'")
    if not (vllm_cmd.split() if isinstance(vllm_cmd, str) else vllm_cmd):
        raise SpecError(
            "vllm_cmd: is empty; set it to `vllm serve` or `/path/to/python -m vllm.entrypoints.openai.api_server`"
        )
    vllm_cmd = resolve_cmd(vllm_cmd, path.parent)
    if check_command:
        check_vllm_cmd(vllm_cmd)
    defaults = raw.get("defaults") or {}
    _expect("defaults", defaults, dict, "{extra_args: [--enforce-eager]}")
    _unknown("defaults.", defaults, DEFAULT_KEYS)
    _expect("defaults.extra_args", defaults.get("extra_args", []), list, "[--enforce-eager]")
    _expect("defaults.env", defaults.get("env", {}), dict, "{VLLM_ENABLE_V1_MULTIPROCESSING: '0'}")
    for k in ("startup_timeout_s", "request_timeout_s", "step_timeout_s"):
        if k in defaults and (
            isinstance(defaults[k], bool) or not isinstance(defaults[k], int | float) or defaults[k] <= 0
        ):
            raise SpecError(f"defaults.{k}: {defaults[k]!r} must be a positive number of seconds")
    steps_raw = _expect("steps", raw["steps"], list, "a list of {name, notebook, parameters}")
    if not steps_raw:
        raise SpecError("steps: is empty; add at least one step (name, notebook, parameters)")
    steps, seen = [], set()
    for i, s in enumerate(steps_raw):
        steps.append(_load_step(i, s, seen, model, defaults, path.parent))
    plan = Plan(path=path, name=str(raw.get("name") or path.stem), model=model, vllm_cmd=vllm_cmd,
                defaults=defaults, steps=steps, gpu=raw.get("gpu"), vllm_version=raw.get("vllm_version"))  # fmt: skip
    plan.per_gpu_type = _expect("per_gpu_type", raw.get("per_gpu_type", False), bool, "true")
    plan.retries = _expect("retries", raw.get("retries", 0), int, "1 (reruns of a trial lost with its node)")
    if plan.retries < 0:
        raise SpecError(f"retries: {plan.retries} must be 0 or more")
    plan.cpu_trials_per_node = _expect(
        "cpu_trials_per_node", raw.get("cpu_trials_per_node", 1), int, "2 (0: no limit)"
    )
    if plan.cpu_trials_per_node < 0:
        raise SpecError(f"cpu_trials_per_node: {plan.cpu_trials_per_node} must be 0 (no limit) or more")
    from vllm_lab.installs import attach

    attach(plan, raw, path.parent, check_command=check_command)  # installs: and each step's install:
    # One trial built from the defaults must itself be valid (model folder, launcher ...).
    Trial(model=model, vllm_cmd=vllm_cmd, extra_args=list(defaults.get("extra_args", [])),
          env={str(k): str(v) for k, v in defaults.get("env", {}).items()}).validate(check_command=False)  # fmt: skip
    return plan


def _load_step(i: int, s, seen: set, model: str, defaults: dict, base: Path) -> Step:
    where = f"steps[{i}]"
    _expect(where, s, dict, "{name: 01_restore, notebook: 01_restore_launcher, parameters: {...}}")
    _unknown(f"{where}.", s, STEP_KEYS)
    name = s.get("name")
    if not name or not isinstance(name, str):
        raise SpecError(f"{where}.name: missing; give each step a unique name")
    if name in seen:
        raise SpecError(f"{where}.name: duplicate step name {name!r}; step names must be unique")
    seen.add(name)
    nb = s.get("notebook")
    if nb not in available_notebooks():
        raise SpecError(
            f"{where}.notebook: {nb!r} is not a notebook; choose one of {', '.join(available_notebooks())}"
        )
    params = s.get("parameters") or {}
    _expect(f"{where}.parameters", params, dict, "{MAX_MODEL_LEN: 16384}")
    known = notebook_parameter_defaults(nb)
    for k, v in params.items():
        if k in PLAN_OWNED:
            raise SpecError(
                f"{where}.parameters.{k}: is set by the plan itself (model, vllm_cmd, defaults); remove it"
            )
        if k not in known:
            raise SpecError(
                f"{where}.parameters.{k}: unknown parameter of {nb}; known: {', '.join(sorted(set(known) - PLAN_OWNED))}"
            )
        check_parameter(f"{where}.parameters.", k, v)
    timeout = s.get("timeout_s", defaults.get("step_timeout_s", 3600))
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise SpecError(f"{where}.timeout_s: {timeout!r} must be a positive number of seconds")
    step_model = resolve_path(s["model"], base=base) if s.get("model") else model
    _check_model_limit(f"{where}.parameters.", step_model, params)
    _warn_both_memory_knobs(f"{where} ({name})", params)
    engine = s.get("engine")
    if engine is not None:
        try:
            engines.get(engine)
        except SpecError as e:
            raise SpecError(f"{where}.{e}") from None
    return Step(name=name, notebook=nb, parameters=params, timeout_s=float(timeout), model=step_model,
                engine=engine)  # fmt: skip


def _warn_both_memory_knobs(where: str, params: dict) -> None:
    """Both knobs set: the KV budget wins (vLLM sizes the KV cache from it alone). Legal, so a warning."""
    for util, kv in (
        ("GPU_MEMORY_UTILIZATION", "KV_CACHE_MEMORY_BYTES"),
        ("UTILIZATIONS", "KV_BUDGETS_BYTES"),
    ):
        if params.get(util) is not None and params.get(kv) is not None:
            print(f"vllm-lab: warning: {where} sets both {util} and {kv}; {kv} is used and {util} is not "
                  f"passed (set {kv}: null to run at the utilization)", file=sys.stderr)  # fmt: skip


def _check_model_limit(where: str, model: str, params: dict) -> None:
    """A max_model_len above the model's own limit is a typo, not an experiment (vLLM refuses it anyway)."""
    from vllm_lab.memory import model_limit

    found = model_limit(model)
    if not found:
        return
    limit, how = found
    for name in ("MAX_MODEL_LEN", "HIGH", "MAX_MODEL_LENS"):
        values = params.get(name)
        for v in values if isinstance(values, list) else [values]:
            if isinstance(v, int) and v > limit:
                raise SpecError(
                    f"{where}{name}: {v} is above the model's limit ({limit}: {how}); use at most {limit}"
                )


def available_notebooks() -> list[str]:
    return sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))
