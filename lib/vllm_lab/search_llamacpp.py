"""What the context search needs to know about llama.cpp: its block, its range, and the memory model's guess.

search.py runs the same bracket for every engine; for `engine: llamacpp` and `engine: ollama` (Ollama runs
llama-server itself since 0.30, with `-c num_ctx x OLLAMA_NUM_PARALLEL -np OLLAMA_NUM_PARALLEL`, and reads
the GGUF in its store: the same block, range and memory model) it asks this module:
- the block is 256: llama.cpp pads `-c` (each slot's share) to a multiple of 256, so `-c 1000` and `-c 1024`
  are the same launch and the answer's precision is 256 tokens;
- the top of the range is the GGUF's own n_ctx_train: above it a slot is capped at n_ctx_train while the KV
  is still allocated for the whole `-c`, so a longer `-c` serves no longer request;
- the first launch goes where the memory model (memory_gguf) says the limit is: on this CPU box an
  address-space limit on the server (Trial.memory_limit_bytes, RLIMIT_AS) stands in for the card, and what
  the server maps besides its buffers (libraries, thread stacks, the HTTP server) is an estimate measured on
  the xllamacpp wrapper (ADDRESS_SPACE_BASE); on a GPU the card's memory (gpu.py, NVML) less the CUDA
  overhead. Either way it is a guess, never a result: the launches decide.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_lab.commands import flag_values

if TYPE_CHECKING:
    from vllm_lab.memory_gguf import GgufFacts
    from vllm_lab.spec import Trial

BLOCK = 256  # src/llama-context.cpp: GGML_PAD(n_ctx, 256)
MIB = 2**20
# The server's address space besides weights, KV and compute buffers: measured with /proc/PID/status VmSize
# on .venv-llamacpp/bin/llama-server (python + the xllamacpp wheel, MALLOC_ARENA_MAX=1, 15 threads on 2
# cores): 183.3 MiB at -c 8192, 184.5 MiB at -c 32768 (the slots' token buffers: about 51 bytes per cell).
# A plain llama-server binary maps less (no python): the guess is then low, and the search climbs. Most of
# it is thread stacks (8 MiB each; llama.cpp's HTTP and compute threads grow with the CPU count), so on
# another machine the guess is off by about 19 blocks of the tiny model per thread, and the search walks
# and bisects from there (never more than plain bisection's worst case + 2).
MEASURED_ON_CPUS = 2
ADDRESS_SPACE_BASE = int(183.3 * MIB)
ADDRESS_SPACE_PER_CELL = 51
# Serving the request that fills the context needs memory of its own (the prompt's tokens in the server's
# task copies, the batch, an HTTP thread): searches under 220 and 205 MiB found 19712 and 10496 (starts
# went up to 22528 and 11008; above the served edge decode() failed with std::bad_alloc): 120 bytes per
# token of the request and 2.4 MiB besides.
REQUEST_PER_TOKEN = 120
REQUEST_FIXED = int(2.42 * MIB)


@dataclass(frozen=True)
class Knobs:
    """The llama-server flags in a trial's extra_args that change memory per token."""

    slots: int = 1  # -np (auto: 4 sharing one unified cache; per cell the same as 1)
    kv_unified: bool = True
    flash_attn: bool = True  # -fa auto: on where the backend supports it (the CPU does)
    cache_k: str = "f16"
    cache_v: str = "f16"


def knobs(extra_args: list[str]) -> Knobs:
    args = list(extra_args)

    def last(*names: str) -> str | None:
        vals = [v for n in names for v in flag_values(args, n)]
        return vals[-1] if vals else None

    np_ = last("-np", "--parallel")
    slots = int(np_) if np_ and np_.lstrip("-").isdigit() and int(np_) > 0 else None
    unified = any(a in ("-kvu", "--kv-unified") for a in args) or slots is None
    fa = last("-fa", "--flash-attn")
    return Knobs(
        slots=slots or 1,
        kv_unified=unified,
        flash_attn=fa not in ("off", "0", "false"),
        cache_k=last("-ctk", "--cache-type-k") or "f16",
        cache_v=last("-ctv", "--cache-type-v") or "f16",
    )


def ollama_knobs(trial: Trial) -> Knobs:
    """What Ollama hands its llama-server, from the trial's OLLAMA_* settings (env, or extra_args NAME=value).

    Flash attention counts as off unless OLLAMA_FLASH_ATTENTION is set (its default changed across versions;
    off needs the bigger compute buffer, so the guess errs low and the search climbs), and the KV cache type
    applies only with it, as in Ollama. Several slots are separate caches of num_ctx each (no -kvu)."""
    from vllm_lab.engines.ollama import extra_env

    knob = {**trial.env, **extra_env(trial)}
    par = str(knob.get("OLLAMA_NUM_PARALLEL", "1"))
    slots = int(par) if par.isdigit() and int(par) > 0 else 1
    fa = str(knob.get("OLLAMA_FLASH_ATTENTION", "")).lower() in ("1", "true", "on", "yes")
    kv = str(knob.get("OLLAMA_KV_CACHE_TYPE") or "f16") if fa else "f16"
    return Knobs(slots=slots, kv_unified=slots == 1, flash_attn=fa, cache_k=kv, cache_v=kv)


def trial_knobs(trial: Trial) -> Knobs:
    return ollama_knobs(trial) if trial.engine == "ollama" else knobs(trial.extra_args)


