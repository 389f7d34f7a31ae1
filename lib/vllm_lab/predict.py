"""`vllm-lab predict` and `vllm-lab preflight`: what can work on this card, before any launch.

predict: KV bytes per token, KV capacity and the largest max_model_len for one setting (memory.py).
preflight: every launcher x quantization x dtype combination on one card: can it start, and if not the
message vLLM would print (compat.py), with the predicted largest max_model_len at 0.85 and 0.95.
`predict_trial_outcome` is the same judgement for one planned trial (the batch's --dry-run).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from vllm_lab import compat, memory, memory_gguf
from vllm_lab.errors import SpecError
from vllm_lab.gpu import GpuProfile, inventory, list_gpu_profiles, load_gpu_profile, profile_from_device

PREFLIGHT_UTILIZATIONS = (0.85, 0.95)
DTYPES = ("auto", "float16", "bfloat16")
# vLLM subtracts its CUDA-graph estimate from the KV budget from this version on (facts section 3)
GRAPHS_IN_BUDGET_FROM = (0, 21, 0)
# V1 refuses to start when free memory < requested. Facts section 10 says 0.9.2, its table ">= 0.9"; public
# logs show v0.9.1 printing it (vllm-project/vllm#20305, llm-compressor#1560), so 0.9.1.
FREE_MEMORY_CHECK_FROM = (0, 9, 1)


# --------------------------------------------------------------------------------------------- inputs


def resolve_gpu(name: str | GpuProfile | None) -> GpuProfile | None:
    """A profile from a name/alias, or from NVML for 'auto' (SpecError with the fix when there is no GPU)."""
    if name is None or isinstance(name, GpuProfile):
        return name
    if str(name).lower() != "auto":
        return load_gpu_profile(str(name))
    inv = inventory()
    devs = inv.visible_devices if inv.available else []
    if not devs:
        known = ", ".join(p.aliases[0] if p.aliases else p.name for p in list_gpu_profiles())
        why = inv.reason or "no visible GPU (CUDA_VISIBLE_DEVICES selects none)"
        raise SpecError(f"gpu: auto found no GPU here ({why}); pass --gpu NAME, one of {known}")
    return profile_from_device(devs[0])


def _facts(model: Any) -> memory.ModelFacts:
    return memory.load_model(model)


# --------------------------------------------------------------------------------------------- observed


def observed_on(facts: memory.ModelFacts, prof: GpuProfile | None) -> dict | None:
    """What vLLM printed for this model on this card (model.yaml `observed:`), or None."""
    if prof is None:
        return None
    for ob in memory.observations(facts):
        try:
            if load_gpu_profile(str(ob.get("gpu"))).name == prof.name:
                return ob
        except SpecError:  # an observation on a card without a profile: nothing to match
            continue
    return None


def observed_graphs_gib(facts: memory.ModelFacts, prof: GpuProfile | None) -> tuple[float, str] | None:
    """CUDA-graph memory measured for this model and the card's name (this card first: the size depends on the
    model and its batch sizes more than on the card)."""
    mine = observed_on(facts, prof)
    for ob in ([mine] if mine else []) + memory.observations(facts):
        if ob.get("cuda_graph_gib") is not None:
            try:
                card = load_gpu_profile(str(ob.get("gpu"))).name
            except SpecError:
                card = str(ob.get("gpu"))
            return float(ob["cuda_graph_gib"]), card
    return None


def observed_overhead(
    facts: memory.ModelFacts, prof: GpuProfile | None, vllm_version: str | None = None,
    weights_gib: float | None = None,
) -> tuple[float, str] | None:  # fmt: skip
    """The non-KV overhead on this card from what vLLM printed for this model there, and where it comes from.

    overhead = util x total - weights - "Available KV cache memory" (memory.calibrate), all at the observed
    setting; from 0.21 the observed CUDA-graph memory is added, as vLLM then takes it out of the KV budget.
    """
    ob = observed_on(facts, prof)
    if ob is None or ob.get("available_kv_gib") is None or ob.get("gpu_memory_utilization") is None:
        return None
    total, util = float(ob.get("total_gib") or prof.memory_gib), float(ob["gpu_memory_utilization"])
    base = memory.predict(facts, gpu_memory_gib=total, gpu_memory_utilization=util, weights_gib=weights_gib,
                          overhead_gib=0.0)  # fmt: skip
    avail = float(ob["available_kv_gib"])
    overhead = memory.calibrate(base, reported_available_kv_gib=avail)
    src = (f"observed on {prof.name}: {util} x {total} GiB = {base.requested_gib:.2f} GiB - weights "
           f"{base.weights_gib:.2f} GiB - 'Available KV cache memory: {avail} GiB' ({ob.get('source', 'model.yaml')})")  # fmt: skip
    v = memory.parse_vllm_version(vllm_version)
    graphs = ob.get("cuda_graph_gib")
    if graphs and not ob.get("cuda_graphs_in_budget") and v is not None and v >= GRAPHS_IN_BUDGET_FROM:
        overhead += float(graphs)
        src += f" + CUDA graphs {graphs} GiB (inside the budget from vLLM 0.21)"
    return round(overhead, 4), src


def gpu_predict(
    facts: memory.ModelFacts, prof: GpuProfile | None, *, gpu_memory_gib: float | None = None,
    overhead_gib: float | None = None, vllm_version: str | None = None, **kw: Any,
) -> memory.Prediction:  # fmt: skip
    """memory.predict on a card: its memory size, and its observed overhead for this model where there is one
    (an overhead given wins; the default band applies where nothing was observed)."""
    src = None
    if overhead_gib is None and (kw.get("tensor_parallel_size") or 1) == 1:
        found = observed_overhead(facts, prof, vllm_version, kw.get("weights_gib"))
        if found is not None:
            overhead_gib, src = found
    if gpu_memory_gib is None and prof is not None:
        gpu_memory_gib = prof.memory_gib
    p = memory.predict(
        facts, gpu_memory_gib=gpu_memory_gib, overhead_gib=overhead_gib, vllm_version=vllm_version, **kw
    )
    if src is not None and p.requested_gib is not None:
        p.overhead_source = src
    return p


# --------------------------------------------------------------------------------------------- predict


def predict_for(
    model: Any, gpu: str | GpuProfile | None = None, *, gpu_memory_gib: float | None = None, **kw: Any
) -> memory.Prediction:
    """memory.predict with a GPU profile (or name) supplying the memory size."""
    prof = resolve_gpu(gpu)
    p = gpu_predict(_facts(model), prof, gpu_memory_gib=gpu_memory_gib, **kw)
    p.inputs["gpu"] = prof.name if prof else None
    return p


def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if abs(gib) >= 1 else f"{gib * 1024:.1f} MiB"


def _fmt_pred(p: memory.Prediction) -> str:
    i = p.inputs
    lines = [f"model {p.model}: {p.kv_bytes_per_token:,} KV bytes per token ({p.kv_bytes_per_token / 1024:.1f} KiB), "
             f"{p.bytes_per_block:,} bytes per {p.block_size}-token block; model limit {p.model_max_len:,}"]  # fmt: skip
    if p.requested_gib is not None:
        gpu = f"{i.get('gpu')} " if i.get("gpu") else ""
        lines.append(
            f"GPU {gpu}{i['gpu_memory_gib']:.2f} GiB x {i['gpu_memory_utilization']} = {p.requested_gib:.2f} GiB; "
            f"weights {p.weights_gib:.2f} GiB ({'ESTIMATED, ' if p.weights_estimated else ''}{p.weights_source}); "
            f"overhead {p.overhead_gib:.2f} GiB ({p.overhead_source})"
        )
    lines.append(
        f"available KV {p.available_kv_gib:.2f} GiB -> {p.num_blocks:,} blocks, KV cache {p.kv_cache_tokens:,} tokens"
    )
    cap = " (capped by the model's limit)" if p.capped_by_model else ""
    lines.append(f"largest max_model_len that starts: {p.max_model_len:,}{cap}")
    b = p.band
    if b["max_model_len"][0] != b["max_model_len"][1]:
        lines.append(
            f"band (overhead {p.overhead_high_gib:g}..{p.overhead_low_gib:g} GiB): KV {b['kv_cache_tokens'][0]:,}.."
            f"{b['kv_cache_tokens'][1]:,} tokens, max_model_len {b['max_model_len'][0]:,}..{b['max_model_len'][1]:,}"
        )
    lines.extend(f"note: {n}" for n in p.notes)
    return "\n".join(lines)


def cli_predict(args) -> int:
    gpu = getattr(args, "gpu", None)
    if getattr(args, "engine", "vllm") == "llamacpp":
        return _cli_predict_llamacpp(args, gpu)
    p = predict_for(
        args.model, gpu, gpu_memory_gib=getattr(args, "gpu_memory_gib", None),
        gpu_memory_utilization=args.gpu_memory_utilization, weights_gib=args.weights_gib,
        overhead_gib=args.overhead_gib, kv_cache_gib=args.kv_cache_gib, kv_cache_dtype=args.kv_cache_dtype,
        block_size=args.block_size, tensor_parallel_size=getattr(args, "tensor_parallel_size", 1) or 1,
        vllm_version=args.vllm_version,
    )  # fmt: skip
    if args.json:
        print(json.dumps(p.to_dict(), indent=2, default=str))
    else:
        print(_fmt_pred(p))
    return 0


def utilization_curve(
    model: Any, gpu: str | GpuProfile, utilizations: Any, *, overhead_gib: float | None = None,
    vllm_version: str | None = None,
) -> list[dict]:  # fmt: skip
    """The predicted largest max_model_len (and its band) and KV tokens at each gpu_memory_utilization."""
    facts, prof = _facts(model), resolve_gpu(gpu)
    rows = []
    for u in utilizations:
        p = gpu_predict(
            facts, prof, gpu_memory_utilization=u, overhead_gib=overhead_gib, vllm_version=vllm_version
        )
        lo, hi = p.band["max_model_len"]
        rows.append({"gpu_memory_utilization": u, "max_model_len": p.max_model_len, "low": lo, "high": hi,
                     "kv_cache_tokens": p.kv_cache_tokens})  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------- preflight


@dataclass
class PreflightRow:
    launcher: str
    quantization: str | None  # the --quantization flag the launcher passes (None: no flag)
    dtype: str
    can_start: bool
    failure: str | None
    message: str  # what vLLM would print, or a short "starts" note
    effective_quantization: str | None
    effective_dtype: str | None
    max_model_len_085: int | None = None
    max_model_len_095: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Preflight:
    model: str
    gpu: dict
    vllm_version: str | None
    model_facts: dict
    rows: list[PreflightRow]
    memory: dict  # util -> prediction dict (what the memory alone allows, whatever the verdicts)
    summary: list[str]
    alternatives: list[str]
    launchers: dict = field(default_factory=dict)  # legacy / head at --dtype auto: flag, can_start, failure
    # H1, "the flag is needed", on this card: refuted | supported | reversed | neither_starts
    h1: str | None = None
    # likelier causes of a failed start at the top utilization
    suspects: list[dict] = field(default_factory=list)
    # llama.cpp with a GGUF of this model on this card: predicted rows (llamacpp_rows), marked as predictions
    llamacpp: list[dict] = field(default_factory=list)
    # what Ollama does on this card (compat.ollama_facts): default context, driver, flash attention by version
    ollama: dict = field(default_factory=dict)

    @property
    def any_can_start(self) -> bool:
        return any(r.can_start for r in self.rows)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["any_can_start"] = self.any_can_start
        return d

    def table_rows(self) -> list[dict]:
        """Rows as plain dicts (for a pandas DataFrame)."""
        return [asdict(r) for r in self.rows]


# What a card reports with ECC on, where that is less than its profile (GDDR cards give up memory to ECC)
OLLAMA_ECC_TOTAL_MIB = {"Tesla P40": 22919}


def _quant_candidates(facts: memory.ModelFacts) -> list[str]:
    """The explicit launcher's flags worth trying: the config's method and its Marlin variant."""
    m = facts.quant.method
    if m in ("awq", "gptq"):
        return [m, f"{m}_marlin"]
    return [m] if m else []


def preflight(
    model: Any, gpu: str | GpuProfile, vllm_version: str | None = None, *,
    utilizations: tuple[float, ...] = PREFLIGHT_UTILIZATIONS, overhead_gib: float | None = None,
) -> Preflight:  # fmt: skip
    facts = _facts(model)
    prof = resolve_gpu(gpu)
    if prof is None:
        raise SpecError("gpu: preflight needs a GPU; pass --gpu NAME (e.g. p40) or --gpu auto")
    combos: list[tuple[str, str | None]] = [("legacy", None), ("head", None)]
    combos += [("explicit", q) for q in _quant_candidates(facts)]
    preds = {u: gpu_predict(facts, prof, gpu_memory_utilization=u, overhead_gib=overhead_gib,
                            vllm_version=vllm_version) for u in utilizations}  # fmt: skip
    rows = []
    for launcher, q in combos:
        for d in DTYPES:
            v = compat.evaluate_launch(facts, cc=prof.cc_int, gpu_name=prof.name, launcher=launcher,
                                       quantization=q, dtype=d, vllm_version=vllm_version, model_name=facts.name)  # fmt: skip
            row = PreflightRow(
                launcher=launcher, quantization=v.flag, dtype=d, can_start=v.can_start, failure=v.kind,
                message=v.message or f"starts ({v.effective_quantization or 'unquantized'}, {v.effective_dtype})",
                effective_quantization=v.effective_quantization, effective_dtype=v.effective_dtype, notes=v.notes,
            )  # fmt: skip
            if v.can_start:  # every dtype here is 16-bit, so the KV cost is the same for all rows
                row.max_model_len_085 = preds[utilizations[0]].max_model_len
                row.max_model_len_095 = preds[utilizations[-1]].max_model_len
            rows.append(row)
    mem = {f"{u:.2f}": p.to_dict() for u, p in preds.items()}
    pf = Preflight(
        model=facts.name, gpu=prof.to_dict(), vllm_version=vllm_version, model_facts=facts.to_dict(), rows=rows,
        memory=mem, summary=[], alternatives=[],
    )  # fmt: skip
    pf.launchers = {r.launcher: {"flag": r.quantization, "can_start": r.can_start, "failure": r.failure,
                                 "effective_quantization": r.effective_quantization}
                    for r in rows if r.launcher in ("legacy", "head") and r.dtype == "auto"}  # fmt: skip
    pf.h1, h1_line = _h1(pf.launchers, facts, prof)
    pf.summary, pf.alternatives = _summarize(pf, facts, prof, vllm_version, preds, utilizations)
    if h1_line:
        pf.summary.insert(1, h1_line)
    if pf.any_can_start:  # where nothing starts the card itself is the cause
        pf.suspects = _suspects(facts, prof, vllm_version, max(utilizations))
    pf.llamacpp = llamacpp_rows(facts, prof)
    pf.ollama = compat.ollama_facts(prof.cc_int, prof.total_mib, OLLAMA_ECC_TOTAL_MIB.get(prof.name))
    return pf


def _h1(launchers: dict, facts: memory.ModelFacts, prof: GpuProfile) -> tuple[str | None, str]:
    """H1 of the rollback notes ("the --quantization flag is needed"), judged by vLLM's own rules on this card."""
    leg, head = launchers.get("legacy"), launchers.get("head")
    if not leg or not head or leg["flag"] == head["flag"]:
        return None, ""  # both launchers pass the same flag for this model: H1 does not arise
    flag = f"--quantization {leg['flag']}"
    on = f"on {prof.name} (compute capability {prof.compute_capability})"
    if leg["can_start"] and head["can_start"]:
        by_itself = (f"; with no flag vLLM turns the {facts.quant.method} checkpoint into "
                     f"{head['effective_quantization']} by itself" if head["effective_quantization"] == leg["flag"] else "")  # fmt: skip
        return "refuted", (f"H1 (the --quantization flag is needed) is refuted {on}: both launchers start, "
                           f"the legacy one ({flag}) and the head one (no flag){by_itself}.")  # fmt: skip
    if not leg["can_start"] and not head["can_start"]:
        return "neither_starts", (
            f"H1 (the --quantization flag is needed) cannot be the cause {on}: neither launcher starts, the "
            f"legacy one ({flag}: {leg['failure']}) nor the head one (no flag: {head['failure']}); the flag "
            "only changes which error vLLM prints."
        )
    if leg["can_start"]:
        return "supported", (f"H1 (the --quantization flag is needed) holds {on}: the legacy launcher ({flag}) "
                             f"starts, the head one (no flag) does not ({head['failure']}).")  # fmt: skip
    return "reversed", (f"H1 is reversed {on}: the legacy launcher's {flag} stops the start ({leg['failure']}); "
                        "the head one (no flag) starts.")  # fmt: skip


