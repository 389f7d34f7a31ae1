"""`vllm-lab run --ray` on real Ray clusters: trials as Ray tasks on fake GPUs, with the fake vLLM.

Two clusters, kept small (2 CPUs, a 100 MB object store, no dashboard): one started in this process with
two fake GPUs (ray.init(num_gpus=2)), and two nodes on 127.0.0.1 (`ray start --head`, then a second
`ray start --address`), each its own fake GPU type (Ray's accelerator_type resource) and its own simulated
card size (FAKE_VLLM_GPU_MIB in the node's environment, which its workers and their servers inherit).
Every cluster is stopped in a finally; no test here leaves a fake vLLM behind.

Ray 2.60 needs a machine that is not overloaded: at load 10-26 on 2 cores its raylet gave up waiting (a
fixed 15 s) for the dashboard agent (~47 s to start there). On a quiet 2-core box all six pass in ~195 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import ray  # the `ray` extra, installed by `make setup`
from conftest import FAKE_MODEL_CONFIG, ROOT, fake_trial, wait_until
from test_ray import _plan, fake_servers
from vllm_lab import ray_exec, record
from vllm_lab.launcher import OWNER_ENV

pytestmark = pytest.mark.fake

SMALL_MIB = 7860  # at util 0.9 the fake holds 17200 tokens: 16384 is stable there, 32768 is not
TINY_CLUSTER = {"num_cpus": 2, "num_gpus": 2, "resources": {"accelerator_type:FAKE-A": 1},
                "object_store_memory": 100 * 2**20}  # fmt: skip


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder whose NAME is this test's own: a task's scratch lives in /tmp/vllm-lab-ray/<run name>, shared
    by every checkout and test on the machine, and `reap --ray` clears that whole folder. conftest's `run`
    (the same name in every test) let one test's scratch be cleared under another's running task (seen once,
    FileNotFoundError on the task's own log, in a fresh-clone CI run)."""
    d = tmp_path / f"run-{tmp_path.name}-{os.getpid()}"
    d.mkdir()
    return d


# ---- a local cluster in this process, two fake GPUs -------------------------------------------------------


@pytest.fixture(scope="class")
def local_ray():
    os.environ[ray_exec.LOCAL_ENV] = json.dumps(TINY_CLUSTER)
    try:
        ray_exec.connect("local")
        yield
    finally:
        os.environ.pop(ray_exec.LOCAL_ENV, None)
        ray_exec.end_session()
    assert not ray.is_initialized()
    # The per-test leak check leaves Ray's own processes to the cluster's lifetime: they end with it.
    assert wait_until(lambda: not _ray_processes(), timeout=30), _ray_processes()


def _bound_to(batch_pid: int) -> list[str]:
    """Live processes a batch started (its kernels), by the batch pid they inherited."""
    from vllm_lab.launcher import BATCH_PID_ENV

    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(BATCH_PID_ENV) == str(batch_pid) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:200]}")
        except (psutil.Error, OSError):
            pass
    return out


def _ray_processes() -> list[int]:
    from conftest import _ray_own

    mine = str(os.getpid())
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(OWNER_ENV) == mine and _ray_own(p) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (psutil.Error, OSError):
            pass
    return out


