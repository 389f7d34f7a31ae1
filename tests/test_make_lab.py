"""Issue 22 point 24: `make lab` prints a JupyterLab URL a person can open, with the real token (JupyterLab
itself prints a token it was given masked, `?token=...`)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
URL = re.compile(r"JupyterLab: open (http://127\.0\.0\.1:(\d+)/lab/tree/notebooks\?token=([0-9a-zA-Z]+))")


@pytest.mark.unit
def test_the_printed_token_is_the_one_jupyter_gets(tmp_path):
    stub = tmp_path / "jupyter"
    stub.write_text('#!/bin/sh\necho "STUB $*"\n')
    stub.chmod(0o755)
    out = subprocess.run(["make", "-s", "-o", "setup", "lab", f"BIN={tmp_path}"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    m = URL.search(out)
    assert m, out
    _, port, token = m.groups()
    assert len(token) >= 32 and "..." not in out.splitlines()[0]
    assert f"--IdentityProvider.token={token} " in out and f"--ServerApp.port={port} " in out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):  # not listening yet
        return 0


@pytest.mark.notebook
def test_the_printed_url_opens_jupyterlab(tmp_path):
    port = free_port()
    proc = subprocess.Popen(["make", "-s", "-o", "setup", "lab", f"LAB_PORT={port}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        m = URL.search(proc.stdout.readline())
        assert m and m.group(2) == str(port)
        url, _, token = m.groups()
        deadline = time.monotonic() + 120
        while (
            time.monotonic() < deadline and status(f"http://127.0.0.1:{port}/api/status?token={token}") != 200
        ):
            assert proc.poll() is None, "make lab ended before JupyterLab served"
            time.sleep(0.5)
        assert status(url) == 200  # the page itself, logged in by the printed token
        assert status(f"http://127.0.0.1:{port}/api/status") == 403  # and nothing without it
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
