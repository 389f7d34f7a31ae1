"""The scanning machinery: a server log + an engine's rule table -> failure kind, root-cause evidence line,
remedy, and capacity facts. The tables live with the engines (vLLM's: engines/vllm_log.py); nothing here
knows an engine.

Works on logs (written for vLLM's, 0.6 to 0.33) as people actually have them: with process prefixes
(`(EngineCore_DP0 pid=1)`, `[rank0]:`), docker-compose prefixes (`vllm-1  | `), box borders copied out of
terminal UIs (k9s `│ ... │`), hard-wrapped terminal copies, and newlines lost so that several log records
run together on one line. Wordings are the ones in vLLM's source (see reference/vllm-facts.md, sections
1 and 2).

How it reads a log:
1. `_records()` turns the text into clean records: one per log record, prefixes and borders stripped,
   the log level kept (a WARNING never counts as a failure: vLLM's header, Python's `WARNING:root:`,
   torch's `[W1128 ...]`, the warnings module's `UserWarning:`); Ray's `[repeated Nx across cluster]` dropped.
2. `table.rules` is the table of (kind, patterns, grade): `fatal` lines are raised root causes; `certain` lines
   are INFO lines that make a failure of that kind inevitable (`# GPU blocks: 0`); `hint` lines only
   explain a crash that nothing stronger explains (so does a traceback's `raise X("known message"` line when
   the log is cut before the message). The earliest fatal/certain record is the root cause (wrappers such as
   `Engine core initialization failed` come after it and are never evidence), except that a GPU this build
   cannot run at all (`table.dominates`) outranks the dtype/quantization complaints it causes.
3. `table.facts` is the table of capacity facts, each a list of patterns in order of preference.
4. `table.remedies` holds one-line remedies per kind with the log's numbers filled in.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["F", "N", "Rule", "RuleTable", "classify_line", "clean_line", "human", "rule", "rx", "scan_file",
           "scan_log"]  # fmt: skip


# Number shapes: vLLM >= 0.8 prints token counts with thousands separators ("1,587,648").
N = r"(?:\d{1,3}(?:,\d{3})+|\d+)"
F = r"-?\d+(?:\.\d+)?"


def rx(pattern: str, flags: int = 0) -> re.Pattern[str]:
    """Compile a pattern written with plain spaces: " " matches any run of whitespace and " ?" an
    optional one, so a message broken across lines by a terminal or by pydantic's indentation matches.
    (No spaces inside [character classes]: write \\s there.)"""
    # [^\S\n]: whitespace within one record (_facts searches all records joined by newlines)
    return re.compile(pattern.replace(" ?", r"[^\S\n]*").replace(" ", r"[^\S\n]+"), flags)


# --------------------------------------------------------------------------------------------------
# Cleaning: prefixes, borders, lost newlines, hard wraps
# --------------------------------------------------------------------------------------------------

_ANSI = re.compile(
    r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|(?<![\w\]])\[(?:\d{1,3}(?:;\d{1,3})*)?m"
)
# Ray's log deduplication appends this to a line that several workers printed alike
_RAY_DEDUP = re.compile(r"[^\S\n]*\[repeated \d+x across cluster\]")


def _plain(text: str) -> str:
    """Text without ANSI colours and without Ray's dedup counters."""
    return _RAY_DEDUP.sub("", _ANSI.sub("", text))


_LEVELS = r"DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL"
_PROC = r"\((?:[A-Za-z][\w.-]*(?: rank=\d+)? )?pid=\d+(?:, ip=[\w.:]+)?\)"
_ISO_TS = r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?"
_BORDER = "│┃║|"

