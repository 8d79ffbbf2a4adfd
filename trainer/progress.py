"""Progress bars that honour tqdm's own environment settings (`TQDM_DISABLE=1` and the like)."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(*args, hide: bool = False, **kwargs) -> tqdm:
    """A tqdm bar, hidden when `hide` (other processes, small inputs); otherwise tqdm's defaults
    and `TQDM_*` environment variables decide, which an explicit `disable=False` would override."""
    if hide:
        kwargs["disable"] = True
    return tqdm(*args, **kwargs)
