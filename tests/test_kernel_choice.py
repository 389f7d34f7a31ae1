"""batch.kernel_name: the notebooks run in a kernel of this very Python, or the run says so before anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from vllm_lab import batch
from vllm_lab.spec import SpecError

pytestmark = pytest.mark.unit
OTHER = "/opt/conda/bin/python"  # another Python, as a user's conda registers it


def _kernels(root: Path, **argv0: str) -> Path:
    """A Jupyter data dir holding kernelspecs name -> argv[0]; JUPYTER_PATH puts it before every other."""
    for name, exe in argv0.items():
        d = root / "kernels" / name.replace("_", "-")
        d.mkdir(parents=True)
        spec = {"argv": [exe, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "language": "python",
                "display_name": name}  # fmt: skip
        (d / "kernel.json").write_text(json.dumps(spec))
    return root


def test_make_setups_kernel_is_chosen():
    assert batch.kernel_name() == "vllm-lab"  # `make setup` registered it with this venv's python by path


def test_this_venvs_python3_is_this_python_as_pip_scripts_run_it(monkeypatch):
    """`.venv/bin/pytest` and `.venv/bin/vllm-lab` run as .venv/bin/python3; the kernelspec says python."""
    venv_bin = Path(sys.executable).parent
    if not (venv_bin / "python3").exists():
        pytest.fail(f"{venv_bin} has no python3 (a venv made by `python3 -m venv` has both)")
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python3"))
    assert batch.kernel_name() == "vllm-lab"
    assert not batch._is_this_python("/usr/bin/python3")  # another folder: another install


def test_a_vllm_lab_kernel_of_another_python_falls_back_to_the_native_one(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(_kernels(tmp_path, vllm_lab=OTHER)))
    assert batch.kernel_name() == "python3"


def test_kernels_that_run_another_python_are_one_line_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(_kernels(tmp_path / "jp", vllm_lab=OTHER, python3=OTHER)))
    with pytest.raises(SpecError) as e:
        batch.kernel_name()
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and sys.executable in msg and OTHER in msg and "make setup" in msg, msg
    out = tmp_path / "outputs"
    with pytest.raises(SpecError, match="no Jupyter kernel runs this Python"):
        batch.run_plan(str(Path(__file__).parents[1] / "params" / "demo-cpu.yaml"), out=str(out))
    assert not out.exists()  # no run folder, nothing launched


def test_a_bare_python_in_a_kernelspec_is_this_python(tmp_path, monkeypatch):
    """ipykernel's own kernel.json says "python": jupyter_client runs sys.executable for it."""
    monkeypatch.setenv("JUPYTER_PATH", str(_kernels(tmp_path, vllm_lab="python3")))
    assert batch.kernel_name() == "vllm-lab"
