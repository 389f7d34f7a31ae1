#!/usr/bin/env python3
"""Score `vllm-lab scan-log` against the hand-written answers for the real-log fixtures (issue 10).

    .venv/bin/python scripts/score-logs.py [heldout|dev|all] [-v]
    .venv/bin/python scripts/score-logs.py --engine llamacpp [heldout|heldout2|dev|all] [-v]

kind accuracy:   logs whose failure kind (None = no failure) is the expected one
facts (per log): logs whose five key facts are all right (a fact the log does not state must be None)
facts (stated):  stated facts that the scanner got right
The answers live in tests/test_logscan.py (DEV_EXPECT, HELDOUT_EXPECT); the split rule is in
tests/fixtures/logs/heldout/README.md. With --engine llamacpp: the llama.cpp / Ollama logs, their answers in
tests/fixtures/logs/llamacpp/expect.py, all eleven facts (tests/fixtures/logs/llamacpp/README.md).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))

from vllm_lab.engines.vllm_log import scan_file  # noqa: E402

LLAMACPP = ROOT / "tests" / "fixtures" / "logs" / "llamacpp"


def _llamacpp_tables():
    spec = importlib.util.spec_from_file_location("_llamacpp_expect", LLAMACPP / "expect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.DEV, module.HELDOUT, module.HELDOUT2 = (
        LLAMACPP / "dev",
        LLAMACPP / "heldout",
        LLAMACPP / "heldout2",
    )
    return module


def _scan_llamacpp(path: Path):
    """The llama.cpp scanner on a fixture without its `# source:` / `# excerpt:` header (the header names the
    issue's repository, which would tell the engine for free)."""
    from vllm_lab.engines.llamacpp_log import scan_log

    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    while lines and lines[0].startswith("# "):
        lines.pop(0)
    return scan_log("\n".join(lines))


def _tables():
    spec = importlib.util.spec_from_file_location("_logscan_tables", ROOT / "tests" / "test_logscan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def score(
    folder: Path, expect: dict, keys: tuple[str, ...], verbose: bool, scan=scan_file
) -> tuple[int, int, int, int, int]:
    kind_ok = facts_ok = stated = stated_ok = 0
    for name, (kind, facts) in sorted(expect.items()):
        got = scan(folder / name).to_json()
        wrong = [k for k in keys if got[k] != facts[k]]
        kind_ok += got["failure"] == kind
        facts_ok += not wrong
        stated += sum(v is not None for v in facts.values())
        stated_ok += sum(facts[k] is not None and got[k] == facts[k] for k in keys)
        if verbose and (got["failure"] != kind or wrong):
            diff = ", ".join(f"{k}={got[k]!r} (want {facts[k]!r})" for k in wrong)
            print(f"  MISS {folder.name}/{name}: kind={got['failure']!r} (want {kind!r}) {diff}")
    return len(expect), kind_ok, facts_ok, stated, stated_ok


def main(argv: list[str]) -> int:
    engine = "vllm"
    if "--engine" in argv:
        i = argv.index("--engine")
        engine = argv[i + 1] if i + 1 < len(argv) else ""
        argv = argv[:i] + argv[i + 2 :]
    if engine not in ("vllm", "llamacpp"):
        print(f"score-logs: unknown engine {engine!r}: use vllm or llamacpp", file=sys.stderr)
        return 2
    which = next((a for a in argv if not a.startswith("-")), "all")
    verbose = "-v" in argv
    scan = scan_file
    if engine == "llamacpp":
        scan = _scan_llamacpp
        t = _llamacpp_tables()
    else:
        t = _tables()
    sets = {"heldout": [(t.HELDOUT, t.HELDOUT_EXPECT)], "dev": [(t.DEV, t.DEV_EXPECT)]}
    if engine == "llamacpp":
        sets["heldout2"] = [(t.HELDOUT2, t.HELDOUT2_EXPECT)]
        sets["all"] = sets["dev"] + sets["heldout"] + sets["heldout2"]
    else:
        sets["all"] = sets["dev"] + sets["heldout"]
    if which not in sets:
        print(f"score-logs: unknown set {which!r}: use {', '.join(sets)}", file=sys.stderr)
        return 2
    total = [0, 0, 0, 0, 0]
    for folder, expect in sets[which]:
        for i, v in enumerate(score(folder, expect, t.KEY_FACTS, verbose, scan)):
            total[i] += v
    n, kind_ok, facts_ok, stated, stated_ok = total
    print(
        f"{engine + ' ' if engine != 'vllm' else ''}{which}: {n} logs; kind {kind_ok}/{n} = {kind_ok / n:.1%}; facts per log {facts_ok}/{n} ="
        f" {facts_ok / n:.1%}; stated facts {stated_ok}/{stated} = {stated_ok / max(stated, 1):.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
