#!/usr/bin/env bash
# gpu-check.sh: the GPU-specific code (NVML inventory, preflight --gpu auto, the memory sampler, peak_gpu_mib,
# the timeline plot, the release wait after a stop) against a real GPU, once (issue 15).
#
# How to run it, from a copy of this repo on the GPU machine (no network, no vLLM, no venv needed):
#     bash scripts/gpu-check.sh [OUT]            # results in OUT, else $OUT, else ./gpu-check-out
# It uses the first python3 that imports torch (GPU_CHECK_PYTHON=... to choose) with PYTHONPATH=lib, and
# needs torch and nvidia-ml-py.
# Each step names the packages it lacks in one line (OUT/deps.txt) and is skipped. Packages the machine
# lacks are taken from GPU_CHECK_SITE (default .cache/gpu-site, if there; only what is missing is used), made
# here by: .venv/bin/python -m pip install --target .cache/gpu-site --only-binary :all: httpx psutil pyyaml
# exceptiongroup typing_extensions pytest tomli (pure python or abi3: any python 3.10+; carry it). At most 8 minutes
# (GPU_CHECK_LIMIT_S); every step writes what it measured before the next starts.
# GPU_CHECK_FAKE=1 runs the same steps against the fake NVML (one simulated H200 shared by every process,
# lib/vllm_lab/testing/fake_nvml.LedgerNvml) with no torch: tests/test_gpu_check.py runs it in CI.
# The real mode itself can be rehearsed here with stand-ins for pynvml and torch first on PYTHONPATH
# (lib/vllm_lab/testing/gpu_alloc.write_stub_modules; tests/test_gpu_check.py runs tests/gpu that way).
#
# What it checks (OUT/steps.jsonl: one line per step as it ends; OUT/summary.md: the same, for people):
#   env        python, torch and CUDA, nvidia-smi, which of our dependencies are missing (deps.txt)
#   gpus       `vllm-lab gpus` and `vllm-lab gpus --json` (gpus.txt, gpus.json)
#   preflight  `vllm-lab preflight --gpu auto` for Qwen3-8B-AWQ and an fp16 Qwen3-8B (the same config without
#              its quantization): preflight-*.txt / .json
#   alloc      two `vllm-lab launch`es of the fake vLLM whose child holds its KV budget (2 and 8 GiB) with
#              torch: the record's peak_gpu_mib and gpu_memory_timeline and the release wait meet NVML
#              (run/trials.jsonl; alloc-MIB/{before,record,after}.json)
#   stubborn   a fake vLLM whose KV-holding child ignores SIGTERM (4 GiB): stopping the tree must kill it
#              and bring NVML's used memory back to the baseline (+512 MiB) within the release wait
#   table      nvml-vs-allocated.md / .json: NVML's baseline, peak, delta and after-stop figures against
#              what torch allocated, with PASS/FAIL checks (delta >= 0.95 x allocated and at most 2 GiB
#              over it, slope between the two launches 0.97-1.03, memory back at the baseline, no survivor)
#   report     `vllm-lab report run`: report.md and plots/gpu_memory_timeline.png (only that plot, without
#              nbformat/nbconvert)
#   pytest     tests/gpu (marker gpu; skipped where NVML finds no GPU) when pytest is there
# Exit status 0 when no step failed and every check passed, 1 otherwise.
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-${OUT:-./gpu-check-out}}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${GPU_CHECK_PYTHON:-python3}
FAKE=${GPU_CHECK_FAKE:-0}
if [ -z "${GPU_CHECK_PYTHON:-}" ] && [ "$FAKE" != 1 ]; then  # the python that has torch, where one does
  for c in python3 python /usr/bin/python3 /usr/local/bin/python3 /opt/conda/bin/python; do
    command -v "$c" >/dev/null 2>&1 && "$c" -c 'import torch' >/dev/null 2>&1 && { PY=$c; break; }
  done
fi
LIMIT_S=${GPU_CHECK_LIMIT_S:-480}
KV_MIBS=${GPU_CHECK_KV_MIB:-"2048 8192"}
STUBBORN_MIB=${GPU_CHECK_STUBBORN_MIB:-4096}
START=$(date +%s)
SITE=${GPU_CHECK_SITE:-$ROOT/.cache/gpu-site}
export PYTHONPATH="$ROOT/lib${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export GPU_CHECK_RUN="gpu-check-$START-$$"  # in every process it starts: a leftover is easy to find
cd "$ROOT" || exit 1

if [ "$FAKE" = 1 ]; then
  MODE=fake
  export VLLM_LAB_FAKE_GPU_LEDGER="$OUT/fake-gpu"  # testing/fake_nvml.LEDGER_ENV
  VLAB=("$PY" -m vllm_lab.testing.gpu_alloc vllm-lab)  # the vllm-lab command on the fake NVML
