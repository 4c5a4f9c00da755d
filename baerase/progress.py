"""Progress bars: one per phase, named by what it does; silent unless ``config.run.progress`` (off by
default; the CLI turns it on when stderr is a terminal and ``--quiet`` is not given)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def progress(total: int, desc: str, enabled: bool) -> Iterator:
    """A tqdm bar on stderr over ``total`` steps (``update(n)`` after every n); closed on exit. Disabled, it
    draws nothing and costs nothing."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)
    try:
        yield bar
    finally:
        bar.close()
