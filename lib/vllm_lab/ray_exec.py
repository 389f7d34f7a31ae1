"""Trials as Ray tasks (`vllm-lab run --ray`): the only module that imports ray, and only when asked.

Each step's notebook still runs through papermill on the driver; where it would launch a trial, steps.py hands
the trial here. Each trial becomes one Ray task asking `num_gpus` = the GPUs vLLM will use (tensor x pipeline x
data parallel sizes; Ray sets CUDA_VISIBLE_DEVICES), so the trials of one run_trials call run at once and a
search's launches, one call each, stay in order. A CPU-build trial sizes its threads and KV space for the whole
machine: one runs per node at a time (a lock file on the node; the plan's `cpu_trials_per_node` changes it),
and a CUDA build is refused in one line on a cluster without GPUs. `--ray local` starts a cluster that
listens on 127.0.0.1 only (GCS, raylet, workers): older Ray heads have no auth, and a local run needs no
network. The task runs probe.run_trial in a scratch folder on its node and sends back the record and the
redacted log; only the driver side writes the run folder (logs/, then the record, appended and fsynced).

A task that dies with its worker or node is an infrastructure failure, recorded with its node (failure
"infrastructure", trial id `<id>-lostN`, never reused as that trial's result) and run again while the plan's
`retries` allow. A cancelled task ends its server tree (the VllmServer context); a killed worker's server gets
SIGTERM from the kernel (PR_SET_PDEATHSIG); whatever is left is found by `vllm-lab reap RUN --ray ADDRESS`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_lab import record
from vllm_lab.spec import SpecError, Trial, flag_values

RAY_ENV = "VLLM_LAB_RAY"  # set by the batch for its kernels: path of the run's session file
SESSION_FILE = "ray.json"  # in the run folder: cluster address, step -> GPU type, retries
LOCAL_ENV = "VLLM_LAB_RAY_LOCAL"  # JSON of ray.init overrides for `--ray local` (num_gpus, resources, ...)
NAMESPACE = "vllm-lab"
GPU_TYPE_PREFIX = "accelerator_type:"  # Ray's own resource naming for a node's GPU model
INFRA = "infrastructure"  # the failure of a trial whose worker or node died: not a vLLM failure kind
OBJECT_STORE_BYTES = 200 * 2**20  # records and logs are small; the default takes 30% of RAM
PIN_AMOUNT = 0.001  # a task pinned to a GPU type asks for this much of the type's resource
LOOPBACK = "127.0.0.1"
# Ray's own switch for a node that stays on loopback (its default on macOS and Windows): without it Ray turns
# 127.0.0.1 into the machine's network address, and its GCS and raylet listen on every interface.
_RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
PARALLEL_FLAGS = (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp"),
                  ("--data-parallel-size", "-dp"))  # fmt: skip
INSTALL_HINT = "pip install 'vllm-lab[ray]'"
_append_lock = threading.Lock()


def scratch_root(run_name: str) -> Path:
    """Where a node's tasks of one run keep their scratch run folders (found again by reap)."""
    return Path(tempfile.gettempdir()) / "vllm-lab-ray" / run_name


# ---- the cluster ------------------------------------------------------------------------------------------


def require_ray():
    """The ray module, or one line saying how to install it (the `ray` extra is optional)."""
    try:
        import ray
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "ray":
            raise
        raise SpecError(
            f"--ray: Ray is not installed in this Python ({sys.executable}); install it with {INSTALL_HINT}"
        ) from None
    return ray