# Where a new log record starts inside a line whose newlines were lost. No word boundary is required
# before a marker: in a blob the previous record's last word runs straight into it ("...post1INFO 01-10").
_RECORD_START = re.compile(
    "|".join(
        (
            _PROC,
            rf"(?:{_LEVELS}) \d\d-\d\d \d\d:\d\d:\d\d",  # vLLM logger header
            rf"(?:{_LEVELS}):\s{{2,}}",  # uvicorn "INFO:     Application startup complete."
            r"\[rank\d+\]:",
            r"Traceback \(most recent call last\):",
            r"(?<=\S)\s{2,}File \"",  # a traceback frame glued to the previous record
            r"Process (?:SpawnProcess-\d+|ForkProcess-\d+|EngineCore\w*|\w*Worker\w*):",
            rf"\[?{_ISO_TS}\]?",
        )
    )
)
# "ValueError: ..." (tried only on lines that hold "Error: " or "Exception: ": it is the slow one)
_EXC_SPLIT = re.compile(r"(?<![.'\"\[_])(?:[a-z_]\w*\.)*[A-Z]\w*(?:Error|Exception)(?=: )")
# docker compose "vllm-1  | "; used only when the log does not tell its service names (_compose_marker)
_COMPOSE_ANY = re.compile(r"(?<![A-Za-z0-9])[a-z][a-z0-9_.-]*[-_]\d+ +\| ")

# Prefixes stripped from the start of a record, repeatedly (they stack: compose | timestamp | proc | level).
_PREFIXES = (
    re.compile(rf"^[{_BORDER}] ?"),
    re.compile(r"^[A-Za-z][\w]*(?:[-_][A-Za-z0-9]+)*[-_]\d+ +\| ?"),
    re.compile(
        rf"^\[?{_ISO_TS}\]?:? ?(?:\| (?P<level>{_LEVELS}) \| \w+ \| )?"
    ),  # fastchat "| ERROR | stderr |"
    re.compile(rf"^{_PROC} ?"),
    re.compile(r"^\[rank\d+\]: ?"),
    re.compile(
        rf"^(?P<level>{_LEVELS}) \d\d-\d\d \d\d:\d\d:\d\d(?:[.,]\d+)? (?:\[[^\]]*\] ?|[\w./-]+:\d+\] ?)?"
    ),
    re.compile(rf"^(?P<level>{_LEVELS}):\s+"),
    re.compile(rf"^(?P<level>{_LEVELS}):[A-Za-z_][\w.]*:"),  # Python logging's default "WARNING:root:..."
    # torch / glog C++ lines "[W1128 23:10:01.123456789 socket.cpp:663] ..." (letter = level)
    re.compile(r"^\[(?P<glog>[IWEF])(?:\d{4} \d\d:\d\d:\d\d(?:\.\d+)?)? ?[\w.-]+:\d+\] ?"),
    re.compile(rf"^(?:- )?(?P<level>{_LEVELS}) - "),  # "2026-07-25 13:42:38,525 - INFO - autotuner.py"
)


