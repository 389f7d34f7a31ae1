"""Benchmark: does `vllm-lab load` against llama.cpp's server agree with what the server itself timed?

    .venv/bin/python benchmarks/bench_llamacpp_load.py [--requests 16] [--output-tokens 512] [--out FILE]

The real llama-server (the xllamacpp wheel in .venv-llamacpp, `make llamacpp`) on the tiny GGUF
(`make tiny-model`), launched through vllm-lab's own launcher (engine llamacpp). For each concurrency, one
level of run_load; around it, the server's /metrics counters `llamacpp:tokens_predicted_total`,
`prompt_seconds_total` and `tokens_predicted_seconds_total`, which llama.cpp adds up from each finished
response's own `timings` (prompt_ms, predicted_ms): the sum of the server's per-response timings. At
concurrency 1 the server is busy exactly for those seconds, so its own rate is
tokens / (prompt seconds + generation seconds); the load's output tok/s (tokens received / the level's wall
time) should be within 10% of it, the difference being what the client and HTTP cost per request. Above 1
the responses overlap and the server-side sum over-counts busy time: shown, not judged.

The tiny model decodes in about 0.1 ms a token, so short outputs measure HTTP, not the server: the default
is 512 output tokens a request. Prints a markdown table; --out writes it too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from vllm_lab.launcher import VllmServer  # noqa: E402
from vllm_lab.load import run_load  # noqa: E402
from vllm_lab.load_spec import LoadSpec  # noqa: E402
from vllm_lab.memory_gguf import read_gguf  # noqa: E402
from vllm_lab.spec import Trial  # noqa: E402

SERVER = ROOT / ".venv-llamacpp" / "bin" / "llama-server"
MODEL = ROOT / ".cache" / "models" / "tiny-qwen2.gguf"
COUNTERS = ("llamacpp:tokens_predicted_total", "llamacpp:prompt_seconds_total",
            "llamacpp:tokens_predicted_seconds_total")  # fmt: skip


def counters(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=10, trust_env=False).text
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in COUNTERS:
            out[name] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=512)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not SERVER.is_file() or not MODEL.is_file():
        print("needs `make llamacpp tiny-model` first", file=sys.stderr)
        return 2
    trial = Trial(model=str(MODEL), engine="llamacpp", vllm_cmd=str(SERVER), max_model_len=args.context,
                  startup_timeout_s=60, step="bench")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp, VllmServer(trial, tmp) as srv:
        res = srv.start()
        if res.outcome != "ready":
            print(f"llama-server did not start: {res.failure}: {res.evidence}", file=sys.stderr)
            return 1
        for conc in (int(c) for c in args.concurrency.split(",")):
            spec = LoadSpec(concurrency=(conc,), requests=max(args.requests, conc),
                            prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens)  # fmt: skip
            before = counters(res.base_url)
            out = run_load(res.base_url, str(MODEL), spec, vocab_size=read_gguf(MODEL).n_vocab)
            after = counters(res.base_url)
            d = {k: after[k] - before[k] for k in COUNTERS}
            busy = d["llamacpp:prompt_seconds_total"] + d["llamacpp:tokens_predicted_seconds_total"]
            server_tps = d["llamacpp:tokens_predicted_total"] / busy if busy else None
            level = out.levels[0]
            load_tps = level.get("output_tokens_per_s")
            ratio = load_tps / server_tps if load_tps and server_tps else None
            rows.append((conc, level.get("completed"), load_tps, server_tps, ratio, out.stable))
    lines = [
        f"llama-server (xllamacpp, {MODEL.name}), {args.prompt_tokens} prompt + {args.output_tokens} output "
        f"tokens, {args.requests} requests a level",
        "",
        "| concurrency | completed | load output tok/s | server's own (timings) tok/s | ratio | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for conc, done, load_tps, server_tps, ratio, stable in rows:
        if conc == 1 and ratio is not None:
            verdict = "within 10%" if abs(ratio - 1) <= 0.10 else "NOT within 10%"
        else:
            verdict = "overlapping responses: not judged"
        lines.append(f"| {conc} | {done} | {load_tps:.1f} | {server_tps:.1f} | {ratio:.3f} | {verdict}"
                     f"{'' if stable else ' (load not stable)'} |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
