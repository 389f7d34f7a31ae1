"""Put a trial's model into Ollama's store after `ollama serve` is ready, through Ollama's own API (so a
container's server works as well as a local one), before ollama_check loads it:

- a .gguf file: `HEAD /api/blobs/sha256:<digest>` (the upload is skipped when the store has the blob), else
  `POST /api/blobs/sha256:<digest>` with the file, then `POST /api/create {"model", "files": {name: digest}}`
  (Ollama 0.5.5+; before it /api/create took Modelfile text, which current Ollama no longer reads);
- a name the store lacks, only where the trial asks for it (Trial.pull): `POST /api/pull`.
Both stream Ollama's ProgressResponse lines ({status, digest, total, completed}, or {"error"}); their
progress is printed (one line per status and per tenth of a download), so a papermill run shows it.

Apart from ollama_check (the load and what /api/ps says) as its own concern; httpx only here and there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from vllm_lab.engines import ollama_gguf
from vllm_lab.http_client import body_message

if TYPE_CHECKING:
    from vllm_lab.spec import Trial

STORE_READ_TIMEOUT_S = 600.0  # a pull or a create may go quiet for a while (a slow registry, a large GGUF)
GIB = 2**30


def prepare(trial: Trial, base_url: str, name: str, timeout: float) -> dict:
    """Record fields: `ollama_store` (what was done), and the verdict (`outcome`, `failure`, `evidence`,
    `remedy`) where it failed. {} where the model is a name and no pull was asked for."""
    if ollama_gguf.is_file_model(trial.model):
        return _Store(base_url, name, timeout).create(Path(trial.model).expanduser())
    if trial.pull:
        return _Store(base_url, name, timeout).pull()
    return {}


class _Store:
    def __init__(self, url: str, name: str, timeout: float) -> None:
        self.url, self.name, self.timeout = url, name, timeout
        self.pulled_bytes = 0

    def _client(self) -> httpx.Client:
        t = httpx.Timeout(self.timeout, read=max(self.timeout, STORE_READ_TIMEOUT_S))
        return httpx.Client(timeout=t, trust_env=False)  # our loopback server: never a proxy

    def create(self, path: Path) -> dict:
        t0 = time.monotonic()
        digest = ollama_gguf.file_digest(path)
        label = f"ollama create {self.name}"
        uploaded = False
        error = None
        try:
            with self._client() as c:
                blob = f"{self.url}/api/blobs/{digest}"
                if c.head(blob).status_code != 200:
                    print(f"{label}: uploading {path.name} ({path.stat().st_size / GIB:.2f} GiB)", flush=True)
                    with open(path, "rb") as f:
                        r = c.post(blob, content=f)  # Content-Length from the file
                    if r.status_code not in (200, 201):
                        error = (
                            f"uploading it (POST /api/blobs/{digest}): HTTP {r.status_code}: {_message(r)}"
                        )
                    uploaded = True
                if error is None:
                    body = {"model": self.name, "files": {path.name: digest}, "stream": True}
                    error = self._stream(c, "/api/create", body, label)
        except (httpx.HTTPError, OSError) as e:
            error = f"broke off: {type(e).__name__}: {e}"
        out: dict = {"ollama_store": {"action": "created" if not error else "create failed", "model": self.name,
                                      "digest": digest, "blob_uploaded": uploaded,
                                      "seconds": round(time.monotonic() - t0, 2)}}  # fmt: skip
        if error:
            out.update(outcome="failed", failure="bad_model_file",
                       evidence=f"creating {self.name} from {path.name} (POST /api/create): {error}",
                       remedy="Ollama could not make a model of this file: check it is a complete GGUF of an "
                              "architecture this Ollama supports, and the store's free disk (read the log)")  # fmt: skip
        return out

    def pull(self) -> dict:
        t0 = time.monotonic()
        if self._listed():
            return {"ollama_store": {"action": "present", "model": self.name}}  # nothing to pull
        try:
            with self._client() as c:
                error = self._stream(
                    c, "/api/pull", {"model": self.name, "stream": True}, f"ollama pull {self.name}"
                )
        except httpx.HTTPError as e:
            error = f"broke off: {type(e).__name__}: {e}"
        out: dict = {"ollama_store": {"action": "pulled" if not error else "pull failed", "model": self.name,
                                      "bytes": self.pulled_bytes or None,
                                      "seconds": round(time.monotonic() - t0, 2)}}  # fmt: skip
        if error:
            missing = (
                "does not exist" in error or "not found" in error
            )  # images.go: "pull model manifest: ..."
            out.update(outcome="failed", failure="model_not_found" if missing else "other",
                       evidence=f"pulling {self.name} (POST /api/pull): {error}",
                       remedy="check the name and tag on ollama.com/library (e.g. qwen3:8b-q4_K_M)" if missing else
                              "the pull failed: check that this machine reaches the registry and that the store has "
                              f"free disk, or run `ollama pull {self.name}` by hand")  # fmt: skip
        return out

    def _listed(self) -> bool:
        """The store lists the model (GET /api/tags names carry a tag: `latest` where none was given)."""
        want = ollama_gguf.full_name(self.name)
        try:
            with httpx.Client(timeout=self.timeout, trust_env=False) as c:
                models = c.get(f"{self.url}/api/tags").json().get("models") or []
        except (httpx.HTTPError, ValueError, AttributeError):
            return False  # the pull then says what is wrong
        return any(str(m.get("name", "")).lower() == want.lower() for m in models if isinstance(m, dict))

    def _stream(self, c: httpx.Client, path: str, body: dict, label: str) -> str | None:
        """A streamed store call: its progress printed; the error (HTTP, or an {"error"} line), None on
        "success". An error before any progress comes as HTTP 500 with {"error"} (routes.go streamResponse)."""
        shown: dict[str, int] = {}  # status -> the last tenth printed
        totals: dict[str, int] = {}
        success = False
        with c.stream("POST", f"{self.url}{path}", json=body) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}: {_message(r, read=True)}"
            for line in r.iter_lines():
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    return f"sent a line that is not JSON: {line[:200]}"
                if not isinstance(msg, dict):
                    continue
                if msg.get("error"):
                    print(f"{label}: error: {msg['error']}", flush=True)
                    return str(msg["error"])
                status, total, done = (
                    str(msg.get("status") or ""),
                    msg.get("total"),
                    msg.get("completed") or 0,
                )
                if isinstance(total, int) and total > 0:  # a download: "pulling <digest 12>"
                    totals[status] = total
                    tenth = min(10, int(10 * done / total))
                    if shown.get(status, -1) < tenth:
                        shown[status] = tenth
                        print(f"{label}: {status} {100 * done // total}% ({done / GIB:.2f} of "
                              f"{total / GIB:.2f} GiB)", flush=True)  # fmt: skip
                elif status and status not in shown:
                    shown[status] = 10
                    print(f"{label}: {status}", flush=True)
                success = success or status == "success"
        self.pulled_bytes = sum(totals.values())
        return None if success else 'the stream ended without "success"'


def _message(r: httpx.Response, read: bool = False) -> str:
    return body_message(r.read() if read else r.content)[:300]