def _ver(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v[:2] if v[2] == 0 else v))


def _suspects(
    facts: memory.ModelFacts, prof: GpuProfile, vllm_version: str | None, util: float
) -> list[dict]:
    """Why a start that vLLM's rules allow can still fail at `util`: memory outside the budget, by version."""
    v = memory.parse_vllm_version(vllm_version) or compat.ASSUMED_VERSION
    total = prof.memory_gib
    requested = util * total
    left = total - requested
    numbers = {"gpu_memory_utilization": util, "total_gib": round(total, 2), "requested_gib": round(requested, 2),
               "left_gib": round(left, 2)}  # fmt: skip
    head = f"{util} x {total:.2f} = {requested:.2f} GiB requested leaves {left:.2f} GiB"
    out: list[dict] = []
    extra: dict = {}
    graphs = observed_graphs_gib(facts, prof)
    if v < GRAPHS_IN_BUDGET_FROM and (graphs is None or graphs[0] > left):
        if graphs is None:
            why, knob = (f"vLLM < {_ver(GRAPHS_IN_BUDGET_FROM)} captures CUDA graphs outside the budget: {head} for them (not measured "
                         "for this model)", "--enforce-eager (no CUDA graphs), or a lower --gpu-memory-utilization")  # fmt: skip
        else:
            where = "on this card" if graphs[1] == prof.name else f"on {graphs[1]}"
            top = math.floor((total - graphs[0]) / total * 100) / 100
            why = (f"vLLM < {_ver(GRAPHS_IN_BUDGET_FROM)} captures CUDA graphs outside the budget: {head}, less than the {graphs[0]:.2f} "
                   f"GiB of CUDA graphs measured for this model {where}")  # fmt: skip
            knob = f"--enforce-eager (no CUDA graphs), or --gpu-memory-utilization {top:.2f} or lower"
            extra = {"cuda_graph_gib": graphs[0], "highest_utilization_with_graphs": top}
        out.append({"name": "cuda_graphs_outside_budget", "why": why, "knob": knob,
                    "numbers": {**numbers, **extra}})  # fmt: skip
    if v >= FREE_MEMORY_CHECK_FROM:
        why = (f"vLLM >= {_ver(FREE_MEMORY_CHECK_FROM)} refuses to start when free memory is below the request: {head} for everything "
               "else on the card (a display, a desktop, another server or notebook); more than that held elsewhere "
               "stops it with 'Free memory on device ... is less than desired GPU memory utilization'")  # fmt: skip
    else:
        why = (f"{head} for everything else on the card; vLLM < {_ver(FREE_MEMORY_CHECK_FROM)} does not check free memory at start (V1 up "
               "to 0.8.5 takes memory held by others out of the KV cache, V0 from 0.6.5 ignores it and can run "
               "out of memory later)")  # fmt: skip
    out.append({"name": "memory_held_by_other_processes", "why": why, "numbers": numbers,
                "knob": "free the GPU (nvidia-smi lists who holds memory), or a lower --gpu-memory-utilization "
                        "(at most free / total)"})  # fmt: skip
    return out


