"""Progress bars for long work: one look (rate and ETA, on stderr) for every command.

    with progress(total=n_rows, desc="predict", unit="row") as bar:
        bar.update(len(chunk))

A bar is drawn only when stderr is a terminal and neither `leader-edge --quiet` nor
LEADER_EDGE_QUIET=1 asked for silence, so logs, CI output and piped runs never fill up with
carriage returns. tqdm is the engine (a small pure-Python package in the base install: `predict`
shows progress too); `disable=None` is tqdm's own "not a terminal" test.
"""

from __future__ import annotations

import os
import sys

QUIET_ENV = "LEADER_EDGE_QUIET"


def quiet() -> bool:
    """True when progress output is switched off (`--quiet` or LEADER_EDGE_QUIET set to 1/true/yes)."""
    return os.environ.get(QUIET_ENV, "").strip().lower() in ("1", "true", "yes")


def progress(total: float | None = None, *, desc: str, unit: str = "it", enabled: bool = True):
    """A tqdm bar on stderr: `unit`s with SI scaling (12.3k row/s), rate and ETA when `total` is known.

    Args:
        total: the amount of work in `unit`s, or None when unknown (then rate and count only).
        desc: what is being done, e.g. "predict" or "epoch 3/20".
        unit: the counted thing: "row", "tok", "visit", "table".
        enabled: False for this bar regardless of the terminal (e.g. on every rank but 0).
    """
    from tqdm import tqdm

    disable = True if (not enabled or quiet()) else None  # None: drawn only on a terminal
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, disable=disable,
                dynamic_ncols=True, leave=False)
