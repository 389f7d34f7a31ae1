"""batch.execute: a notebook run prints none of the kernel's own noise (a newcomer reads it as a fault)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from vllm_lab import batch

pytestmark = pytest.mark.notebook

# The interrupt jupyter_client sends before every shutdown is caught and logged only when it lands while the
# kernel is inside a message handler; the last one is the kernel_info reply papermill asks for. This cell
# makes that window 3 s wide (log.debug runs right after the reply is sent), so the race is certain.
WIDEN_THE_SHUTDOWN_RACE = """
import time
_log = get_ipython().kernel.log
def _slow_after_kernel_info(fmt, *args, _debug=_log.debug, _sleep=time.sleep, **kw):
    if "kernel_info_reply" in str(args):
        _sleep(3)
    return _debug(fmt, *args, **kw)
_log.debug = _slow_after_kernel_info
"""


def test_execute_prints_no_kernel_noise(tmp_path: Path, monkeypatch, capfd):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("X = 1  # a parameter", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(WIDEN_THE_SHUTDOWN_RACE),
        nbformat.v4.new_code_cell("print('x is', X)"),
    ]
    nbformat.write(nb, tmp_path / "quiet.ipynb")
    monkeypatch.setattr(batch, "NOTEBOOK_DIR", tmp_path)
    assert batch.execute("quiet", tmp_path / "out.ipynb", {"X": 2}, timeout_s=60) is None
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert out.cells[-1].outputs[0]["text"] == "x is 2\n"  # it ran, with the parameter
    captured = capfd.readouterr()  # the kernel writes to the inherited file descriptors, not sys.stderr
    noise = captured.err + captured.out
    assert "without encryption" not in noise, noise
    assert "KeyboardInterrupt" not in noise, noise