def _summarize(pf, facts, prof, vllm_version, preds, utils) -> tuple[list[str], list[str]]:
    s: list[str] = []
    alt: list[str] = []
    cc = prof.cc_int
    ver = vllm_version or f"{'.'.join(map(str, compat.ASSUMED_VERSION))} (assumed)"
    if facts.quant.method == "awq" and not compat.awq_path_exists(cc, vllm_version):
        s.append(
            f"Mainline vLLM {ver} has no AWQ path on {prof.name} (compute capability {prof.compute_capability}) "
            "whatever the flag: awq needs 7.5, awq_marlin 8.0"
            + (", and vLLM's CUDA builds do not target this GPU at all." if cc < compat.vllm_min_capability(vllm_version) else ".")
        )  # fmt: skip
    ok = [r for r in pf.rows if r.can_start]
    if ok:
        best = max(ok, key=lambda r: r.max_model_len_095 or 0)
        s.append(
            f"{len(ok)} of {len(pf.rows)} combinations can start, e.g. launcher {best.launcher}"
            f"{' --quantization ' + best.quantization if best.quantization else ''} --dtype {best.dtype} "
            f"({best.effective_quantization or 'unquantized'}, {best.effective_dtype})."
        )
    else:
        kinds = sorted({r.failure for r in pf.rows if r.failure})
        s.append(f"None of the {len(pf.rows)} combinations can start on {prof.name}: {', '.join(kinds)}.")
    p85 = preds[utils[0]]
    s.append(
        f"Memory alone (weights {_size(p85.weights_gib)}{' estimated' if p85.weights_estimated else ''}): "
        + ", ".join(f"{u:.2f} -> max_model_len {preds[u].max_model_len:,} ({preds[u].kv_cache_tokens:,} KV tokens)"
                    for u in utils)
        + f" (model limit {facts.max_len:,}; KV {p85.kv_bytes_per_token:,} bytes per token"
        + (f"; overhead {p85.overhead_gib:.2f} GiB {p85.overhead_source.split(':')[0]}"
           if p85.overhead_source.startswith("observed") else "") + ")."
    )  # fmt: skip
    if cc < compat.vllm_min_capability(vllm_version) or not ok:
        fp16_gib = (facts.param_count or memory.config_param_count(facts)) * 2 / memory.GIB
        fits = fp16_gib < prof.memory_gib * 0.95 - 1.0
        alt.append(
            f"an fp16 (unquantized) checkpoint of this model: weights about {_size(fp16_gib)}, which "
            + ("fits" if fits else "does NOT fit")
            + f" in {prof.memory_gib:.1f} GiB"
            + (" - on Pascal it needs a Pascal-enabled build (community vLLM forks) or transformers" if cc < 70 else "")
        )  # fmt: skip
        alt.append(
            "a GPTQ checkpoint where the build supports this GPU (vLLM's gptq kernels need only compute capability 6.0)"
        )
        alt.append(
            "a GGUF quantization (e.g. Q4_K_M, Q8_0) in llama.cpp or Ollama, which run on Pascal and newer"
        )
        s.append("What does work on this card: " + "; ".join(alt) + ".")
    return s, alt


