"""Issue 22 point 17 end to end over real HTTP: a plan of two installs and --enforce-eager on and off through
`vllm-lab run` (papermill, the fake vLLM) reports which version changed what, and the run ends with it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from conftest import FAKE_CMD
from vllm_lab.paths import REPO_ROOT


@pytest.mark.notebook
@pytest.mark.fake
def test_a_run_of_two_installs_with_and_without_enforce_eager_says_what_changed(tmp_path, fake_model):
    """The plan of the issue over real HTTP: INSTALLS [old, new] x ENFORCE_EAGER [false, true], where old
    dies capturing CUDA graphs without --enforce-eager (the fake's FAKE_VLLM_NEEDS_EAGER)."""
    env = {"FAKE_VLLM_START_DELAY": "0.05"}
    plan = {"model": str(fake_model), "vllm_cmd": FAKE_CMD, "steps": [
        {"name": "h", "notebook": "04_hypotheses", "parameters": {
            "LAUNCHERS": ["head"], "MAX_MODEL_LENS": [1024], "KV_BUDGETS_BYTES": [8 << 20],
            "INSTALLS": ["old", "new"], "ENFORCE_EAGER": [False, True]}}],
        "installs": {"old": {"vllm_cmd": FAKE_CMD, "env": {**env, "FAKE_VLLM_VERSION": "0.27.0",
                                                             "FAKE_VLLM_NEEDS_EAGER": "1"}},
                     "new": {"vllm_cmd": FAKE_CMD, "env": {**env, "FAKE_VLLM_VERSION": "0.32.0"}}}}  # fmt: skip
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "vllm_lab.cli", "run", str(tmp_path / "plan.yaml"), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
                         env={**os.environ, "VLLM_LAB_LOCK_DIR": str(tmp_path)})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    run = next((tmp_path / "out").iterdir())
    md = (run / "report.md").read_text()
    assert "Nothing: every configuration did the same" not in md
    assert (
        "flags none, head, max_model_len 1024, KV 8 MiB: old (vLLM 0.27.0) failed: cuda_oom; new (vLLM 0.32.0) starts"
        in md
    )
    answer = out.stdout[out.stdout.index("Verdict (") :]
    assert "Nothing started for install, flags old (vLLM 0.27.0), none (1 trial(s))" in answer
    assert answer.index("Works") < answer.index("Reports in")