@contextlib.contextmanager
def _loopback_only():
    """While a local cluster starts: Ray keeps 127.0.0.1 as the node's address (its processes inherit it)."""
    from ray._private import ray_constants

    before_env, before = os.environ.get(_RAY_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_RAY_CLUSTER_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
        if before_env is None:
            os.environ.pop(_RAY_CLUSTER_ENV, None)
        else:
            os.environ[_RAY_CLUSTER_ENV] = before_env


def _is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def connect(address: str | None) -> str:
    """Join a cluster ("auto" or HOST:PORT) or start a small local one ("local"/None); return its address."""
    ray = require_ray()

    if not ray.is_initialized():
        common = {"namespace": NAMESPACE, "log_to_driver": False}
        if address in (None, "", "local"):
            local = {"include_dashboard": False, "object_store_memory": OBJECT_STORE_BYTES,
                     **json.loads(os.environ.get(LOCAL_ENV) or "{}")}  # fmt: skip
            # Ray's wait for a starting node is fixed (30 s): once more, then give up
            for attempt in (1, 2):
                try:
                    with _loopback_only():  # never a stale cluster Ray remembers; loopback only
                        ray.init(address="local", _node_ip_address=LOOPBACK, **common, **local)
                    break
                except Exception as e:
                    if "timed out during startup" not in str(e):
                        raise
                    ray.shutdown()
                    if attempt == 2:  # seen on a 2-core box at load 10+: the node's agents start too slowly
                        raise SpecError(
                            "--ray local: Ray's node did not start within Ray's fixed wait, twice (an overloaded "
                            "machine); retry when it is quieter, or start one with `ray start --head` and pass "
                            "its address"
                        ) from None
        else:
            try:
                # a node on loopback (a test cluster, a `--ray local`-like head): Ray would otherwise rewrite
                # 127.0.0.1 into the machine's network address, where such a node does not listen
                with _loopback_only() if _is_loopback(address) else contextlib.nullcontext():
                    ray.init(address=address, **common)
            except ray.exceptions.AuthenticationError as e:  # a cluster with token auth (Ray >= 2.52)
                raise SpecError(
                    f"--ray: the Ray cluster at {address} refused this client ({e.message}); it uses token "
                    "authentication: set RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or the file "
                    "~/.ray/auth_token from its head node)"
                ) from None
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise SpecError(
                    f"--ray: no Ray cluster at {address} ({str(e).splitlines()[0]}); start one with "
                    "`ray start --head`, or use --ray local"
                ) from None
    return ray.get_runtime_context().gcs_address


def shutdown() -> None:
    import sys

    if "ray" in sys.modules:
        import ray

        ray.shutdown()


def gpu_types() -> list[str]:
    """The GPU types of the cluster's live nodes (Ray's accelerator_type resources), sorted."""
    import ray

    found = {
        k[len(GPU_TYPE_PREFIX) :] for n in ray.nodes() if n.get("Alive") for k in n.get("Resources", {})
        if k.startswith(GPU_TYPE_PREFIX)
    }  # fmt: skip
    return sorted(found)


def per_gpu_type_steps(steps: list, types: list[str]) -> tuple[list, dict[str, str]]:
    """Each step once per GPU type, named `<step>@<type>` (so trial ids differ); and step -> type."""
    import dataclasses

    if not types:
        raise SpecError(
            "per_gpu_type: the Ray cluster reports no GPU type (accelerator_type resource); start its nodes "
            "on GPUs, or with --resources '{\"accelerator_type:NAME\": 1}', or set per_gpu_type: false"
        )
    out, pins = [], {}
    for s in steps:
        for t in types:
            name = f"{s.name}@{t}"
            out.append(dataclasses.replace(s, name=name))
            pins[name] = t
    return out, pins


def start_session(address: str | None, run_dir: Path, *, pins: dict[str, str], retries: int, plan=None,
                  steps: list | None = None) -> Path:  # fmt: skip
    """Connect, write the session file the kernels read, and point RAY_ENV at it (kernels inherit it).

    With the plan and its steps, a CUDA build on a cluster without GPUs is refused here, before any task."""
    gcs = connect(address)
    if plan is not None:
        refuse_cuda_without_gpus(plan_commands(plan, steps or plan.steps, run_dir), gcs)
    per_node = getattr(plan, "cpu_trials_per_node", 1) if plan is not None else 1
    path = Path(run_dir) / SESSION_FILE
    path.write_text(json.dumps({"address": gcs, "run_name": Path(run_dir).name, "pins": pins,
                                "retries": retries, "cpu_trials_per_node": per_node}, indent=1))  # fmt: skip
    os.environ[RAY_ENV] = str(path)
    return path


def end_session() -> None:
    os.environ.pop(RAY_ENV, None)
    shutdown()


def active() -> bool:
    return bool(os.environ.get(RAY_ENV))


def _session() -> dict:
    return json.loads(Path(os.environ[RAY_ENV]).read_text())


def plan_commands(plan, steps: list, run_dir: Path) -> list[tuple[str, dict]]:
    """Every (vllm_cmd, env) the steps will launch: the step's own, and each of its INSTALLS."""
    out = []
    for step in steps:
        params = plan.notebook_parameters(step, run_dir)
        out.append((params.get("VLLM_CMD"), params.get("ENV") or {}))
        for inst in (params.get("INSTALLS") or {}).values():
            out.append((inst.get("vllm_cmd"), {**(params.get("ENV") or {}), **(inst.get("env") or {})}))
    return [(c, e) for c, e in out if c]


def refuse_cuda_without_gpus(cmds: list[tuple], address: str) -> None:
    """A CUDA build on a cluster whose nodes offer no GPU resource would fail every trial: one line first."""
    import ray

    if ray.cluster_resources().get("GPU"):
        return
    from vllm_lab.launcher import backend_of_command

    for cmd, env in dict.fromkeys((c if isinstance(c, str) else shlex.join(c), tuple(sorted((e or {}).items())))
                                  for c, e in cmds):  # fmt: skip
        if backend_of_command(cmd, dict(env)).endswith("-cuda"):
            raise SpecError(
                f"--ray: {cmd!r} runs a CUDA build of vLLM, and the Ray cluster at {address} has no GPU "
                "resources; start its nodes on GPUs (`ray start --num-gpus N`), or run the CPU build"
            )


# ---- the task (runs on a worker) --------------------------------------------------------------------------


def tensor_parallel_size(trial: Trial) -> int:
    """The GPUs vLLM will use: tensor x pipeline x data parallel sizes (each 1 where not given)."""
    total = 1
    for names in PARALLEL_FLAGS:
        for flag in names:
            values = flag_values(trial.extra_args, flag)
            if values and values[0].isdigit():
                total *= max(1, int(values[0]))
                break
    return total


@contextlib.contextmanager
def cpu_slot(slots: int):
    """One of `slots` CPU-trial slots of this node (a lock file each; 0: no limit). A CPU-build server sizes
    its threads and KV space for the whole machine, so two at once on one node would measure each other.
    The lock ends with the worker's process, however it ends."""
    if slots <= 0:
        yield
        return
    root = Path(tempfile.gettempdir()) / "vllm-lab-ray"
    root.mkdir(parents=True, exist_ok=True)
    fds = [os.open(root / f"cpu-slot-{i}.lock", os.O_RDWR | os.O_CREAT, 0o644) for i in range(slots)]
    held = None
    try:
        while held is None:
            for fd in fds:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = fd
                    break
                except BlockingIOError:
                    continue
            else:
                time.sleep(0.5)
        yield
    finally:
        for fd in fds:
            os.close(fd)  # closing releases the lock


def node_facts() -> dict:
    """This worker's node, its GPU type and the GPUs Ray gave this task."""
    import ray

    ctx = ray.get_runtime_context()
    node_id = ctx.get_node_id()
    me = next((n for n in ray.nodes() if n.get("NodeID") == node_id), {})
    types = [k[len(GPU_TYPE_PREFIX) :] for k in me.get("Resources", {}) if k.startswith(GPU_TYPE_PREFIX)]
    ip = me.get("NodeManagerAddress") or "?"
    return {
        "node": f"{platform.node()} ({ip}, {node_id[:8]})",
        "gpu": types[0] if types else None,
        "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
        "pid": os.getpid(),
    }


def trial_task(trial: Trial, run_name: str, cpu_slots: int = 0):
    """A generator task: first where it runs (so a death later is pinned to a node), then what it measured.

    cpu_slots > 0 (a CPU-build trial): it waits for one of the node's CPU-trial slots first."""
    from vllm_lab.launcher import reap_all
    from vllm_lab.probe import run_trial

    facts = node_facts()
    yield facts
    scratch = scratch_root(run_name) / f"{trial.trial_id}-{uuid.uuid4().hex[:6]}"
    scratch.mkdir(parents=True)
    try:
        with cpu_slot(cpu_slots):
            rec = run_trial(trial, scratch, run_id=run_name)  # its VllmServer ends the tree, cancelled or not
        logs = {p.name: p.read_text(errors="replace") for p in sorted((scratch / "logs").glob("*.log"))}
        yield {"record": rec, "logs": logs, **facts}
    finally:
        with contextlib.suppress(Exception):
            reap_all(scratch)
        shutil.rmtree(scratch, ignore_errors=True)


def reap_task(run_name: str) -> dict:
    """On one node: end every server a task of this run left behind (pid files in its scratch folders)."""
    from vllm_lab.launcher import reap_all

    ended = []
    root = scratch_root(run_name)
    for d in sorted(root.glob("*")) if root.is_dir() else []:
        ended += [{"pid": i["pid"], "trial_id": i.get("trial_id")} for i in reap_all(d)]
        shutil.rmtree(d, ignore_errors=True)
    return {"node": node_facts()["node"], "ended": ended}


# ---- the driver side (the batch's kernels) ----------------------------------------------------------------


def _options(trial: Trial, pin: str | None) -> dict:
    import ray

    total = ray.cluster_resources()
    gpus = tensor_parallel_size(trial) if total.get("GPU") else 0  # a CPU-only cluster: the CPU build
    opts: dict = {"num_gpus": gpus, "num_cpus": 0 if gpus else 1, "max_retries": 0}
    if not gpus:
        opts["scheduling_strategy"] = "SPREAD"  # one per node at a time (cpu_slot): spread them first
    if pin:
        opts["resources"] = {GPU_TYPE_PREFIX + pin: PIN_AMOUNT}
    fits = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) >= gpus
            and (not pin or GPU_TYPE_PREFIX + pin in n["Resources"])]  # fmt: skip
    if not fits:
        where = f" of type {pin}" if pin else ""
        raise SpecError(
            f"{trial.trial_id}: no node of the Ray cluster has {gpus} GPU(s){where} for tensor x pipeline x data "
            f"parallel size {gpus}; lower --tensor-parallel-size (or -pp, -dp) or add such a node"
        )
    return opts