def format_preflight(pf: Preflight) -> str:
    g = pf.gpu
    head = (f"preflight: model {pf.model} on {g['name']} (cc {g['compute_capability']}, {g['memory_gib']:.1f} GiB), "
            f"vLLM {pf.vllm_version or 'version not given'}")  # fmt: skip
    cols = f"{'launcher':<9} {'--quantization':<15} {'--dtype':<9} {'starts':<6} {'failure':<29} {'len@0.85':>9} {'len@0.95':>9}"
    out = [head, "", cols, "-" * len(cols)]
    for r in pf.rows:
        out.append(
            f"{r.launcher:<9} {r.quantization or '(none)':<15} {r.dtype:<9} {'yes' if r.can_start else 'NO':<6} "
            f"{r.failure or '-':<29} {r.max_model_len_085 or '-'!s:>9} {r.max_model_len_095 or '-'!s:>9}"
        )
        out.append(f"    {r.message}")
    out.append("")
    out.extend(pf.summary)
    if pf.suspects:
        out += ["", *suspect_lines(pf)]
    if pf.llamacpp:
        out += ["", *llamacpp_lines(pf.llamacpp, g["name"])]
    if pf.ollama:
        out += ["", f"Ollama on {g['name']}:", *(f"- {line}" for line in pf.ollama["lines"])]
    if pf.llamacpp or pf.ollama:  # the predictions above, measured: each engine's start, context and speed
        out += ["", "To measure these side by side (start, largest stable context, tok/s under one load): "
                    "notebook 05_engines, e.g. `vllm-lab run params/p40-engines.yaml` (`--dry-run` first)"]  # fmt: skip
    return "\n".join(out)