_GLOG_LEVELS = {"I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}
_PY_WARNING = re.compile(r"^(?:\S+:\d+: )?[A-Z]\w*Warning: ")


def _strip_prefixes(text: str) -> tuple[str, str | None]:
    level = None
    bordered = False
    while True:
        text = text.lstrip()
        for rx in _PREFIXES:
            m = rx.match(text)
            if m and m.end() > 0:
                if rx is _PREFIXES[0]:
                    bordered = True
                if m.groupdict().get("level"):
                    level = m.group("level")
                elif m.groupdict().get("glog"):
                    level = _GLOG_LEVELS[m.group("glog")]
                text = text[m.end() :]
                break
        else:
            break
    if bordered:
        text = re.sub(rf"\s*[{_BORDER}]\s*$", "", text)
    if level is None and _PY_WARNING.match(text):
        level = "WARNING"  # the warnings module: "file.py:12: UserWarning: ..." (shown, never raised)
    return text.strip(), level


def clean_line(line: str) -> str:
    """One log line without ANSI colours, box borders, process/rank/compose prefixes and log header."""
    return _strip_prefixes(_plain(line))[0]


def _split_records(line: str, extra: re.Pattern[str] | None = None) -> list[str]:
    compose = extra if extra is not None else _COMPOSE_ANY
    starts = {m.start() for m in _RECORD_START.finditer(line) if m.start() > 0}
    starts |= {m.start() for m in compose.finditer(line) if m.start() > 0}
    if "Error: " in line or "Exception: " in line:
        starts |= {m.start() for m in _EXC_SPLIT.finditer(line) if m.start() > 0}
    starts = sorted(starts)
    if not starts:
        return [line]
    cuts = [0, *starts, len(line)]
    return [line[a:b] for a, b in itertools.pairwise(cuts) if line[a:b].strip()]


_FRAME = re.compile(r'^\s+(?:File "|\^|~|\.\.\.<)')
_EXC_START = re.compile(r"(?:[a-z_]\w*\.)*[A-Z]\w*(?:Error|Exception)(?=: )")
_BOX_ROW = re.compile(rf"^\s*[{_BORDER}](.*)[{_BORDER}]\s*$")
_BOX_EDGE = re.compile(r"^\s*[┌└╭╰┏┗╔╚][─━═].*[┐┘╮╯┓┛╗╝]\s*$")  # top and bottom edges of a box


def _row_is_full(line: str, width: int) -> bool:
    """A row that a terminal filled to its last column (so its record goes on in the next row)."""
    box = _BOX_ROW.match(line)
    if box:
        inner = box.group(1)
        # one space of padding, plus one when the wrapped chunk itself ended in a space
        return len(inner) - len(inner.rstrip()) <= 2 and len(inner.strip()) > 0
    return len(line) == width


def _unwrap(lines: list[str]) -> list[str]:
    """Re-join rows that a terminal (or a k9s box) hard-wrapped at a fixed width."""
    widths = Counter(len(ln) for ln in lines if len(ln) >= 60)
    if not widths:
        return lines
    # the terminal width: the most common long length, seen 3+ times, and (almost) nothing longer
    width, count = max(widths.items(), key=lambda wc: (wc[1], wc[0]))
    longer = sum(c for w, c in widths.items() if w > width)
    if count < 3 or longer > max(2, len(lines) // 100):
        return lines
    out: list[str] = []
    joining = False
    for ln in lines:
        bare = ln.strip().strip(_BORDER).strip()
        starts_record = _RECORD_START.match(bare) or _EXC_START.match(bare)
        if joining and bare and not starts_record and not _FRAME.match(ln.lstrip(_BORDER)):
            prev, cur = out[-1], ln
            if _BOX_ROW.match(prev) and _BOX_ROW.match(cur):
                # box rows: glue the inner texts; the borders of both rows go
                prev = re.sub(rf"\s?[{_BORDER}]\s*$", "", prev)
                cur = re.sub(rf"^\s*[{_BORDER}] ?", "", cur)
            out[-1] = prev + cur
        else:
            out.append(ln)
        joining = _row_is_full(ln, width)
    return out


@dataclass(frozen=True)
class _Record:
    text: str
    level: str | None
    index: int


def _line_records(physical: str, extra: re.Pattern[str] | None = None) -> list[tuple[str, str | None]]:
    """(text, level) of each record in one physical line. An exception split off the same line keeps
    the level of the header before it ("ERROR ... [engine.py:454] ValueError: ...")."""
    out: list[tuple[str, str | None]] = []
    carried: str | None = None
    box = _BOX_ROW.match(physical)
    if box:
        physical = box.group(1)
    elif _BOX_EDGE.match(physical):
        return out
    for piece in _split_records(physical, extra):
        body, level = _strip_prefixes(piece)
        if level is None and _EXC_START.match(piece.lstrip()):
            level = carried
        # only a bare header ("ERROR ... [engine.py:454] ") hands its level to the exception after it
        carried = level if not body else None
        if body:
            out.append((body, level))
    return out


def _compose_marker(text: str) -> re.Pattern[str] | None:
    """The docker-compose prefixes this log starts its lines with, as exact split markers: in a blob
    "...16,384 tokensvllm-1  | " only the known name tells where the record ends."""
    names = set(re.findall(r"(?m)^\s*([a-z0-9][\w.-]*[-_]\d+) +\| ", text))
    if not names:
        return None
    return re.compile("|".join(re.escape(n) + r" +\| " for n in sorted(names, key=len, reverse=True)))


def _records(text: str) -> list[_Record]:
    text = _plain(text).replace("\r\n", "\n").replace("\r", "\n")
    extra = _compose_marker(text)
    out: list[_Record] = []
    for physical in _unwrap(text.split("\n")):
        for body, level in _line_records(physical, extra):
            out.append(_Record(body, level, len(out)))
    return out


# --------------------------------------------------------------------------------------------------
# Rules: kind, patterns, grade
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    kind: str
    patterns: tuple[re.Pattern[str], ...]
    grade: str = "fatal"  # fatal | certain | hint
    rank: int = 0  # among lines of the same kind, the lowest rank is the best evidence
    remedy: str | None = None  # key into the table's remedies when it differs from the kind
    unless: re.Pattern[str] | None = None  # a record that matches this is not the failure
    # where the message ends, searched from the end of the match ("" = right there); None: end of record.
    # Keeps evidence to the root-cause sentence(s) when newlines were lost and the next record is glued on.
    end: re.Pattern[str] | None = None


def rule(kind: str, *patterns: str, flags: int = 0, **kw) -> Rule:
    for key in ("unless", "end"):
        if isinstance(kw.get(key), str):
            kw[key] = rx(kw[key], flags)
    return Rule(kind, tuple(rx(p, flags) for p in patterns), **kw)


@dataclass(frozen=True)
class RuleTable:
    """One engine's knowledge of its log; the machinery here applies it."""

    kinds: tuple[str, ...]  # the failure kinds, "other" among them
    rules: tuple[Rule, ...]
    wrappers: re.Pattern[str]  # lines that say the engine died but not why: never evidence
    engine_death: re.Pattern[str]  # after the ready line a crash counts only when one of these says so
    ready_marker: str  # the line that says the server listens
    facts: Mapping[str, tuple[re.Pattern[str], ...]]  # fact -> patterns in order of preference
    result: Callable[..., Any]  # result(**facts, ready=bool): has failure/evidence/remedy and to_json()
    remedies: Mapping[str, tuple[str, ...]]  # kind (or kind/variant) -> templates, "other" among them
    int_facts: frozenset[str] = frozenset()
    float_facts: frozenset[str] = frozenset()
    counts_zero: frozenset[str] = frozenset()  # int facts whose 0 is a value (else 0 / -1 means unknown)
    context: Mapping[str, tuple[re.Pattern[str], ...]] = field(default_factory=dict)  # remedy-only settings
    derive: Callable[[dict[str, object]], None] | None = None  # derived remedy fields, in place
    dominates: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # kind -> kinds it outranks


_EXCEPTION_LINE = re.compile(r"^(?:[a-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Failure)\b(?::|$)|^Value error, ")
_BENIGN_EXCEPTION = re.compile(
    r"^(?:[\w.]*\.)?(?:KeyboardInterrupt|CancelledError|SystemExit|GeneratorExit)\b"
)
_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):")
_NOT_FAILING_LEVELS = {"DEBUG", "INFO", "WARNING", "WARN"}
# Source lines that tracebacks print ("raise ValueError(\"No available memory ...\"") are not the message.
_CODE = re.compile(r"""^(?:raise\b|return\b|f?["']|\.\.\.<|[\w.]+ = |\)|File ")|\braise \w+\(""")
_FRAME_TEXT = re.compile(r'^(?:File "|[\^~]+$|\.\.\.<)')


@dataclass(frozen=True)
class _Hit:
    rule: Rule
    record: _Record
    match: re.Match[str]
    wrapper: bool  # the line is one of the table's wrappers (worse evidence than the cause itself)


def _match(record: _Record, grades: Iterable[str], table: RuleTable) -> _Hit | None:
    grades = tuple(grades)
    if _CODE.search(record.text):
        return None
    for rule in table.rules:
        if rule.grade not in grades:
            continue
        # a raised cause is never logged at INFO/WARNING; "certain" lines are INFO and hints warnings by nature
        if rule.grade == "fatal" and record.level in _NOT_FAILING_LEVELS:
            continue
        if rule.unless is not None and rule.unless.search(record.text):
            continue
        for rx in rule.patterns:
            m = rx.search(record.text)
            if m:
                return _Hit(rule, record, m, bool(table.wrappers.search(record.text)))
    return None


# A traceback's `raise ValueError("No available memory ...` line: when the log is cut before the message
# itself, the raised text still names the cause (as a hint: only when nothing stronger does).
_RAISE_LITERAL = re.compile(r"""\braise [\w.]+\(\s*f?(["'])(?P<msg>.+?)\1""")


def _hint(record: _Record, table: RuleTable) -> _Hit | None:
    hit = _match(record, ("hint",), table)
    if hit is not None:
        return hit
    raised = _RAISE_LITERAL.search(record.text)
    if raised is None:
        return None
    literal = _Record(raised.group("msg"), None, record.index)
    hit = _match(literal, ("fatal",), table)
    return (
        _Hit(Rule(hit.rule.kind, hit.rule.patterns, "hint", remedy=hit.rule.remedy), literal, hit.match,
             hit.wrapper)
        if hit
        else None
    )  # fmt: skip


def classify_line(line: str, table: RuleTable) -> str | None:
    """The failure kind when this ONE line is a fatal root-cause line (or an INFO line that makes the
    failure certain, such as `# GPU blocks: 0`), else None. Warnings and wrappers give None."""
    for body, level in _line_records(_plain(line)):
        hit = _match(_Record(body, level, 0), ("fatal", "certain"), table)
        if hit is not None:
            return hit.rule.kind
    return None


# --------------------------------------------------------------------------------------------------
# Evidence: the cleaned sentence(s) of the root cause
# --------------------------------------------------------------------------------------------------

_PYDANTIC_TAIL = re.compile(
    r"\s*\[type=\w+,.*$|\s*For further information visit https://errors\.pydantic\.dev\S*"
)
_EXC_HEAD = re.compile(r"(?:[a-z_]\w*\.)*[A-Z]\w*(?:Error|Exception)\b: ")
_EVIDENCE_MAX = 600


def _evidence(text: str, start: int = 0, end: int | None = None, stop: int | None = None) -> str:
    """From the exception name (or pydantic's `Value error, `) before the match to the end of the
    message (`stop`, else the record's end); long blobs are cut at a sentence end."""
    end = len(text) if end is None else end
    head = 0
    for m in _EXC_HEAD.finditer(text, 0, start):
        head = m.start()
    ve = text.rfind("Value error, ", 0, start)
    if ve >= head and ve != -1:
        head = ve + len("Value error, ")
    elif head == 0 and start > 200:
        # no exception name in reach: begin at the sentence that holds the match
        dot = text.rfind(". ", 0, start)
        head = dot + 2 if dot != -1 else start
    out = _PYDANTIC_TAIL.sub("", text[head:stop]).strip()
    if out.startswith("Value error, "):
        out = out[len("Value error, ") :]
    if out.endswith("`") and out.count("`") % 2:  # a log pasted inside `backticks`
        out = out[:-1].rstrip()
    if len(out) > _EVIDENCE_MAX:
        cut = out.find(". ", max(end - head, 0), _EVIDENCE_MAX + 200)
        out = out[: cut + 1] if cut != -1 else out[:_EVIDENCE_MAX].rstrip() + " ..."
    return re.sub(r"\s+", " ", out)


def _hit_evidence(hit: _Hit) -> str:
    stop = None
    if hit.rule.end is not None:
        m = hit.rule.end.match(hit.record.text, hit.match.end()) or hit.rule.end.search(
            hit.record.text, hit.match.end()
        )
        stop = m.end() if m else None
    return _evidence(hit.record.text, hit.match.start(), hit.match.end(), stop)


# --------------------------------------------------------------------------------------------------
# Capacity facts
# --------------------------------------------------------------------------------------------------

# fact -> patterns in order of preference; the last occurrence of the first pattern found wins.


def _number(raw: str, fact: str, table: RuleTable) -> int | float | str:
    if fact in table.int_facts:
        return int(raw.replace(",", ""))
    if fact in table.float_facts:
        return float(raw)
    return raw.rstrip(".,;")


def _facts(records: list[_Record], table: RuleTable) -> dict[str, object]:
    # one search per pattern over all records (no pattern crosses a newline, so none spans two records)
    joined = "\n".join(r.text for r in records)
    facts: dict[str, object] = {}
    for fact, patterns in table.facts.items():
        facts[fact] = None
        for rx in patterns:
            found = [g for m in rx.finditer(joined) for g in m.groups() if g is not None]
            values = [_number(v, fact, table) for v in found]
            if fact in table.int_facts and fact not in table.counts_zero:
                values = [v for v in values if v > 0]  # e.g. max_seq_len=-1 (auto) is no length
            if values:
                facts[fact] = values[-1]
                break
    return facts


# --------------------------------------------------------------------------------------------------
# Remedies
# --------------------------------------------------------------------------------------------------


_FIELD = re.compile(r"\{(\w+)\}")


def _fill(template: str, ctx: dict[str, object]) -> str | None:
    def optional(m: re.Match[str]) -> str:
        inner = m.group(1)
        if all(ctx.get(f) is not None for f in _FIELD.findall(inner)):
            return inner
        return ""

    # innermost optional parts first, so "[a[ b]]" keeps a when only b is unknown
    prev = None
    while prev != template:
        prev = template
        template = re.sub(r"\[([^\[\]]*)\]", optional, template)
    if any(ctx.get(f) is None for f in _FIELD.findall(template)):
        return None
    return template.format(**{k: _fmt(v) for k, v in ctx.items() if v is not None})


def _fmt(v: object) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v)) if abs(v) >= 100 else f"{v:g}"
    return str(v)