def submit(trial: Trial, run_name: str, pin: str | None = None, cpu_trials_per_node: int = 1):
    """One trial as a Ray task; returns its generator (first item: node facts, second: the payload)."""
    import ray

    task = ray.remote(trial_task)  # by reference: workers import vllm_lab.ray_exec
    opts = _options(trial, pin)
    slots = cpu_trials_per_node if not opts["num_gpus"] else 0
    return task.options(**opts).remote(trial, run_name, slots)


def _infra_record(trial: Trial, run_dir: Path, n: int, facts: dict, err: Exception) -> dict:
    cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return record.new_record(
        run_id=Path(run_dir).name, step=trial.step, trial_id=f"{trial.trial_id}-lost{n}", model=trial.model,
        launcher=trial.launcher, max_model_len=trial.max_model_len,
        gpu_memory_utilization=trial.gpu_memory_utilization, kv_cache_memory_bytes=trial.kv_cache_memory_bytes,
        outcome="failed", failure=INFRA,
        evidence=f"the Ray worker running this trial died ({type(err).__name__}: {cause})",
        remedy="not a vLLM failure: the trial runs again elsewhere while the plan's `retries` allow; "
               "otherwise `vllm-lab run PLAN --ray ... --resume RUN` runs it again",
        node=facts.get("node"), gpu=facts.get("gpu"), gpu_ids=facts.get("gpu_ids"),
    )  # fmt: skip