def suspect_lines(pf: Preflight) -> list[str]:
    """The suspects as text: a heading, then one line each with its knob."""
    if not pf.suspects:
        return []
    top = pf.suspects[0]["numbers"]["gpu_memory_utilization"]
    return [f"If a start at {top} still fails here, the likelier causes (suspects):"] + [
        f"- {x['name']}: {x['why']}. Knob: {x['knob']}." for x in pf.suspects
    ]


def cli_preflight(args) -> int:
    pf = preflight(args.model, args.gpu, args.vllm_version, overhead_gib=getattr(args, "overhead_gib", None))
    if args.json:
        print(json.dumps(pf.to_dict(), indent=2, default=str))
    else:
        print(format_preflight(pf))
    return 0


# --------------------------------------------------------------------------------------------- one trial


def predict_trial_outcome(
    model_dir: Any,
    gpu_profile_or_none: str | GpuProfile | None,
    launcher: str,
    quantization: str | None,
    max_model_len: int | None,
    gpu_memory_utilization: float | None,
    kv_cache_memory_bytes: int | None,
    vllm_version: str | None = None,
    *,
    dtype: str = "auto",
    overhead_gib: float | None = None,
    block_size: int | None = None,
) -> dict:
    """One planned trial: outcome "ready" | "failed", the failure kind, why, and the predicted capacity.

    With kv_cache_memory_bytes no GPU profile is needed (capacity comes from the budget). Without a GPU
    profile the CPU build is assumed: GPU-dependent rules are not checked, no Marlin (so a legacy awq_marlin
    flag on an AWQ checkpoint predicts the config-mismatch failure) and 128-token blocks unless block_size
    says otherwise (16 with a GPU profile).
    """
    facts = _facts(model_dir)
    prof = resolve_gpu(gpu_profile_or_none) if gpu_profile_or_none else None
    v = compat.evaluate_launch(
        facts, cc=prof.cc_int if prof else None, gpu_name=prof.name if prof else "NVIDIA", launcher=launcher,
        quantization=quantization, dtype=dtype, max_model_len=max_model_len, vllm_version=vllm_version,
        model_name=facts.name,
    )  # fmt: skip
    out: dict = {"outcome": "ready", "failure": None, "reason": "", "predicted_kv_cache_tokens": None,
                 "predicted_max_model_len": None}  # fmt: skip
    pred = None
    bs = block_size or (memory.DEFAULT_BLOCK_SIZE if prof is not None else memory.CPU_BLOCK_SIZE)
    if kv_cache_memory_bytes is not None:
        pred = memory.predict(
            facts, kv_cache_memory_bytes=int(kv_cache_memory_bytes), vllm_version=vllm_version, block_size=bs
        )
    elif prof is not None:
        pred = gpu_predict(facts, prof, gpu_memory_utilization=gpu_memory_utilization or 0.9,
                           overhead_gib=overhead_gib, vllm_version=vllm_version)  # fmt: skip
    if pred is not None:
        out["predicted_kv_cache_tokens"], out["predicted_max_model_len"] = (
            pred.kv_cache_tokens,
            pred.max_model_len,
        )
    if not v.can_start:
        out.update(outcome="failed", failure=v.kind, reason=v.message)
        return out
    want = max_model_len or facts.max_len
    if pred is None:
        out["reason"] = "starts by the config rules; no memory prediction (give a GPU profile or a KV budget)"
        return out
    if pred.max_model_len <= 0:
        out.update(outcome="failed", failure="no_kv_memory",
                   reason="No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
                          "when initializing the engine.")  # fmt: skip
    elif want > pred.max_model_len:
        band = pred.band["max_model_len"]
        out.update(outcome="failed", failure="kv_cache_insufficient", reason=(
            f"max_model_len {want} needs more KV cache than the predicted {_size(pred.available_kv_gib)}; "
            f"the estimated maximum model length is {pred.max_model_len}"
            + (f" (band {band[0]}..{band[1]})" if band[0] != band[1] else "")
        ))  # fmt: skip
    else:
        out["reason"] = (f"starts: {want} <= predicted largest max_model_len {pred.max_model_len} "
                         f"({pred.kv_cache_tokens} KV tokens)")  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------- llama.cpp