def ollama_blob(trial: Trial) -> Path | None:
    """The GGUF behind an Ollama model name: its manifest's model layer, as a file in the store's blobs/."""
    from vllm_lab.engines.ollama import manifest_path, store

    root = store(trial.env)
    try:
        layers = json.loads(manifest_path(root, trial.model).read_text()).get("layers") or []
    except (OSError, ValueError, AttributeError):
        return None
    digests = [
        lay.get("digest", "")
        for lay in layers
        if lay.get("mediaType") == "application/vnd.ollama.image.model"
    ]
    blob = root / "blobs" / digests[0].replace(":", "-") if digests and digests[0] else None
    return blob if blob is not None and blob.is_file() else None


def gguf_of(trial: Trial) -> str | Path | None:
    """The GGUF file the trial serves: the model itself for llama.cpp and for an Ollama model made from a
    file (created in the store at run time), else the store's blob behind the Ollama name."""
    from vllm_lab.engines.ollama_gguf import is_file_model

    if trial.engine == "ollama" and not is_file_model(str(trial.model)):
        return ollama_blob(trial)
    return trial.model


def facts(trial: Trial) -> GgufFacts | None:
    from vllm_lab.memory_gguf import read_gguf

    path = gguf_of(trial)
    if path is None:
        return None
    try:
        return read_gguf(path)
    except Exception:  # not a readable GGUF here (a container path, a hub name): no guess, no cap
        return None


def model_limit(trial: Trial) -> int | None:
    """n_ctx_train, rounded down to the block: the longest request a slot can serve."""
    f = facts(trial)
    return f.n_ctx_train // BLOCK * BLOCK if f and f.n_ctx_train >= BLOCK else None


def bytes_at(f: GgufFacts, c: int, k: Knobs, base: int) -> int:
    """What a start at `-c c` needs (the memory model): base + weights + KV + compute (an estimate)."""
    from vllm_lab.memory_gguf import compute_buffer_bytes, kv_bytes

    kv = kv_bytes(f, c, k.slots, k.kv_unified, k.cache_k, k.cache_v)
    compute = compute_buffer_bytes(f, kv.n_ctx_slot, k.flash_attn)
    process = (
        (ADDRESS_SPACE_PER_CELL * kv.n_ctx + REQUEST_PER_TOKEN * kv.n_ctx_slot + REQUEST_FIXED)
        if base_is_process(base)
        else 0
    )
    return base + f.weights_bytes + kv.bytes + compute + process


def base_is_process(base: int) -> bool:
    return base == ADDRESS_SPACE_BASE  # the CPU process's own address space (not a card's CUDA overhead)


def budget(trial: Trial) -> tuple[int, int, str] | None:
    """(bytes available, bytes the process has besides the buffers, where from), or None: nothing to guess
    from (no limit on the CPU: the machine's RAM is not a limit this search can stand in for)."""
    if trial.memory_limit_bytes:
        return trial.memory_limit_bytes, ADDRESS_SPACE_BASE, (
            f"an address-space limit of {trial.memory_limit_bytes / MIB:.0f} MiB on the server (RLIMIT_AS), "
            f"{ADDRESS_SPACE_BASE / MIB:.0f} MiB of it taken by the process itself (measured on the xllamacpp wrapper)"
        )  # fmt: skip
    try:
        from vllm_lab.gpu import inventory

        inv = inventory()
        gpus = inv.visible_devices if inv.available else []
    except Exception:
        return None
    if not gpus:
        return None
    from vllm_lab.memory_gguf import CUDA_OVERHEAD_GIB

    g = gpus[0]
    return (
        int(g.total_mib * MIB),
        int(CUDA_OVERHEAD_GIB * 2**30),
        (f"GPU {g.index} ({g.name}, {g.total_mib:.0f} MiB) less {CUDA_OVERHEAD_GIB} GiB of CUDA overhead"),
    )


def largest_fitting(f: GgufFacts, k: Knobs, avail: int, base: int, per_slot: bool = False) -> int:
    """The largest context (a block multiple, at most n_ctx_train; 0: not even one block) whose start the
    memory model fits in ``avail`` bytes. ``per_slot``: the context is each slot's (Ollama's num_ctx; its
    llama-server gets -c context x slots), else the whole -c."""
    top = max(BLOCK, f.n_ctx_train // BLOCK * BLOCK) if f.n_ctx_train else 1 << 24
    scale = k.slots if per_slot else 1

    def fits(blocks: int) -> bool:
        return bytes_at(f, blocks * BLOCK * scale, k, base) <= avail

    lo, hi = 0, top // BLOCK  # largest block count that fits: binary search on the (monotone) model
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo * BLOCK


def first_guess(trial: Trial) -> tuple[int, str] | None:
    """The largest context (a block multiple, at most n_ctx_train) the memory model fits in the budget."""
    f = facts(trial)
    b = budget(trial)
    if f is None or b is None:
        return None
    avail, base, where = b
    k = trial_knobs(trial)
    per_slot = trial.engine == "ollama"
    flag = "num_ctx" if per_slot else "-c"
    c = largest_fitting(f, k, avail, base, per_slot=per_slot)
    if c == 0:
        return BLOCK, f"the memory model: not even {flag} {BLOCK} fits {where}"
    scale = k.slots if per_slot else 1  # a num_ctx token is one cell in each slot
    per = (bytes_at(f, (c + BLOCK) * scale, k, base) - bytes_at(f, c * scale, k, base)) / BLOCK
    return c, (
        f"the memory model (a guess): {flag} {c} fits {where}; weights {f.weights_bytes / MIB:.1f} MiB, "
        f"KV {k.cache_k}/{k.cache_v} + compute (flash attention {'on' if k.flash_attn else 'off'}) "
        f"{per:.0f} bytes per token"
    )
