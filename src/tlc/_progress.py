"""Progress bars: tqdm, off when the caller says so, and silenced by ``TQDM_DISABLE=1`` in the environment."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar. ``disable`` is passed only to switch it off: an explicit ``disable=False`` would override
    the ``TQDM_DISABLE`` environment variable that tqdm reads for its defaults."""
    if not enabled:
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