# Q4_K_M averages about 4.9 bits per parameter (Qwen3-8B: ~4.68 GiB for 8.19B parameters, memory_gguf)
Q4_K_M_BITS_PER_PARAM = 4.91
# (cache type K/V, flash attention) rows shown: f16 without and with FA, q8_0 (which needs FA)
LLAMACPP_CACHES = (("f16", False), ("f16", True), ("q8_0", True))


def gguf_facts(facts: memory.ModelFacts) -> memory_gguf.GgufFacts | None:
    """The model as a Q4_K_M GGUF: Qwen3-8B from its published file size, others estimated from their
    parameter count; None when the config does not give the attention shape (e.g. MLA)."""
    if facts.mla or not facts.config:
        return None
    cfg = facts.config
    if (facts.model_type, facts.num_layers, facts.hidden_size, facts.num_kv_heads) == ("qwen3", 36, 4096, 8):
        return memory_gguf.qwen3_8b_q4_k_m(facts.config_path) if facts.config_path else None
    params = facts.param_count or memory.config_param_count(facts)
    if not params:
        return None
    return memory_gguf.model_facts_from_config(
        cfg, weights_bytes=round(params * Q4_K_M_BITS_PER_PARAM / 8), file_type="Q4_K_M",
        source=f"config.json + ESTIMATED Q4_K_M size ({Q4_K_M_BITS_PER_PARAM} bits per parameter)",
    )  # fmt: skip


