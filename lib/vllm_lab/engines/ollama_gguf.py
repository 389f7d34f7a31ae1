"""Ollama's model names and a .gguf as an Ollama model: a name as Ollama lists it, which paths are files
rather than store names, the blob digest, and the name the model is created under. Pure (no HTTP): ollama.py
validates with it, ollama_store creates with it, ollama_check finds the loaded model by it.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

from vllm_lab.errors import SpecError

GGUF_MAGIC = b"GGUF"


def full_name(name: str) -> str:
    """The name as Ollama lists it (/api/ps, /api/tags): with its tag, `:latest` where none was given."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def is_file_model(model: str) -> bool:
    """A GGUF file (a path) rather than a name in Ollama's store (qwen3:8b-q4_K_M, user/model:tag)."""
    return model.endswith(".gguf") or model.startswith(("/", ".", "~")) or Path(model).expanduser().is_file()


def file_digest(path: str | Path) -> str:
    """`sha256:<hex>` of the file's bytes: the blob's name in the store (hashed once per file version)."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return _digest(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def created_name(path: str | Path) -> str:
    """The store name a .gguf is created as: vllm-lab-<stem>:<12 hex of its digest>, so a file always gets
    the same name and two different files never share one."""
    stem = re.sub(r"[^a-z0-9_.-]+", "-", Path(path).stem.lower()).strip("-._") or "model"
    return f"vllm-lab-{stem[:60]}:{file_digest(path).removeprefix('sha256:')[:12]}"


def check_file(model: str) -> None:
    """Before any launch: the file exists and starts with the GGUF magic; SpecError, one line."""
    path = Path(model).expanduser()
    if not path.is_file():
        raise SpecError(f"model: {model} is not a file; give a .gguf file or a name in the Ollama store "
                        "(e.g. qwen3:8b-q4_K_M)")  # fmt: skip
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise SpecError(f"model: {model} cannot be read ({e.strerror or e})") from None
    if magic != GGUF_MAGIC:
        raise SpecError(f"model: {model} is not a GGUF file (it does not start with the bytes GGUF); Ollama "
                        "creates a model from a .gguf only")  # fmt: skip