@pytest.mark.usefixtures("local_ray")
class TestLocalCluster:
    def _session(self, run_dir: Path, retries: int = 0):
        ray_exec.start_session(None, run_dir, pins={}, retries=retries)

    def test_trials_run_at_once_and_only_the_driver_writes_the_run_folder(self, run_dir, fake_model):
        self._session(run_dir)
        env = {"FAKE_VLLM_START_DELAY": "2"}
        trials = [fake_trial(fake_model, max_model_len=n, env=env, step="s") for n in (512, 1024, 2048, 4096)]
        recs = ray_exec.run_remote(trials, run_dir)
        assert [r["trial_id"] for r in recs] == [t.trial_id for t in trials]
        rows = record.read_records(run_dir).rows
        assert sorted(r["trial_id"] for r in rows) == sorted(t.trial_id for t in trials)
        assert {r["outcome"] for r in rows} == {"ready"}
        assert {r["gpu"] for r in rows} == {"FAKE-A"}
        assert {tuple(r["gpu_ids"]) for r in rows} == {("0",), ("1",)}  # both slots were used
        assert all(r["node"] and "(" in r["node"] for r in rows)
        for r in rows:  # the worker's redacted log, copied into the driver's run folder
            assert Path(r["log_path"]).parent == run_dir / "logs" and Path(r["log_path"]).is_file()
        # Workers clean up their scratch (after the record is sent: the generator's finally runs next). 30 s
        # was once too short late in a full run on 2 loaded cores; alone it takes a few seconds.
        assert wait_until(lambda: not list(ray_exec.scratch_root(run_dir.name).glob("*")), timeout=90)
        # resume: nothing runs again, nothing is appended twice
        again = ray_exec.run_remote(trials, run_dir)
        assert [r["trial_id"] for r in again] == [t.trial_id for t in trials]
        assert len(record.read_records(run_dir).rows) == len(trials)
        assert not fake_servers(str(fake_model))

    def test_a_killed_worker_is_an_infrastructure_failure_then_runs_again(self, run_dir, fake_model):
        self._session(run_dir, retries=1)
        trial = fake_trial(fake_model, env={"FAKE_VLLM_START_DELAY": "4"}, step="s")
        killed: dict = {}

        def kill_first_worker():
            servers = wait_until(lambda: fake_servers(str(fake_model)), timeout=60)
            server = servers[0]
            killed["server"] = server.pid
            killed["worker"] = server.ppid()
            os.kill(killed["worker"], signal.SIGKILL)

        killer = threading.Thread(target=kill_first_worker)
        killer.start()
        rec = ray_exec.run_remote([trial], run_dir)[0]
        killer.join()
        assert rec["trial_id"] == trial.trial_id and rec["outcome"] == "ready"
        rows = record.read_records(run_dir).rows
        lost = [r for r in rows if r["failure"] == ray_exec.INFRA]
        assert [r["trial_id"] for r in lost] == [f"{trial.trial_id}-lost1"]
        assert lost[0]["outcome"] == "failed" and "(" in lost[0]["node"] and lost[0]["gpu"] == "FAKE-A"
        assert "worker" in lost[0]["evidence"]
        assert len(rows) == 2
        # the killed worker's server got SIGTERM from the kernel (PR_SET_PDEATHSIG)
        assert wait_until(lambda: not psutil.pid_exists(killed["server"]) or
                          psutil.Process(killed["server"]).status() == psutil.STATUS_ZOMBIE, timeout=20)  # fmt: skip
        assert not fake_servers(str(fake_model))

    def test_lost_without_retries_raises_and_resume_runs_it(self, run_dir, fake_model):
        self._session(run_dir, retries=0)
        trial = fake_trial(fake_model, env={"FAKE_VLLM_START_DELAY": "4"}, step="s")

        def kill():
            server = wait_until(lambda: fake_servers(str(fake_model)), timeout=60)[0]
            os.kill(server.ppid(), signal.SIGKILL)

        killer = threading.Thread(target=kill)
        killer.start()
        with pytest.raises(ray_exec.TrialLost, match="retries"):
            ray_exec.run_remote([trial], run_dir)
        killer.join()
        assert [r["trial_id"] for r in record.read_records(run_dir).rows] == [f"{trial.trial_id}-lost1"]
        rec = ray_exec.run_remote([trial], run_dir)[0]  # what --resume does: the trial itself is not recorded
        assert rec["outcome"] == "ready"
        assert len(record.read_records(run_dir).rows) == 2

    def test_a_cancelled_task_ends_its_server(self, run_dir, fake_model):
        trial = fake_trial(fake_model, env={"FAKE_VLLM_SCENARIO": "hang"}, step="s", startup_timeout_s=120)
        gen = ray_exec.submit(trial, run_dir.name)
        ray.get(next(gen))
        server = wait_until(lambda: fake_servers(str(fake_model)), timeout=60)[0]
        ray.cancel(gen)
        assert wait_until(lambda: not fake_servers(str(fake_model)), timeout=30)
        assert not psutil.pid_exists(server.pid) or server.status() == psutil.STATUS_ZOMBIE
        # A cancel may end the worker before its finally: the scratch folder is what reap clears.
        ray_exec.reap_nodes(run_dir, None)
        assert not list(ray_exec.scratch_root(run_dir.name).glob("*"))
        assert not record.read_records(run_dir).rows  # a cancelled trial is not a result

    def test_reap_reaches_the_nodes(self, run_dir, fake_model):
        from vllm_lab.launcher import VllmServer

        left = ray_exec.scratch_root(run_dir.name) / "left-behind"
        server = VllmServer(fake_trial(fake_model, step="s"), left)
        assert server.start().outcome == "ready"  # never stopped: what a killed task could leave
        found = ray_exec.reap_nodes(run_dir, None)
        ended = [e["pid"] for node in found for e in node["ended"]]
        assert ended == [server.proc.pid]
        assert not fake_servers(str(fake_model)) and not left.exists()
        server.stop()

    def test_the_local_cluster_listens_on_loopback_only(self):
        """`--ray local` needs no network: older Ray heads have no auth (issue 22, point 15)."""
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
        facts = ray.get(ray.remote(num_cpus=1)(ray_exec.node_facts).remote())  # a worker up: it listens too
        assert "(127.0.0.1, " in facts["node"]
        assert _listening_elsewhere([psutil.Process(), *map(psutil.Process, _ray_processes())]) == []


