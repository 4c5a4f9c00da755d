"""CPU thread count: cgroup quota parsing from fake files, OMP_NUM_THREADS, scoped override."""

from __future__ import annotations

import os

import pytest
import torch

from baerase import threads
from baerase.errors import ConfigError


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def many_cpus(monkeypatch):
    """Pretend the affinity mask holds 64 CPUs so that the quota decides."""
    monkeypatch.setattr(threads, "_affinity_cpus", lambda: 64)


def test_v2_quota_rounds_up(tmp_path, many_cpus):
    _write(tmp_path / "cpu.max", "150000 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path, tmp_path / "none") == 1.5
    assert threads.available_cpus(tmp_path, tmp_path / "none") == 2


def test_v2_max_is_no_limit(tmp_path, many_cpus):
    _write(tmp_path / "cpu.max", "max 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path, tmp_path / "none") is None
    assert threads.available_cpus(tmp_path, tmp_path / "none") == 64


def test_v2_own_cgroup_and_smallest_ancestor(tmp_path, many_cpus):
    _write(tmp_path / "self", "0::/jobs/scan\n")
    _write(tmp_path / "jobs" / "cpu.max", "300000 100000")
    _write(tmp_path / "jobs" / "scan" / "cpu.max", "max 100000")
    assert threads.available_cpus(tmp_path, tmp_path / "self") == 3


def test_v1_quota(tmp_path, many_cpus):
    _write(tmp_path / "cpu" / "cpu.cfs_quota_us", "250000\n")
    _write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert threads.cgroup_cpu_quota(tmp_path, tmp_path / "none") == 2.5
    assert threads.available_cpus(tmp_path, tmp_path / "none") == 3


def test_v1_combined_mount_and_own_cgroup(tmp_path, many_cpus):
    _write(tmp_path / "self", "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n")
    folder = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    _write(folder / "cpu.cfs_quota_us", "50000")
    _write(folder / "cpu.cfs_period_us", "100000")
    assert threads.available_cpus(tmp_path, tmp_path / "self") == 1


def test_v1_minus_one_is_no_limit(tmp_path, many_cpus):
    _write(tmp_path / "cpu" / "cpu.cfs_quota_us", "-1")
    _write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000")
    assert threads.cgroup_cpu_quota(tmp_path, tmp_path / "none") is None


def test_missing_or_garbled_files_mean_no_limit(tmp_path, many_cpus):
    assert threads.available_cpus(tmp_path / "absent", tmp_path / "absent") == 64
    _write(tmp_path / "cpu.max", "garbage")
    _write(tmp_path / "cpu" / "cpu.cfs_quota_us", "100000")  # no period file
    assert threads.cgroup_cpu_quota(tmp_path, tmp_path / "none") is None


def test_affinity_caps_the_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "_affinity_cpus", lambda: 2)
    _write(tmp_path / "cpu.max", "800000 100000")
    assert threads.available_cpus(tmp_path, tmp_path / "none") == 2


def test_tiny_quota_gives_one_cpu(tmp_path, many_cpus):
    _write(tmp_path / "cpu.max", "1000 100000")
    assert threads.available_cpus(tmp_path, tmp_path / "none") == 1


def test_real_machine_answer_is_sane():
    assert 1 <= threads.available_cpus() <= (os.cpu_count() or 1)


@pytest.mark.parametrize(("value", "expected"), [("3", 3), (" 5 ", 5), ("0", 7), ("-2", 7), ("two", 7), ("", 7)])
def test_default_threads_reads_omp_num_threads(monkeypatch, value, expected):
    monkeypatch.setattr(threads, "available_cpus", lambda: 7)
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert threads.default_threads() == expected


def test_default_threads_without_omp_num_threads(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 7)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.default_threads() == 7


@pytest.fixture
def thread_count():
    """Put torch's thread count back whatever a test does to it."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_using_threads_sets_and_restores(thread_count):
    target = 2 if thread_count != 2 else 1
    with threads.using_threads(target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == thread_count


def test_using_threads_restores_on_exception(thread_count):
    target = 2 if thread_count != 2 else 1
    with pytest.raises(KeyError), threads.using_threads(target):
        raise KeyError("inside")
    assert torch.get_num_threads() == thread_count


def test_using_threads_none_leaves_count(thread_count):
    with threads.using_threads(None):
        assert torch.get_num_threads() == thread_count
    assert torch.get_num_threads() == thread_count


@pytest.mark.parametrize(
    ("bad", "message"),
    [(0, "at least 1"), (-3, "at least 1"), (1.5, "positive int"), ("2", "positive int"), (True, "positive int")],
)
def test_using_threads_rejects_bad_counts(thread_count, bad, message):
    with pytest.raises(ValueError, match=message), threads.using_threads(bad):
        pass
    assert torch.get_num_threads() == thread_count


def test_rejection_is_a_config_error():
    with pytest.raises(ConfigError), threads.using_threads(0):
        pass