else
  MODE=real
  unset VLLM_LAB_FAKE_GPU_LEDGER
  export CUDA_DEVICE_ORDER=PCI_BUS_ID               # CUDA's device 0 is NVML's device 0
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # one card: torch's cuda:0 is the one sampled
  VLAB=("$PY" -m vllm_lab.cli)
fi
HELP=("$PY" -m vllm_lab.testing.gpu_alloc)

# Packages this python lacks, taken from $SITE (links in OUT/site-fill): it fills gaps, never shadows what
# the machine has (torch's own numpy or typing_extensions stay). Pure-python and abi3 wheels work on any 3.x.
if [ -d "$SITE" ]; then
  mkdir -p "$OUT/site-fill"
  "$PY" - "$SITE" "$OUT/site-fill" >"$OUT/site-fill.txt" 2>&1 <<'EOF'
import importlib.util, os, sys
site, fill = (os.path.abspath(a) for a in sys.argv[1:3])
for name in sorted(os.listdir(site)):
    mod = name[:-3] if name.endswith(".py") else name
    if name.endswith((".dist-info", ".egg-info", ".pth")) or not mod.isidentifier() or mod in ("bin", "__pycache__"):
        continue
    if importlib.util.find_spec(mod) is None and not os.path.lexists(os.path.join(fill, name)):
        os.symlink(os.path.join(site, name), os.path.join(fill, name))
        print(mod)
EOF
  export PYTHONPATH="$PYTHONPATH:$OUT/site-fill"
fi
FAKE_CMD="$PY -m vllm_lab.testing.fake_vllm"
FAILED=0

left() { local l=$((LIMIT_S - ($(date +%s) - START))); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
t() { local s; s=$(left "$1"); shift; [ "$s" -gt 0 ] || return 124; timeout -k 10 "$s" "$@"; }

missing() {  # the modules of "$@" this python cannot import
  "$PY" -c 'import importlib.util as u, sys
print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' "$@" 2>/dev/null || echo "$*"
}

record_step() {  # NAME STATUS SECONDS DETAIL
  "$PY" -c 'import json, sys
n, s, sec, d = sys.argv[1:5]
print(json.dumps({"step": n, "status": s, "seconds": float(sec), "detail": d}))' "$@" >>"$OUT/steps.jsonl"
  printf -- '- **%s** %s (%s s): %s\n' "$2" "$1" "$3" "$4" >>"$OUT/summary.md"
  printf 'gpu-check: %-9s %-8s %5s s  %s\n' "$1" "$2" "$3" "$4"
}

run_step() {  # NAME "MODULES NEEDED" FUNCTION: skipped with one line when a module is missing
  local name=$1 needs=$2 fn=$3 lack t0 rc detail
  lack=$(missing $needs)
  if [ -n "$lack" ]; then
    echo "$name: needs python modules not importable here: $lack (pip install them, or put them in GPU_CHECK_SITE)" >>"$OUT/deps.txt"
    record_step "$name" skipped 0 "missing python modules: $lack"
    return
  fi
  if [ "$(left 5)" -lt 5 ]; then
    record_step "$name" skipped 0 "no time left of the ${LIMIT_S} s limit"; FAILED=1; return
  fi
  t0=$(date +%s.%N)
  STEP_DETAIL=""
  "$fn"; rc=$?
  local secs; secs=$("$PY" -c "import sys; print(round($(date +%s.%N) - $t0, 1))")
  detail=${STEP_DETAIL:-"see $name.*"}
  if [ $rc -eq 0 ]; then record_step "$name" ok "$secs" "$detail"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then record_step "$name" timeout "$secs" "$detail"; FAILED=1
  else record_step "$name" failed "$secs" "exit $rc: $detail"; FAILED=1
  fi
}

# --- steps ---------------------------------------------------------------------------------------------------

step_env() {
  {
    echo "mode: $MODE"; echo "date: $(date -u +%FT%TZ)"; echo "host: $(hostname)"
    echo "repo: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "python: $(command -v "$PY") $("$PY" -c 'import sys; print(sys.version.split()[0])')"
    "$PY" -c 'import torch; print("torch:", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.device_count(), "device(s)")' 2>&1 | tail -1
    echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>} CUDA_DEVICE_ORDER=${CUDA_DEVICE_ORDER-<unset>}"
    command -v nvidia-smi >/dev/null && t 30 nvidia-smi 2>&1 || echo "nvidia-smi: not on PATH"
  } >"$OUT/env.txt" 2>&1
  local all; all=$(missing pynvml yaml httpx psutil numpy pandas matplotlib seaborn nbformat nbconvert torch pytest)
  echo "python modules missing: ${all:-none}" >>"$OUT/env.txt"
  STEP_DETAIL="python $("$PY" -c 'import sys; print(sys.version.split()[0])'); missing: ${all:-none}"
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { STEP_DETAIL="python >= 3.10 needed; $STEP_DETAIL"; return 1; }
}