def _keep_logs(run_dir: Path, logs: dict[str, str]) -> dict[str, str]:
    """Write the worker's redacted logs into the run folder; their new paths by name (never overwrite)."""
    out_dir = Path(run_dir) / "logs"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in logs.items():
        stem, n = name.removesuffix(".log"), 1
        while True:
            path = out_dir / (f"{stem}.log" if n == 1 else f"{stem}-{n}.log")
            try:
                with open(path, "x") as f:
                    f.write(text)
                break
            except FileExistsError:
                n += 1
        paths[name] = str(path)
    return paths


def _lost_count(run_dir: Path, trial_id: str) -> int:
    prefix = f"{trial_id}-lost"
    return sum(str(r.get("trial_id", "")).startswith(prefix) for r in record.read_records(run_dir).rows)


class TrialLost(RuntimeError):
    """Every allowed attempt of a trial died with its worker or node."""


def _run_one(trial: Trial, run_dir: Path, session: dict) -> dict:
    import ray
    from ray.exceptions import RayTaskError, TaskCancelledError

    pin = session.get("pins", {}).get(trial.step)
    retries = int(session.get("retries") or 0)
    per_node = int(session.get("cpu_trials_per_node", 1))
    for attempt in range(retries + 1):
        gen = submit(trial, session["run_name"], pin, per_node)
        facts: dict = {}
        try:
            facts = ray.get(next(gen))
            payload = ray.get(next(gen))
        except (KeyboardInterrupt, SystemExit):
            ray.cancel(gen)  # the task ends its server tree
            raise
        except RayTaskError as e:  # our own code raised on the worker (a bad trial): as it would locally
            raise e.as_instanceof_cause() from None
        except TaskCancelledError:
            raise
        except ray.exceptions.RayError as e:  # the worker or its node died: infrastructure, not vLLM
            with _append_lock:
                n = _lost_count(run_dir, trial.trial_id) + 1
                record.append_record(run_dir, _infra_record(trial, run_dir, n, facts, e))
            print(f"{trial.trial_id}: lost with {facts.get('node') or 'its node'} ({type(e).__name__}); "
                  f"{'running it again' if attempt < retries else 'no retries left'}", flush=True)  # fmt: skip
            continue
        rec = payload["record"]
        paths = _keep_logs(run_dir, payload["logs"])
        rec["log_path"] = paths.get(Path(rec.get("log_path") or "").name, rec.get("log_path"))
        rec.update(node=payload["node"], gpu=pin or payload["gpu"], gpu_ids=payload["gpu_ids"])
        with _append_lock:
            record.append_record(run_dir, rec)
        return rec
    raise TrialLost(
        f"{trial.trial_id}: every attempt ({retries + 1}) died with its Ray worker or node (recorded as "
        f"failure {INFRA!r}); raise `retries` in the plan or run again with --resume"
    )


