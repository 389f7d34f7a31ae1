"""Issue 16: a WARNING line that mentions OOM must never end a start.

The launcher's fail-fast kills a server on the first line `logscan.classify_line` calls fatal, so a
warning classified as fatal kills a server that would have started. Warnings come in several shapes:
Python's default logging format (`WARNING:root:...`), torch's C++ warnings (`[W1128 ...] Warning: ...`,
often behind a `[rank0]:` prefix), the `warnings` module (`file.py:12: UserWarning: ...`) and vLLM's own
`WARNING mm-dd hh:mm:ss` header.
"""

from __future__ import annotations

import pytest
from conftest import FAKE_CMD, fake_env
from vllm_lab.engines.vllm_log import READY_MARKER, classify_line, scan_log
from vllm_lab.launcher import VllmServer
from vllm_lab.spec import Trial

OOM_WARNINGS = [
    "WARNING:root:CUDA out of memory while probing a warm-up batch size; retrying smaller",
    "WARNING:vllm.worker:torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "[W1128 23:10:01.123456789 CUDACachingAllocator.cpp:1] Warning: CUDA out of memory in a cuDNN benchmark"
    " trial; falling back to a slower algorithm (function operator())",
    "[rank0]:[W1128 23:10:01.123456789 CUDACachingAllocator.cpp:1] Warning: CUDA error: out of memory during"
    " an optional warm-up (function operator())",
    "/usr/lib/python3.12/site-packages/foo/bar.py:88: UserWarning: CUDA out of memory while autotuning;"
    " skipping this config",
    "(EngineCore_DP0 pid=7) WARNING 11-28 23:10:01 [gpu_worker.py:1] CUDA out of memory occurred when warming"
    " up sampler with 256 dummy requests; retrying with fewer",
    "2025-11-28 23:10:01,123 - WARNING - CUDA out of memory. Tried to allocate 20.00 MiB (retrying)",
]


@pytest.mark.unit
@pytest.mark.parametrize("line", OOM_WARNINGS)
def test_oom_warning_is_not_fatal(line):
    assert classify_line(line) is None
    scan = scan_log(f"{line}\nINFO:     {READY_MARKER}")
    assert (scan.failure, scan.ready) == (None, True)


@pytest.mark.unit
def test_torch_socket_warning_is_not_a_port_failure():
    # torch's c10d store retries on its own; vLLM's API port failure is the OSError, not this warning
    line = (
        "[W socket.cpp:464] [c10d] The server socket has failed to bind to [::]:29500 (errno: 98 - Address"
        " already in use)."
    )
    assert classify_line(line) is None
    assert classify_line("OSError: [Errno 98] Address already in use") == "port_in_use"


@pytest.mark.unit
@pytest.mark.parametrize(
    "line",
    [
        "ERROR:root:CUDA out of memory. Tried to allocate 2.00 GiB",
        "[E1128 23:10:01.123456789 ProcessGroupNCCL.cpp:1] CUDA error: out of memory",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 80.00 MiB.",
    ],
)
def test_fatal_oom_lines_stay_fatal(line):
    assert classify_line(line) == "cuda_oom"


@pytest.mark.fake
def test_server_with_oom_warnings_becomes_ready(fake_model, run_dir):
    t = Trial(
        model=str(fake_model),
        vllm_cmd=FAKE_CMD,
        max_model_len=1024,
        kv_cache_memory_bytes=8 * 2**20,
        startup_timeout_s=30,
        env=fake_env(scenario="oom_warnings"),
    )
    with VllmServer(t, run_dir) as s:
        res = s.start()
        assert res.outcome == "ready", res
        assert res.failure is None
    log = s.log_path.read_text()
    assert "WARNING:root:CUDA out of memory" in log  # the warnings really were printed
