"""Which vLLM release changed the outcome: a bisection over a package's releases on PyPI.

`vllm-lab bisect-versions --model M --good V1 --bad V2 [trial flags]` lists the package's releases between
V1 and V2 (PyPI's JSON API, cached under .cache/pypi so a later offline run still works and says so), then
tests the same trial on as few of them as a bisection needs (about log2 of the releases between, plus the
two ends), installing only those (installs.ensure, each cached). A release that cannot be installed, or
whose server cannot run the model at all (an import error, an unknown architecture), is skipped, said, and
its neighbour tested instead, as `git bisect skip` does.

Every release is a fresh venv whose first start is cold: a timeout or an unstable start is launched once more
with the startup timeout doubled (said), and a second one leaves that release "could not decide" (skipped
like an untestable one), never the first bad release. The bisection assumes one change point, from --good's
result to --bad's; a release whose result matches neither (a third failure kind) is named as such, and the
search goes on for the change to --bad's result.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import InvalidVersion, Version

from vllm_lab.paths import REPO_ROOT
from vllm_lab.spec import SpecError

PYPI_JSON = "https://pypi.org/pypi/{package}/json"
CACHE_DIR = REPO_ROOT / ".cache" / "pypi"
# A server that never got as far as the model: the release cannot run it, whatever the trial's knobs.
UNRUNNABLE = re.compile(
    r"ModuleNotFoundError|ImportError|No module named|undefined symbol|"
    r"architectures? \[?.*\]? (?:are|is) not supported|not supported for now"
)


UNDECIDED = "undecided"  # timed out or unstable twice (the second time with the timeout raised)
UNTESTED = ("skipped", UNDECIDED)  # says nothing about the change: the bisection tests a neighbour instead
RETRY = ("timeout", "unstable")  # a cold first start can do either: launched once more before any verdict
TIMEOUT_FACTOR = 2.0  # the retry's startup timeout, as a multiple of the first one


@dataclass
class ReleaseResult:
    version: str
    outcome: str  # ready | failed | timeout | unstable | skipped | undecided
    failure: str | None = None
    note: str | None = None  # why it was skipped, or the evidence line
    trial_id: str | None = None

    def result(self) -> tuple[str, str | None]:
        """What "the same outcome" compares: the outcome and its failure kind."""
        return self.outcome, self.failure


@dataclass
class Bisection:
    package: str
    good: str
    bad: str
    releases: list[str]  # good .. bad inclusive, ascending
    tested: list[ReleaseResult] = field(default_factory=list)
    first_bad: str | None = None
    last_good: str | None = None
    verdict: str = ""
    source: str = ""  # where the release list came from
    third: list[str] = field(default_factory=list)  # releases whose result is neither --good's nor --bad's

    def matches(self, t: ReleaseResult) -> str | None:
        """good | bad | neither (a third result); None where nothing was decided (skipped, undecided)."""
        if t.outcome in UNTESTED or len(self.tested) < 2:
            return None
        ends = {r.version: r for r in self.tested[:2]}
        g, x = ends.get(self.good), ends.get(self.bad)
        if g is None or x is None:
            return None
        return "good" if t.result() == g.result() else "bad" if t.result() == x.result() else "neither"

    def to_json(self, trials: list[dict]) -> dict:
        return {
            "package": self.package, "good": self.good, "bad": self.bad, "first_bad": self.first_bad,
            "last_good": self.last_good, "verdict": self.verdict, "releases": self.releases,
            "releases_source": self.source, "assumes": ASSUMES,
            "third_results": [{"version": t.version, "outcome": t.outcome, "failure": t.failure}
                              for t in self.tested if t.version in self.third],
            "tested": [{"version": t.version, "outcome": t.outcome, "failure": t.failure, "note": t.note,
                        "trial_id": t.trial_id, "matches": self.matches(t)} for t in self.tested],
            "trials": trials,
        }  # fmt: skip


ASSUMES = (
    "one change point: every release before it gives --good's result and every release from it on gives "
    "--bad's; a release with a third result is named, and the search goes on for the change to --bad's result"
)


# ---- the release list ----------------------------------------------------------------------------------


def _version(v: str) -> Version | None:
    try:
        return Version(v)
    except InvalidVersion:
        return None


def releases(package: str, *, fetch: Callable[[str], dict] | None = None, cache_dir: Path | None = None,
             log=None) -> tuple[list[str], str]:  # fmt: skip
    """(every non-yanked final release, ascending; where the list came from). Cached; offline uses the cache."""
    log = log or _stderr
    cache = (cache_dir or CACHE_DIR) / f"{package}.json"
    url = PYPI_JSON.format(package=package)
    try:
        data = (fetch or _fetch)(url)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"fetched_at": time.time(), "releases": data.get("releases", {})}))
        source = url
    except Exception as e:  # offline, a proxy, PyPI down: the cached list, said plainly
        if not cache.is_file():
            raise SpecError(
                f"releases: cannot reach {url} ({type(e).__name__}: {str(e)[:80]}) and no cached list at {cache}; "
                "run once with the network, or pass --releases V1,V2,... yourself"
            ) from None
        data = json.loads(cache.read_text())
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(data.get("fetched_at", 0)))
        source = f"{cache} (offline: {url} unreachable; list as fetched {when})"
        log(f"releases of {package}: {source}")
    out = []
    for v, files in (data.get("releases") or {}).items():
        pv = _version(v)
        if pv is None or pv.is_prerelease or pv.is_devrelease:
            continue
        if files and all(f.get("yanked") for f in files):
            continue
        if files == []:
            continue  # a release with no files cannot be installed
        out.append(v)
    return sorted(out, key=Version), source


def _fetch(url: str) -> dict:
    import httpx

    r = httpx.get(url, timeout=20, follow_redirects=True)
    r.raise_for_status()
    return r.json()


def _stderr(msg: str) -> None:
    print(f"vllm-lab: {msg}", file=sys.stderr, flush=True)


def _check_versions(given: list[str], where: str) -> None:
    for v in given:
        if _version(v) is None:
            raise SpecError(f"{where}: {v!r} is not a version; give releases such as 0.27.0,0.32.0")


def between(all_releases: list[str], good: str, bad: str) -> list[str]:
    """The releases from good to bad inclusive, ascending; each end must be a release."""
    for name, v in (("--good", good), ("--bad", bad)):
        if _version(v) is None:
            raise SpecError(f"{name}: {v!r} is not a version; give a release such as 0.27.0")
        if v not in all_releases:
            near = ", ".join(all_releases[-5:])
            raise SpecError(
                f"{name}: {v} is not a release of this package (latest: {near}); pick one of its releases"
            )
    if Version(good) == Version(bad):
        raise SpecError("--good and --bad: are the same release; give two different releases")
    lo, hi = sorted((Version(good), Version(bad)))
    return [v for v in all_releases if lo <= Version(v) <= hi]


# ---- the bisection --------------------------------------------------------------------------------------


def bisect(
    releases_: list[str], good: str, bad: str, test: Callable[[str], ReleaseResult], log=None
) -> Bisection:
    """The first release whose result differs from good's; `test` runs the trial on one release.

    Both ends are tested first (they are the claim being bisected). A skipped release is replaced by the
    nearest untested one inside the open range, so a run of broken releases narrows the answer to a range.
    """
    log = log or _stderr
    order = releases_ if Version(good) < Version(bad) else list(reversed(releases_))  # good first
    b = Bisection(package="", good=good, bad=bad, releases=releases_)
    results: dict[int, ReleaseResult] = {}

    def run(i: int) -> ReleaseResult:
        t = test(order[i])
        results[i] = t
        b.tested.append(t)
        log(
            f"{order[i]}: {t.outcome}{' ' + t.failure if t.failure else ''}{' (' + t.note + ')' if t.note else ''}"
        )
        return t

    g, x = run(0), run(len(order) - 1)
    for end, t in ((order[0], g), (order[-1], x)):
        if t.outcome in UNTESTED:
            how = "raise --timeout" if t.outcome == UNDECIDED else "pick another end"
            b.verdict = f"{end} could not be {_untested(t)} ({t.note}); {how}"
            return b
    if g.result() == x.result():
        b.verdict = f"{good} and {bad} give the same result ({_said(g)}): nothing to bisect"
        return b
    # One change point is assumed, to --bad's result: a third result is "not yet bad" (the search goes on
    # above it) and is named in the verdict.
    lo, hi = 0, len(order) - 1  # lo: last known not like bad; hi: first known like bad
    while hi - lo > 1:
        mid = (lo + hi) // 2
        candidates = sorted(range(lo + 1, hi), key=lambda i: (abs(i - mid), i))
        t = None
        for i in candidates:
            if i in results:
                continue
            t = run(i)
            if t.outcome not in UNTESTED:
                break
        if t is None or t.outcome in UNTESTED:
            break  # every release strictly between is untestable or undecided
        if t.result() == x.result():
            hi = i
        else:
            lo = i
            if t.result() != g.result():
                b.third.append(order[i])
    good_below = [i for i in range(hi) if i in results and results[i].result() == g.result()]
    b.last_good, b.first_bad = order[max(good_below)], order[hi]
    b.verdict = f"{order[hi]} is the first release that {_said(results[hi])}"
    if results[lo].result() == g.result():
        b.verdict += f"; {order[lo]} {_said(results[lo])}"
    else:
        b.verdict += (f"; the release before it, {order[lo]}, {_said(results[lo])}: a third result, neither "
                      f"--good's ({_said(g)}) nor --bad's; {b.last_good} is the last tested release that {_said(g)}")  # fmt: skip
    untested = [order[i] for i in range(lo + 1, hi) if results.get(i) and results[i].outcome in UNTESTED]
    if untested:
        b.verdict += (f" (between them {', '.join(untested)} could not be tested or decided: the change is in "
                      f"one of them or {order[hi]})")  # fmt: skip
    others = [v for v in b.third if v != order[lo]]
    if others:
        b.verdict += f"; a third result also at {', '.join(others)}"
    if b.third:
        b.verdict += f". Bisection assumes {ASSUMES.split(';')[0]}: check the releases named above"
    return b


def _untested(t: ReleaseResult) -> str:
    return "decided" if t.outcome == UNDECIDED else "tested"


def _said(t: ReleaseResult) -> str:
    if t.outcome == "ready":
        return "starts"
    return f"{t.outcome}: {t.failure}" if t.failure else t.outcome


def tested_from_record(version: str, rec: dict) -> ReleaseResult:
    """A trial record -> ReleaseResult; a server that could not even load vLLM or the model is `skipped`."""
    evidence = rec.get("evidence") or ""
    if (
        rec.get("outcome") == "failed"
        and rec.get("failure") in (None, "other")
        and UNRUNNABLE.search(evidence)
    ):
        return ReleaseResult(
            version, "skipped", None, f"cannot run the model: {evidence[:160]}", rec.get("trial_id")
        )
    return ReleaseResult(
        version, rec.get("outcome") or "failed", rec.get("failure"), None, rec.get("trial_id")
    )


# ---- the command -----------------------------------------------------------------------------------------


# The seam tests use: (package, version) -> the fields a Trial takes from that release's install.
def _real_install(package: str, version: str) -> dict:
    from vllm_lab import installs

    venv = installs.ensure(package, version)
    return {"vllm_cmd": installs.command_for(venv), "install": f"{package}=={version}"}


INSTALL: Callable[[str, str], dict] = _real_install


def run_bisection(template, package: str, good: str, bad: str, run_dir: str | Path, *,
                  release_list: list[str] | None = None, install: Callable[[str, str], dict] | None = None,
                  run_trial=None, log=None) -> tuple[Bisection, list[dict]]:  # fmt: skip
    """Bisect `template` (a Trial) over the package's releases; every launch is a record in run_dir."""
    from dataclasses import replace

    from vllm_lab.installs import InstallError

    if run_trial is None:  # a rerun into the same folder reuses the launches it already recorded
        from vllm_lab.steps import run_or_reuse as run_trial
    install = install or INSTALL
    if release_list is not None:
        _check_versions(release_list, "--releases")
        all_releases, source = sorted(set(release_list), key=Version), "--releases"
    else:
        all_releases, source = releases(package, log=log)
    span = between(all_releases, good, bad)
    records: list[dict] = []

    def launch(version: str, trial) -> ReleaseResult:
        rec = run_trial(trial, run_dir)
        records.append(rec)
        return tested_from_record(version, rec)

    def test(version: str) -> ReleaseResult:
        try:
            fields = install(package, version)
        except InstallError as e:
            return ReleaseResult(version, "skipped", None, f"cannot be installed: {e}")
        env = {**template.env, **fields.pop("env", {})}
        trial = with_timeout_id(replace(template, env=env, trial_id="", **fields))  # the install is in the id
        first = launch(version, trial)
        if first.outcome not in RETRY:
            return first
        t1, t2 = trial.startup_timeout_s, trial.startup_timeout_s * TIMEOUT_FACTOR
        (log or _stderr)(f"{version}: {first.outcome} within a {t1:g} s start-up timeout; a fresh install's "
                         f"first start is cold: launching once more with the timeout raised to {t2:g} s")  # fmt: skip
        second = launch(version, with_timeout_id(replace(trial, startup_timeout_s=t2, trial_id="")))
        if second.outcome not in RETRY:
            retried = f"the second launch, at {t2:g} s (the first: {first.outcome} at {t1:g} s)"
            second.note = f"{second.note}; {retried}" if second.note else retried
            return second
        return ReleaseResult(version, UNDECIDED, None,
                             f"could not decide: {first.outcome} at {t1:g} s, then {second.outcome} at {t2:g} s; "
                             "raise --timeout to decide it", second.trial_id)  # fmt: skip

    b = bisect(span, good, bad, test, log=log)
    b.package, b.source = package, source
    return b, records


