"""The machine and the source: CPU thread default, git commit inside and outside a checkout."""

import os

import pytest

from attention.bench.environment import available_cpus, default_threads, git_commit


def test_cpu_thread_default_is_the_cpus_this_process_may_run_on(monkeypatch):
    expected = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count())
    assert available_cpus() == expected == default_threads("cpu")
    assert default_threads("cuda") is None  # torch's own
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert default_threads("cpu") == 3
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    assert default_threads("cpu") == 5


def test_git_commit_outside_a_checkout_is_none_quietly(tmp_path, capfd):
    assert git_commit(tmp_path) == (None, None)
    assert capfd.readouterr() == ("", "")


def test_git_commit_of_the_package_source():
    commit, dirty = git_commit()
    if commit is None:
        pytest.skip("the package's source is not a git checkout")
    assert len(commit) >= 7 and all(c in "0123456789abcdef" for c in commit)
    assert dirty in (True, False)
