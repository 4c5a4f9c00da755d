"""Progress bars: one per phase, named by what it does; silent unless ``config.run.progress``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def progress(total: int, desc: str, enabled: bool) -> Iterator:
    """A tqdm bar over ``total`` steps (``update(n)`` after every n); closed on exit."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)
    try:
        yield bar
    finally:
        bar.close()