def run_remote(trials: list[Trial], run_dir: str | Path) -> list[dict]:
    """Run trials as Ray tasks at once; a trial already recorded is reused. Records in the trials' order."""
    session = _session()
    connect(session["address"])
    refuse_cuda_without_gpus([(t.vllm_cmd, t.env) for t in trials], session["address"])
    run_dir = Path(run_dir)
    done = {r.get("trial_id"): r for r in record.read_records(run_dir).rows}
    todo = [t for t in dict.fromkeys(t.trial_id for t in trials) if t not in done]
    by_id = {t.trial_id: t for t in trials}
    if todo:
        with ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="ray-trial") as pool:
            futures = {tid: pool.submit(_run_one, by_id[tid], run_dir, session) for tid in todo}
            errors = []
            for tid, fut in futures.items():
                try:
                    done[tid] = fut.result()
                except Exception as e:  # the others still finish and are recorded first
                    errors.append(e)
            if errors:
                raise errors[0]
    return [done[t.trial_id] for t in trials]


def reap_nodes(run_dir: str | Path, address: str | None) -> list[dict]:
    """`vllm-lab reap RUN --ray ADDRESS`: one task per live node ends what this run's tasks left there."""
    ray = require_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    connect(address)
    task = ray.remote(reap_task)
    refs = [
        task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
        .remote(Path(run_dir).name)
        for n in ray.nodes() if n.get("Alive")
    ]  # fmt: skip
    return ray.get(refs)


def cli_reap_nodes(args) -> int:
    try:
        found = reap_nodes(args.run_dir, args.ray)
    finally:
        shutdown()
    for node in found:
        pids = ", ".join(f"pid {e['pid']} ({e['trial_id']})" for e in node["ended"]) or "none left"
        print(f"{node['node']}: {pids}")
    return 0
