"""Getting a run's report to an issue: one zip to attach, or report-issue.md posted as a comment with `gh`.

The zip holds what a reader needs and nothing secret: report.html, report.md, report-issue.md, plots/,
trials.jsonl, the logs and the executed notebooks, each text passed through redact again on the way in
(the launcher and the batch redact already; a log copied in by hand may not be). Posting goes through the
GitHub CLI (`gh issue comment --body-file`), so this package never holds a token.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import nbformat

from vllm_lab.redact import redact_text
from vllm_lab.render import redact_notebook, scrub
from vllm_lab.spec import SpecError

GH_TARGET = re.compile(r"^(?P<repo>[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+)#(?P<number>[1-9][0-9]*)$")
# Files and folders of a run folder that go into the zip (what exists of them).
ZIP_FILES = ("report.html", "report.md", "report-issue.md", "trials.jsonl", "search.json")
ZIP_DIRS = ("plots", "logs", "notebooks")
TEXT_SUFFIXES = {".log", ".txt", ".md", ".json", ".jsonl", ".html", ".yaml"}


def _add(zf: zipfile.ZipFile, path: Path, arcname: str) -> None:
    if path.suffix == ".ipynb":
        nb = redact_notebook(nbformat.read(str(path), as_version=4))
        zf.writestr(arcname, nbformat.writes(nb))
    elif path.suffix in TEXT_SUFFIXES:
        zf.writestr(arcname, scrub(path.read_text(encoding="utf-8", errors="replace")))
    else:
        zf.write(path, arcname)


def make_zip(run_dir: str | Path) -> Path:
    """<run>/<run name>-report.zip with the report, the record, plots, logs and notebooks (redacted)."""
    run_dir = Path(run_dir).resolve()
    out = run_dir / f"{run_dir.name}-report.zip"
    files = [run_dir / name for name in ZIP_FILES if (run_dir / name).is_file()]
    files += sorted(run_dir.glob("*.png"))  # the preflight figure
    for folder in ZIP_DIRS:
        files += sorted(p for p in (run_dir / folder).rglob("*") if p.is_file())
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in files:
            _add(zf, path, f"{run_dir.name}/{path.relative_to(run_dir).as_posix()}")
    return out


def parse_gh_target(target: str) -> tuple[str, int]:
    """OWNER/REPO#N -> (OWNER/REPO, N); a SpecError naming the form otherwise."""
    m = GH_TARGET.match(target.strip())
    if not m:
        raise SpecError(f"--gh {target!r}: expected OWNER/REPO#NUMBER, e.g. vllm-project/vllm#12345")
    return m["repo"], int(m["number"])


def check_gh() -> str:
    """The gh executable, signed in; a SpecError saying how to get there otherwise."""
    gh = shutil.which("gh")
    if gh is None:
        raise SpecError("--gh: the GitHub CLI `gh` is not on PATH; install it (https://cli.github.com) or paste "
                        "report-issue.md by hand")  # fmt: skip
    status = subprocess.run([gh, "auth", "status"], capture_output=True, text=True, timeout=60)
    if status.returncode != 0:
        raise SpecError("--gh: `gh auth status` says gh is not signed in; run `gh auth login` first")
    return gh


def post_comment(target: str, body_file: str | Path) -> str:
    """Post body_file as a comment on OWNER/REPO#N with gh; returns what gh printed (the comment's URL)."""
    repo, number = parse_gh_target(target)
    gh = check_gh()
    done = subprocess.run(
        [gh, "issue", "comment", str(number), "--repo", repo, "--body-file", str(body_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RuntimeError(f"gh issue comment on {target} failed: {redact_text(last)}")
    return done.stdout.strip()