def _remedy(
    hit: _Hit | None, kind: str, facts: dict[str, object], records: list[_Record], table: RuleTable
) -> str:
    ctx: dict[str, object] = {k: v for k, v in facts.items() if v is not None}
    for name, patterns in table.context.items():
        found = (m.group(1) for rx in patterns for r in records if (m := rx.search(r.text)))
        value = next(found, None)
        if value is not None:
            ctx[name] = value
    if hit is not None:
        ctx.update(
            {
                k: v.replace(",", "") if k.endswith("_len") else v
                for k, v in hit.match.groupdict().items()
                if v
            }
        )
    if table.derive is not None:
        table.derive(ctx)
    key = hit.rule.remedy if hit is not None and hit.rule.remedy else kind
    for template in table.remedies.get(key, ()) + table.remedies[kind]:
        text = _fill(template, ctx)
        if text is not None:
            return text
    return table.remedies["other"][0]


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _root_cause(records: list[_Record], start: int, table: RuleTable) -> _Hit | None:
    """Earliest fatal or certain line from `start`; among lines of its kind, the best-ranked non-wrapper."""
    hits = [h for r in records[start:] if (h := _match(r, ("fatal", "certain"), table) or _hint(r, table))]
    strong = [h for h in hits if h.rule.grade != "hint"]
    if not strong:
        return None
    kind = strong[0].rule.kind
    for dominant, kinds in table.dominates.items():
        if kind in kinds and any(h.rule.kind == dominant for h in hits):
            kind = dominant
            break
    hits = strong if any(h.rule.kind == kind for h in strong) else hits
    same = [h for h in hits if h.rule.kind == kind]
    return min(same, key=lambda h: (h.wrapper, h.rule.rank, h.record.index))