def llamacpp_rows(
    model: Any, gpu: str | GpuProfile | None, c: int | None = None, slots: int = 1, *,
    card_mib: float | None = None,
) -> list[dict]:  # fmt: skip
    """PREDICTED llama.cpp starts of a Q4_K_M GGUF of this model (or of the .gguf file given) on this card
    (-ngl all, -np slots) at -c c (default the model's full context), one row per KV cache type / FA."""
    g = memory_gguf.read_gguf(model) if str(model).endswith(".gguf") else gguf_facts(_facts(model))
    prof = resolve_gpu(gpu)
    card = card_mib if card_mib is not None else (prof.total_mib if prof else None)
    if g is None or card is None:
        return []
    rows = []
    for cache, fa in LLAMACPP_CACHES:
        f = memory_gguf.fit(g, card, c or g.n_ctx_train, slots, cache, cache, fa)
        rows.append({"engine": "llamacpp", "prediction": True, "quant": g.file_type, "weights_source": g.source,
                     **asdict(f)})  # fmt: skip
    return rows


def llamacpp_lines(rows: list[dict], gpu_name: str) -> list[str]:
    """The llama.cpp rows as text (a heading that says they are predictions, a table, the footnote)."""
    r0 = rows[0]
    out = [
        f"llama.cpp (GGUF {r0['quant']}), PREDICTED (no launch): -c {r0['c']:,}"
        f"{' (the model' + chr(39) + 's full context)' if r0['c'] == r0['n_ctx'] else ''}, -np {r0['slots']},"
        f" -ngl all on {gpu_name} ({r0['card_gib']:.1f} GiB)",
        f"{'-ctk/-ctv':<10} {'-fa':<4} {'weights':>10} {'KV':>10} {'compute*':>10} {'total':>10}  fits",
    ]
    for r in rows:
        out.append(
            f"{r['cache_k']:<10} {'on' if r['flash_attn'] else 'off':<4} {_size(r['weights_gib']):>10}"
            f" {_size(r['kv_gib']):>10} {_size(r['compute_gib']):>10} {_size(r['total_gib']):>10}"
            f"  {'yes' if r['fits'] else 'NO'}"
        )
    out.append(
        f"weights: {r0['weights_source']}; KV: llama.cpp's own arithmetic (checked against its printed size);"
        f" *compute: an estimate fitted on llama.cpp's CPU backend; total adds"
        f" {memory_gguf.CUDA_OVERHEAD_GIB} GiB for the CUDA context"
    )
    return out


def _cli_predict_llamacpp(args, gpu: str | None) -> int:
    gib = getattr(args, "gpu_memory_gib", None)
    if gpu is None and gib is None:
        raise SpecError("predict --engine llamacpp: give the card, --gpu NAME or --gpu-memory-gib N")
    rows = llamacpp_rows(args.model, gpu, card_mib=gib * 1024 if gib is not None else None)
    if not rows:
        raise SpecError(f"model: {args.model}: no attention shape to size a GGUF from (MLA or no config)")
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        name = resolve_gpu(gpu).name if gpu is not None else f"{gib:g} GiB"
        print("\n".join(llamacpp_lines(rows, name)))
    return 0
