"""Keep secrets out of every copy we write: recorded argv and env, log copies, notebooks, reports."""

from __future__ import annotations

import re

MASK = "***REDACTED***"

# Environment names whose values are always secret.
SECRET_ENV_NAMES = re.compile(
    r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|APIKEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I
)
# Flags whose next argv item (or =value) is secret.
SECRET_FLAGS = ("--api-key", "--hf-token", "--token", "--ssl-keyfile-password")
# vLLM's --api-key takes several keys (list[str], nargs="+"): every item up to the next flag is secret.
MULTI_VALUE_SECRET_FLAGS = ("--api-key",)

_PATTERNS = [
    # NAME=value for secret-looking names (env dumps, shell lines, logs)
    (
        re.compile(
            r"\b([A-Z0-9_]*(?:TOKEN|SECRET|PASSWORD|API_KEY|APIKEY|ACCESS_KEY)[A-Z0-9_]*)(\s*[=:]\s*)(['\"]?)([^\s'\",}]+)",
            re.I,
        ),
        lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}{MASK}",
    ),
    # vLLM < 0.32 logs its non-default args as a dict: 'api_key': ['x', 'y'], 'hf_token': 'x'
    (
        re.compile(r"(['\"]api_key['\"]\s*:\s*\[)([^\]]*)"),
        lambda m: m.group(1) + re.sub(r"(['\"])[^'\"]*(['\"])", rf"\g<1>{MASK}\g<2>", m.group(2)),
    ),
    (
        re.compile(r"(['\"](?:api_key|hf_token)['\"]\s*:\s*)(['\"])([^'\"]+)"),
        lambda m: f"{m.group(1)}{m.group(2)}{MASK}",
    ),
    # --api-key a b (shell line or an argv list's repr: '--api-key', 'a', 'b'): every key up to the next flag
    (
        re.compile(
            r"(--api-key(?:['\"]?,?[ \t]+))"
            r"((?:['\"]?[^\s'\"\-,\]|;&)}][^\s'\",\]|;&)}]*['\"]?(?:,?[ \t]+|,?(?=[\n\]|;&)}]|$)))+)"
        ),
        lambda m: m.group(1) + re.sub(r"[^\s'\",\]|;&)}]+", MASK, m.group(2)),
    ),
    # --api-key value / --api-key=value (also an argv list's repr: '--api-key', 'x')
    (
        re.compile(
            r"(--(?:api-key|hf-token|token|ssl-keyfile-password))(['\"]?,?\s+|=)(['\"]?)([^\s'\"|;&)}]+)"
        ),
        lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}{MASK}",
    ),
    # Authorization: Bearer xxx
    (re.compile(r"(Bearer\s+)([A-Za-z0-9._~+/=-]{8,})", re.I), lambda m: f"{m.group(1)}{MASK}"),
    # Common token shapes
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"), lambda m: MASK),  # Hugging Face
    (re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}\b"), lambda m: MASK),  # OpenAI-style
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"), lambda m: MASK),  # GitHub
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), lambda m: MASK),  # AWS access key id
    (re.compile(r"\bxox[baprs]-[A-Za-z0-9-]{10,}\b"), lambda m: MASK),  # Slack
]


def redact_text(text: str) -> str:
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_argv(argv: list[str]) -> list[str]:
    out: list[str] = []
    hide_next = hide_rest = False
    for item in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        if hide_rest and not item.startswith("-"):
            out.append(MASK)
            continue
        hide_rest = False
        flag = item.split("=", 1)[0]
        if flag in SECRET_FLAGS:
            if "=" in item:
                out.append(f"{flag}={MASK}")
            else:
                out.append(item)
                hide_next = True
                hide_rest = flag in MULTI_VALUE_SECRET_FLAGS
            continue
        out.append(redact_text(item))
    return out


def redact_env(env: dict[str, str]) -> dict[str, str]:
    return {k: (MASK if SECRET_ENV_NAMES.search(k) else redact_text(str(v))) for k, v in env.items()}


def redact_obj(obj):
    """Redact every string inside a JSON-like value (records, glued scraps)."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {
            k: (
                MASK
                if isinstance(k, str) and SECRET_ENV_NAMES.search(k) and isinstance(v, str)
                else redact_obj(v)
            )
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        if obj and all(isinstance(x, str) for x in obj):
            return redact_argv(list(obj))
        return [redact_obj(x) for x in obj]
    return obj
