"""A hub model is downloaded once, before the first trial, in the vLLM command's python (issue 16)."""

from __future__ import annotations

import io
import sys
import textwrap

import pytest
import yaml
from conftest import FAKE_CMD
from vllm_lab import hub
from vllm_lab.spec import SpecError

pytestmark = pytest.mark.unit

HUB_ID = "Qwen/Qwen3-8B-AWQ"
PY_CMD = f"{sys.executable} -m vllm.entrypoints.openai.api_server"


@pytest.fixture
def downloads(monkeypatch):
    calls = []

    def fake(python, model, revision, env):
        calls.append((python, model, revision))
        return {"status": "ok", "path": f"/hf/models--{model.replace('/', '--')}"}

    monkeypatch.setattr(hub, "_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return calls


def test_hub_id_is_downloaded_in_the_commands_python(downloads):
    out = io.StringIO()
    note = hub.prefetch(HUB_ID, PY_CMD, {}, ["--revision", "main"], out=out)
    assert downloads == [(sys.executable, HUB_ID, "main")]
    assert "in the Hugging Face cache" in note and note in out.getvalue()
    assert "once, before the first trial" in out.getvalue()


def test_local_model_offline_container_and_unknown_python_download_nothing(downloads, fake_model, tmp_path):
    out = io.StringIO()
    assert hub.prefetch(str(fake_model), PY_CMD, out=out) is None
    assert "offline" in hub.prefetch(HUB_ID, PY_CMD, {"HF_HUB_OFFLINE": "1"}, out=out)
    assert "container" in hub.prefetch(HUB_ID, "docker run --gpus all vllm/vllm-openai", out=out)
    wrapper = tmp_path / "serve.sh"
    wrapper.write_text('#!/bin/sh\nexec vllm serve "$@"\n')
    wrapper.chmod(0o755)
    assert "cannot tell which python" in hub.prefetch(HUB_ID, str(wrapper), out=out)
    assert downloads == []
    assert len(out.getvalue().splitlines()) == 3  # one line each


def test_a_failed_download_is_one_line_with_the_fix(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(
        hub, "_download", lambda *a: {"status": "failed", "error": "RepositoryNotFoundError: 404"}
    )
    with pytest.raises(SpecError) as e:
        hub.prefetch("nobody/nothing", PY_CMD, out=io.StringIO())
    msg = str(e.value)
    assert msg.startswith("model: nobody/nothing could not be downloaded") and "HF_TOKEN" in msg
    assert "\n" not in msg


def test_the_download_code_runs_in_that_python_against_huggingface_hub(tmp_path, monkeypatch):
    """The child code, against a stand-in huggingface_hub (no network here): safetensors repos skip *.bin."""
    pkg = tmp_path / "site" / "huggingface_hub"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import json, os, sys
        class HfApi:
            def list_repo_files(self, repo, revision=None):
                return ["config.json", "model.safetensors", "pytorch_model.bin"]
        def snapshot_download(repo, revision=None, ignore_patterns=None):
            print("Fetching 3 files: 100%", file=sys.stderr)
            with open(os.environ["HUB_CALLS"], "w") as f:
                json.dump({"repo": repo, "revision": revision, "ignore": ignore_patterns}, f)
            return "/cache/models--" + repo.replace("/", "--")
    """))  # fmt: skip
    calls = tmp_path / "calls.json"
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    note = hub.prefetch(HUB_ID, PY_CMD, {"HUB_CALLS": str(calls)}, out=io.StringIO())
    assert note.endswith("(/cache/models--Qwen--Qwen3-8B-AWQ)")
    import json

    got = json.loads(calls.read_text())
    assert got["repo"] == HUB_ID and got["revision"] is None and "*.bin" in got["ignore"]
    (pkg / "__init__.py").write_text("raise ImportError('no hub')\n")
    assert "has no huggingface_hub" in hub.prefetch(HUB_ID, PY_CMD, out=io.StringIO())


# --- the entry points download once, before any trial --------------------------------------------------------


class Reached(Exception):
    """Raised by a stand-in for the first trial: everything before it has run."""


def test_search_and_launch_prefetch_once_before_any_trial(downloads, monkeypatch, tmp_path):
    from vllm_lab import cli, probe, search

    order = []
    monkeypatch.setattr(
        hub, "_download", lambda *a: order.append("download") or {"status": "ok", "path": "/x"}
    )

    def first_trial(*a, **k):
        order.append("trial")
        raise Reached

    monkeypatch.setattr(search, "run_search", first_trial)
    monkeypatch.setattr(probe, "run_trial", first_trial)
    cmd = f"{sys.executable} -m vllm_lab.testing.fake_vllm"
    with pytest.raises(Reached):
        cli.main(["search", "--model", HUB_ID, "--vllm-cmd", cmd, "--kv-cache-memory-bytes", "8388608",
                  "--out", str(tmp_path / "s")])  # fmt: skip
    with pytest.raises(Reached):
        cli.main(["launch", "--model", HUB_ID, "--vllm-cmd", cmd, "--out", str(tmp_path / "l")])
    assert order == ["download", "trial", "download", "trial"]


def test_a_plan_prefetches_each_model_once_before_its_notebooks(monkeypatch, tmp_path):
    from vllm_lab import batch

    order = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("VLLM_LAB_LOCK_DIR", str(tmp_path))
    monkeypatch.setattr(
        hub, "_download", lambda py, m, *a: order.append(("download", m)) or {"status": "ok", "path": "/x"}
    )
    monkeypatch.setattr(batch, "execute", lambda nb, out, params, t: order.append(("notebook", nb)))
    monkeypatch.setattr(batch, "build_report", lambda *a: {})
    plan = {"name": "hub", "model": HUB_ID, "vllm_cmd": FAKE_CMD, "steps": [
        {"name": "a", "notebook": "01_restore_launcher", "parameters": {"MAX_MODEL_LEN": 1024}},
        {"name": "b", "notebook": "02_context_budget", "parameters": {"MAX_MODEL_LEN": 2048}}]}  # fmt: skip
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    batch.run_plan(str(path), out=str(tmp_path / "out"))
    assert order == [
        ("download", HUB_ID),
        ("notebook", "01_restore_launcher"),
        ("notebook", "02_context_budget"),
    ]
