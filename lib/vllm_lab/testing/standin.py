"""A stand-in server that is not vLLM: what a user may point vllm_cmd at by mistake, or a wrapper that
logs differently. It speaks just enough of the API (/health, /v1/models) to become ready.

Run as `python -m vllm_lab.testing.standin [serve MODEL | --model MODEL] --port N ...` or as a script path.
It prints CUDA words a log reader could take for vLLM on a GPU, and never prints "FAKE vLLM".

Environment knobs:
    STANDIN_ENV_DUMP     write this process's environment as JSON to that path (what the launcher passed)
    STANDIN_NO_UVICORN   =1: never print uvicorn's "Application startup complete." (readiness via /health)
    STANDIN_SIGKILL      =1: SIGKILL itself before ready, with nothing in the log (as the OOM killer does)
    STANDIN_EXIT         exit with this code before ready, with nothing in the log
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "serve":
        args = ["--model", *args[1:2], *args[2:]]
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int, default=2048)
    a, _ = p.parse_known_args(args)
    env = os.environ
    if env.get("STANDIN_ENV_DUMP"):
        with open(env["STANDIN_ENV_DUMP"], "w") as f:
            json.dump(dict(env), f)
    print("INFO 01-01 00:00:00 [__init__.py:1] Automatically detected platform cuda.", flush=True)
    print("INFO 01-01 00:00:00 [gpu_worker.py:1] CUDA graphs captured; # GPU blocks: 1391", flush=True)
    time.sleep(0.2)
    if env.get("STANDIN_SIGKILL") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    if env.get("STANDIN_EXIT"):
        sys.exit(int(env["STANDIN_EXIT"]))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def do_GET(self):
            body = b"{}"
            if self.path == "/v1/models":
                body = json.dumps({"data": [{"id": a.model, "max_model_len": a.max_model_len}]}).encode()
            elif self.path != "/health":
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((a.host, a.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if env.get("STANDIN_NO_UVICORN") != "1":
        print("INFO:     Application startup complete.", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