step_gpus() {
  t 60 "${VLAB[@]}" gpus >"$OUT/gpus.txt" 2>&1 || return $?
  t 60 "${VLAB[@]}" gpus --json >"$OUT/gpus.json" 2>"$OUT/gpus.err" || return $?
  STEP_DETAIL=$(head -n 1 "$OUT/gpus.txt")
  grep -q '"available": true' "$OUT/gpus.json" || { STEP_DETAIL="NVML finds no GPU: $STEP_DETAIL"; return 1; }
}

write_models() {  # the fake vLLM's model (it reads config.json only) and the fp16 twin of Qwen3-8B-AWQ
  "$PY" - "$OUT/models" "$ROOT/params/models/Qwen3-8B-AWQ/config.json" <<'EOF'
import json, pathlib, sys
out, awq = pathlib.Path(sys.argv[1]), json.loads(pathlib.Path(sys.argv[2]).read_text())
fp16 = {k: v for k, v in awq.items() if k != "quantization_config"}
fp16["torch_dtype"] = "float16"
(out / "Qwen3-8B-fp16").mkdir(parents=True, exist_ok=True)
(out / "Qwen3-8B-fp16" / "config.json").write_text(json.dumps(fp16, indent=2))
fake = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 40960,
        "vocab_size": 1000, "torch_dtype": "float16"}
(out / "fake-kv").mkdir(parents=True, exist_ok=True)
(out / "fake-kv" / "config.json").write_text(json.dumps(fake, indent=2))
EOF
}