def _listening_elsewhere(procs: list[psutil.Process]) -> list[str]:
    """Listening sockets of these processes on any address but loopback."""
    out = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.Error, OSError):
            continue
        for c in conns:
            ip = c.laddr.ip.removeprefix("::ffff:") if c.laddr else ""
            if c.status == psutil.CONN_LISTEN and not (ip.startswith("127.") or ip == "::1"):
                out.append(f"{p.pid} {p.name()} {c.laddr.ip}:{c.laddr.port}")
    return out


# ---- two nodes on 127.0.0.1, two GPU types ---------------------------------------------------------------


def _free_port() -> int:
    from vllm_lab.launcher import free_port

    return free_port()


# `ray start` turns --node-ip-address 127.0.0.1 into the machine's network address (and its GCS and raylet
# then listen on every interface); kept as given, the test nodes listen on loopback only (issue 22, point 15).
RAY_START_LOOPBACK = (
    "import sys\nimport ray._private.services as s\ns.resolve_ip_for_localhost = lambda host: host\n"
    "from ray.scripts.scripts import main\nsys.argv[0] = 'ray'\nsys.exit(main())\n"
)
LOOPBACK_CLIENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # a client keeps 127.0.0.1 too (ray_exec does)


def _start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start --block` in its own session: ending that session ends the node (never `ray stop`, which
    would end every Ray on this machine)."""
    return subprocess.Popen(
        [sys.executable, "-c", RAY_START_LOOPBACK, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
         "--object-store-memory", str(100 * 2**20), "--disable-usage-stats", *args],
        env={**os.environ, **env}, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _stop_node(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    from vllm_lab.launcher import stop_tree

    stop_tree(proc.pid, grace_s=5)  # the whole session: raylet, gcs, workers


def _session_alive(sid: int) -> list[int]:
    from conftest import processes_in_session

    return processes_in_session(sid)


def _cluster_up(address: str, nodes: int, timeout: float = 90) -> bool:
    code = (
        "import ray, sys, time\n"
        f"ray.init(address={address!r}, log_to_driver=False)\n"
        f"t = time.time()\n"
        f"while len([n for n in ray.nodes() if n['Alive']]) < {nodes} and time.time() - t < {timeout}:\n"
        "    time.sleep(0.5)\n"
        f"sys.exit(0 if len([n for n in ray.nodes() if n['Alive']]) >= {nodes} else 1)\n"
    )
    try:
        return subprocess.run([sys.executable, "-c", code], timeout=timeout + 60,
                              env={**os.environ, **LOOPBACK_CLIENT}).returncode == 0  # fmt: skip
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.notebook
def test_two_nodes_two_gpu_types_driver_killed_then_resumed(tmp_path, monkeypatch):
    # Ray 2.60 turns token auth on by default, and a client only sends the token when RAY_AUTH_MODE=token is
    # in its environment (an earlier in-process ray.init sets it, so the outcome depended on test order).
    # These nodes listen on 127.0.0.1 only and live for this test: auth off for nodes and clients alike.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    model = tmp_path / "models" / "tiny-fake"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(FAKE_MODEL_CONFIG))
    plan = _plan(tmp_path, model, "per_gpu_type: true\nretries: 1\n")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(_start_node(
            ["--head", "--port", str(port), "--include-dashboard", "false", "--num-gpus", "1",
             "--resources", json.dumps({"accelerator_type:FAKE-SMALL": 1})],
            {"FAKE_VLLM_GPU_MIB": str(SMALL_MIB)}, tmp_path / "head.log"))  # fmt: skip
        assert _cluster_up(address, 1), (tmp_path / "head.log").read_text()[-2000:]
        nodes.append(_start_node(
            ["--address", address, "--num-gpus", "1",
             "--resources", json.dumps({"accelerator_type:FAKE-BIG": 1})],
            {"FAKE_VLLM_GPU_MIB": "24576", "FAKE_VLLM_START_DELAY": "3"}, tmp_path / "worker.log"))  # fmt: skip
        assert _cluster_up(address, 2), (tmp_path / "worker.log").read_text()[-2000:]
        node_procs = [psutil.Process(pid) for proc in nodes for pid in _session_alive(proc.pid)]
        assert _listening_elsewhere(node_procs) == []

        cmd = [str(Path(sys.executable).parent / "vllm-lab"), "run", str(plan), "--ray", address,
               "--out", str(tmp_path / "out")]  # fmt: skip
        env = {**os.environ, "VLLM_LAB_LOCK_DIR": str(tmp_path)}
        # The driver killed once a first record is in: the rest is what --resume must do, without duplicates.
        first = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)  # fmt: skip
        try:
            trials = wait_until(lambda: list((tmp_path / "out").glob(f"*/{record.TRIALS_FILE}")), timeout=180)
            assert trials, "the first run recorded nothing"
            assert wait_until(lambda: record.read_records(trials[0].parent).rows, timeout=120)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        # Its kernels end with it (PR_SET_PDEATHSIG, in their own session): give them the time to.
        assert wait_until(lambda: not _bound_to(first.pid), timeout=90), _bound_to(first.pid)
        run_dir = trials[0].parent
        done = subprocess.run([*cmd[:-2], "--resume", str(run_dir)], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=400)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]

        rows = [r for r in record.read_records(run_dir).rows if r["failure"] != ray_exec.INFRA]
        ids = [r["trial_id"] for r in rows]
        assert len(ids) == len(set(ids)) == 4  # 2 steps x 2 GPU types, each once
        by = {(r["step"], r["gpu"]): r for r in rows}
        assert set(by) == {(f"{s}@{g}", g) for s in ("ctx16k", "ctx32k") for g in ("FAKE-SMALL", "FAKE-BIG")}
        assert by[("ctx32k@FAKE-SMALL", "FAKE-SMALL")]["failure"] == "kv_cache_insufficient"
        assert by[("ctx32k@FAKE-BIG", "FAKE-BIG")]["outcome"] == "ready"
        assert len({r["node"] for r in rows}) == 2
        md = (run_dir / "report.md").read_text()
        assert "## GPU types" in md
        axis = md.split("Largest stable max_model_len per GPU type")[1].split("\n## ")[0]
        lines = {ln.split("|")[1].strip(): ln for ln in axis.splitlines() if ln.startswith("| FAKE")}
        assert "32768" in lines["FAKE-BIG"] and "16384" in lines["FAKE-SMALL"]
        assert (run_dir / "notebooks" / "ctx32k@FAKE-BIG.ipynb").is_file()
        assert not fake_servers(str(model))
    finally:
        for proc in reversed(nodes):
            _stop_node(proc)
        for proc in nodes:
            assert not _session_alive(proc.pid), "a Ray process of the test cluster survived"
