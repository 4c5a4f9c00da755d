"""CPU thread count for torch: what this process may really use, and a scoped override.

torch sizes its intra-op pool from the machine's cores, not from the CPU affinity mask or the
container's CPU quota, so several scans on a shared machine oversubscribe it: each thread waits
on the others. :func:`available_cpus` reads the affinity mask and the cgroup (v2 or v1) quota,
:func:`default_threads` lets ``OMP_NUM_THREADS`` override that, and :func:`using_threads` sets
torch's thread count for a block and restores it afterwards.

The library changes torch's count only when asked (``Config(threads=n)``; the default None leaves it
alone). That count is process-wide in torch's native and TBB builds (per calling thread under
OpenMP), so scans that run concurrently in threads of one process should leave ``threads`` None and
let the process set torch's count once; :func:`using_threads` logs a warning when two threads
override it at once.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ConfigError

__all__ = ["available_cpus", "cgroup_cpu_quota", "default_threads", "using_threads"]

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
# Where cgroup v1 mounts the cpu controller, relative to the cgroup root (distributions differ).
_V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def available_cpus(root: str | Path = CGROUP_ROOT, self_cgroup: str | Path = SELF_CGROUP) -> int:
    """The number of CPUs this process may use: the smaller of its affinity mask and its cgroup
    CPU quota (rounded up), at least 1.

    ``root`` is the cgroup mount and ``self_cgroup`` the process's cgroup membership file
    (``/proc/self/cgroup``); both are parameters so that tests can point them at fake files.
    """
    cpus = _affinity_cpus()
    quota = cgroup_cpu_quota(root, self_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cgroup_cpu_quota(root: str | Path = CGROUP_ROOT, self_cgroup: str | Path = SELF_CGROUP) -> float | None:
    """CPUs' worth of time the cgroup quota allows per period (e.g. 1.5), or None without a quota.

    Reads cgroup v2 ``cpu.max`` and v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in the
    process's own cgroup and each of its ancestors, and returns the smallest: a parent's quota
    caps all its children.
    """
    quotas = [q for folder in _cgroup_dirs(Path(root), Path(self_cgroup)) if (q := _read_quota(folder)) is not None]
    return min(quotas, default=None)


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when it is set to a positive integer, else :func:`available_cpus`."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return available_cpus()


@contextmanager
def using_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, then restore the previous count.

    ``None`` leaves the count as it is. Raises :class:`~baerase.errors.ConfigError` (a
    ``ValueError``) when ``n`` is not a positive integer. Where torch's count is process-wide,
    overrides in two threads at once interleave: a warning says so.
    """
    if n is None:
        yield
        return
    # bool is an int subclass; True threads is a mistake, not 1.
    if isinstance(n, bool) or not isinstance(n, int):
        raise ConfigError(f"using_threads: the thread count must be a positive int or None, got {n!r}")
    if n < 1:
        raise ConfigError(f"using_threads: the thread count must be at least 1, got {n}")
    with _overriding():
        previous = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


_overrides: dict[int, int] = {}  # thread id -> open using_threads blocks
_overrides_lock = threading.Lock()


@contextmanager
def _overriding() -> Iterator[None]:
    """Count this thread's override for the block; warn when another thread holds one too."""
    me = threading.get_ident()
    with _overrides_lock:
        others = sum(1 for thread in _overrides if thread != me)
        _overrides[me] = _overrides.get(me, 0) + 1
    if others:
        log.warning(
            "another thread is also setting torch's thread count (Config(threads=...)); where it is "
            "process-wide the two interleave: leave threads=None for concurrent scans"
        )
    try:
        yield
    finally:
        with _overrides_lock:
            _overrides[me] -= 1
            if not _overrides[me]:
                del _overrides[me]


def _affinity_cpus() -> int:
    """CPUs in this process's affinity mask, or all the machine's where the OS has no such call."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _membership(self_cgroup: Path) -> dict[str, str]:
    """Controller -> cgroup path from ``/proc/self/cgroup``; the v2 hierarchy is under key ``""``."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return {}
    paths = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                paths[controller] = parts[2]
    return paths


def _with_ancestors(mount: Path, relative: str) -> list[Path]:
    """``mount/relative`` and each parent folder up to and including ``mount``."""
    folders = [mount]
    for part in Path(relative).parts:
        if part != "/":
            folders.append(folders[-1] / part)
    return folders


def _cgroup_dirs(root: Path, self_cgroup: Path) -> list[Path]:
    """Every folder whose CPU quota applies to this process, v2 and v1 layouts alike."""
    paths = _membership(self_cgroup)
    folders = _with_ancestors(root, paths.get("", "/"))
    for mount in _V1_CPU_MOUNTS:
        folders += _with_ancestors(root / mount, paths.get("cpu", "/"))
    return folders


def _read_quota(folder: Path) -> float | None:
    """The quota set in one cgroup folder, in CPUs, or None where it sets none (or unreadably)."""
    v2 = _read_words(folder / "cpu.max")
    if v2 is not None:
        return _ratio(*v2[:2]) if len(v2) >= 2 else None
    quota, period = _read_words(folder / "cpu.cfs_quota_us"), _read_words(folder / "cpu.cfs_period_us")
    if quota and period:
        return _ratio(quota[0], period[0])
    return None


def _read_words(path: Path) -> list[str] | None:
    try:
        return path.read_text().split()
    except OSError:
        return None


def _ratio(quota: str, period: str) -> float | None:
    """quota / period; None for v2's ``max``, v1's ``-1`` and anything unparsable."""
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None