step_preflight() {
  write_models || return 1
  local rc=0 name model
  for pair in "qwen3-8b-awq:Qwen3-8B-AWQ" "qwen3-8b-fp16:$OUT/models/Qwen3-8B-fp16"; do
    name=${pair%%:*}; model=${pair#*:}
    t 60 "${VLAB[@]}" preflight --model "$model" --gpu auto >"$OUT/preflight-$name.txt" 2>&1 || rc=$?
    t 60 "${VLAB[@]}" preflight --model "$model" --gpu auto --json >"$OUT/preflight-$name.json" 2>"$OUT/preflight-$name.err" || rc=$?
  done
  STEP_DETAIL="$(head -n 1 "$OUT/preflight-qwen3-8b-awq.txt") | $(head -n 1 "$OUT/preflight-qwen3-8b-fp16.txt")"
  return $rc
}

step_alloc() {
  [ -f "$OUT/models/fake-kv/config.json" ] || write_models || return 1
  local rc=0 mib d
  for mib in $KV_MIBS; do
    d="$OUT/alloc-$mib"; mkdir -p "$d"
    t 30 "${HELP[@]}" used >"$d/before.json" 2>"$d/used.err" || rc=1
    FAKE_VLLM_GPU_ALLOC=1 FAKE_VLLM_START_DELAY=1 t 200 "${VLAB[@]}" launch --model "$OUT/models/fake-kv" \
      --vllm-cmd "$FAKE_CMD" --max-model-len 1024 --kv-cache-memory-bytes $((mib * 1048576)) \
      --timeout 180 --out "$OUT/run" --json >"$d/launch.out" 2>"$d/launch.err" || rc=$?
    tail -n 1 "$d/launch.out" >"$d/record.json"
    t 30 "${HELP[@]}" used >"$d/after.json" 2>>"$d/used.err" || rc=1
    STEP_DETAIL="${STEP_DETAIL:+$STEP_DETAIL; }$mib MiB: $("$PY" -c 'import json, sys
r = json.load(open(sys.argv[1]))
print(r["outcome"], "peak_gpu_mib", r.get("peak_gpu_mib"), "samples", len(r.get("gpu_memory_timeline") or []), "note", r.get("note"))' "$d/record.json" 2>/dev/null || echo "no record: $(tail -n 1 "$d/launch.err")")"
  done
  return $rc
}

step_stubborn() {
  [ -f "$OUT/models/fake-kv/config.json" ] || write_models || return 1
  local rc=0
  t 240 "${HELP[@]}" stubborn --model "$OUT/models/fake-kv" --kv-mib "$STUBBORN_MIB" --out "$OUT/run" \
    --vllm-cmd "$FAKE_CMD" >"$OUT/stubborn.out" 2>"$OUT/stubborn.err" || rc=$?
  tail -n 1 "$OUT/stubborn.out" >"$OUT/stubborn.json"
  STEP_DETAIL=$("$PY" -c 'import json, sys
r = json.load(open(sys.argv[1]))
print(r["outcome"], "held", r.get("nvml_held_mib"), "after", r.get("nvml_after_mib"), "baseline", r.get("nvml_baseline_mib"), "stop", r.get("stop_s"), "s, survivors", r.get("survivors"), "note", r.get("gpu_note"))' "$OUT/stubborn.json" 2>/dev/null || tail -n 1 "$OUT/stubborn.err")
  return $rc
}

step_table() {
  t 60 "${HELP[@]}" table "$OUT" >"$OUT/table.out" 2>&1; local rc=$?
  STEP_DETAIL="$(grep -c '^- PASS' "$OUT/nvml-vs-allocated.md" 2>/dev/null) PASS, $(grep -c '^- FAIL' "$OUT/nvml-vs-allocated.md" 2>/dev/null) FAIL (nvml-vs-allocated.md)"
  return $rc
}

step_report() {
  [ -f "$OUT/run/trials.jsonl" ] || { STEP_DETAIL="no run/trials.jsonl: the alloc step recorded nothing"; return 1; }
  local lack; lack=$(missing nbformat nbconvert)
  if [ -z "$lack" ]; then
    t 120 "${VLAB[@]}" report "$OUT/run" >"$OUT/report.out" 2>&1 || return $?
  else  # the plot alone: plots.py needs only pandas, seaborn, matplotlib
    echo "report: needs python modules not importable here: $lack (only the timeline plot is drawn)" >>"$OUT/deps.txt"
    t 120 "$PY" -c 'import sys, pandas as pd
from pathlib import Path
from vllm_lab import plots, record
run = Path(sys.argv[1])
print(plots.plot_timeline(pd.DataFrame(record.read_records(run, keep_torn_aside=False).rows), run / "plots" / "gpu_memory_timeline.png"))' \
      "$OUT/run" >"$OUT/report.out" 2>&1 || return $?
  fi
  [ -s "$OUT/run/plots/gpu_memory_timeline.png" ] || { STEP_DETAIL="no plots/gpu_memory_timeline.png"; return 1; }
  STEP_DETAIL="run/plots/gpu_memory_timeline.png${lack:+ (no report.md: missing $lack)}"
}

step_pytest() {
  t 150 "$PY" -m pytest "$ROOT/tests/gpu" -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" \
    >"$OUT/pytest-gpu.txt" 2>&1; local rc=$?
  STEP_DETAIL=$(tail -n 1 "$OUT/pytest-gpu.txt")
  return $rc
}

leftovers() {  # processes this check started that are still alive (there must be none)
  "$PY" - "$GPU_CHECK_RUN" <<'EOF'
import os, sys
mine = f"GPU_CHECK_RUN={sys.argv[1]}".encode()
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        continue
    if mine in env and int(pid) not in (os.getpid(), os.getppid()) and state != "Z":
        print(pid)
EOF
}

# --- run -----------------------------------------------------------------------------------------------------

: >"$OUT/steps.jsonl"; : >"$OUT/deps.txt"
printf '# GPU check (%s mode), %s\n\n' "$MODE" "$(date -u +%FT%TZ)" >"$OUT/summary.md"
NVML=pynvml; [ "$MODE" = fake ] && NVML=""
TORCH=torch; [ "$MODE" = fake ] && TORCH=""
run_step env "" step_env
run_step gpus "$NVML" step_gpus
run_step preflight "$NVML yaml" step_preflight
run_step alloc "$NVML $TORCH httpx psutil" step_alloc
run_step stubborn "$NVML $TORCH httpx psutil" step_stubborn
run_step table "" step_table
run_step report "pandas seaborn matplotlib" step_report
run_step pytest "pytest $NVML httpx psutil yaml" step_pytest

LEFT=$(leftovers)
if [ -n "$LEFT" ]; then
  record_step leftovers failed 0 "processes of this check still alive (now killed): $(echo $LEFT)"; FAILED=1
  for pid in $LEFT; do kill -9 "$pid" 2>/dev/null; done  # ours (GPU_CHECK_RUN): they must not keep the GPU
else
  record_step leftovers ok 0 "no process of this check is left"
fi
[ -s "$OUT/nvml-vs-allocated.md" ] && { echo; cat "$OUT/nvml-vs-allocated.md"; } >>"$OUT/summary.md"
[ -s "$OUT/deps.txt" ] && cat "$OUT/deps.txt"
echo "gpu-check: results in $OUT (summary.md) after $(($(date +%s) - START)) s"
exit $FAILED