def _crashed(records: list[_Record], start: int, after_ready: bool, table: RuleTable) -> bool:
    for r in records[start:]:
        if after_ready:
            if table.engine_death.search(r.text):
                return True
        elif (
            table.wrappers.search(r.text)
            or _TRACEBACK.match(r.text)
            or (_EXCEPTION_LINE.match(r.text) and not _BENIGN_EXCEPTION.match(r.text))
            or r.level in ("ERROR", "CRITICAL")
        ):
            return True
    return False


def _other_evidence(records: list[_Record], start: int, table: RuleTable) -> str | None:
    """The last exception line that is not a wrapper; else the last ERROR line outside a traceback."""
    tail = records[start:]
    for r in reversed(tail):
        if (
            _EXCEPTION_LINE.match(r.text)
            and not table.wrappers.search(r.text)
            and not _BENIGN_EXCEPTION.match(r.text)
        ):
            if re.match(r"^(?:[\w.]*\.)?ValidationError: \d+ validation error", r.text):
                nxt = records[r.index + 1] if r.index + 1 < len(records) else None
                if nxt is not None and nxt.text.startswith("Value error, "):
                    return _evidence(nxt.text)
            return _evidence(r.text)
    candidate = None
    in_traceback = False
    for r in tail:
        if _TRACEBACK.match(r.text):
            in_traceback = True
        elif in_traceback and _EXCEPTION_LINE.match(r.text):
            in_traceback = False
        elif (
            not in_traceback
            and r.level in ("ERROR", "CRITICAL")
            and not table.wrappers.search(r.text)
            and not _CODE.search(r.text)
        ):
            candidate = r
    return _evidence(candidate.text) if candidate is not None else None


