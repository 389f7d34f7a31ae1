"""Issue 22 point 22: `vllm-lab --help` says what the tool does and lists the subcommands in the order a user
meets them."""

from __future__ import annotations

import re

import pytest
from vllm_lab.cli import build_parser

pytestmark = pytest.mark.unit

MET = ["preflight", "run", "report", "launch", "search", "load", "bisect-versions", "predict", "installs",
       "scan-log", "gpus", "reap", "tiny-model"]  # fmt: skip


def test_help_says_what_the_tool_does():
    text = build_parser().format_help()
    assert "Argument parsing only" not in text
    intro = text.split("\n\n")[1]
    assert "vLLM" in intro and "start" in intro and "report" in intro


def test_subcommands_in_the_order_a_user_meets_them():
    text = build_parser().format_help()
    listed = re.findall(r"^    ([a-z-]+)\s", text, re.M)
    assert listed == MET
    assert "{" not in text.splitlines()[0]  # usage: COMMAND, not a 13-name brace list