def with_timeout_id(trial):
    """The trial with its start-up timeout in its id, where it is not the default (other ids stay as they
    were): a rerun with a longer --timeout launches again instead of reusing a timeout."""
    from dataclasses import fields

    from vllm_lab.spec import Trial

    default = next(f.default for f in fields(Trial) if f.name == "startup_timeout_s")
    if trial.startup_timeout_s != default:
        trial.trial_id = f"{trial.trial_id}-t{trial.startup_timeout_s:g}"
    return trial


def cli_bisect_versions(args) -> int:
    from vllm_lab.probe import trial_from_args

    args.vllm_cmd = None
    template = trial_from_args(args, step="bisect")
    template.env = _env_pairs(args.env)
    template.validate(check_command=False)
    given = [v.strip() for v in args.releases.split(",") if v.strip()] if args.releases else None
    import contextlib

    # with --json, stdout is the one JSON object: progress (reused records, the launcher's notes) goes to stderr
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        b, records = run_bisection(template, args.package, args.good, args.bad, args.out, release_list=given)
    out = b.to_json([{k: r.get(k) for k in ("trial_id", "install", "vllm_version", "outcome", "failure",
                                            "evidence", "log_path")} for r in records])  # fmt: skip
    if args.json:
        print(json.dumps(out, default=str))
    else:
        for t in b.tested:
            third = "(a third result: neither --good's nor --bad's)" if b.matches(t) == "neither" else ""
            print(f"{t.version:<14} {t.outcome:<9} {t.failure or ''} {t.note or ''} {third}".rstrip())
        print(b.verdict)
    return 0 if b.first_bad else 1


def _env_pairs(pairs: list[str] | None) -> dict[str, str]:
    env = {}
    for p in pairs or []:
        if "=" not in p:
            raise SpecError(f"--env: {p!r} must be NAME=value, e.g. VLLM_ENABLE_V1_MULTIPROCESSING=0")
        k, v = p.split("=", 1)
        env[k] = v
    return env