def scan_log(text: str, table: RuleTable):
    """Classify one log by the engine's table and pull its capacity facts: a `table.result`."""
    records = _records(text)
    facts = _facts(records, table)
    ready_at = max((r.index for r in records if table.ready_marker in r.text), default=None)
    start = 0 if ready_at is None else ready_at + 1

    hit = _root_cause(records, start, table)
    kind = hit.rule.kind if hit else None
    if kind is None and _crashed(records, start, ready_at is not None, table):
        hints = [h for r in records[start:] if (h := _hint(r, table))]
        hit = hints[0] if hints else None
        kind = hit.rule.kind if hit else "other"

    scan = table.result(**facts, ready=ready_at is not None and kind is None)
    if kind is None:
        return scan
    scan.failure = kind
    if hit is not None:
        scan.evidence = _hit_evidence(hit)
    else:
        scan.evidence = _other_evidence(records, start, table)
    scan.remedy = _remedy(hit, kind, facts, records, table)
    return scan


def scan_file(path: str | Path, table: RuleTable):
    """scan_log over a file; undecodable bytes are replaced rather than fatal."""
    return scan_log(Path(path).read_bytes().decode("utf-8", errors="replace"), table)


def human(scan) -> str:
    """A scan as aligned `name  value` rows: failure, evidence, remedy, then every fact."""
    rows = [
        ("failure", scan.failure or ("none (clean start)" if scan.ready else "none found")),
        ("evidence", scan.evidence or "-"),
        ("remedy", scan.remedy or "-"),
    ]
    facts = scan.to_json()
    for key in ("failure", "evidence", "remedy"):
        facts.pop(key)
    rows += [(k, "-" if v is None else str(v)) for k, v in facts.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
