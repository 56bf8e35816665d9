"""The planner's objective over time: one point per measurement, kept in the state store.

``cloud.report`` and ``cloud.rebalance`` add a point each time they measure the cloud, so every
operator of the team sees the same series; the oldest points beyond ``KEEP`` are dropped.
"""

import time

from cloudops import state

PREFIX = "imbalance/"
KEEP = 500


def record(figures: dict, when: float | None = None, source: str = "report") -> dict:
    """Keep ``figures`` (the ``balance.Imbalance`` as a dict) as measured at ``when``."""
    when = round(time.time() if when is None else when, 3)
    point = {"time": when, "source": source, **figures}
    store = state.current()
    store.create(f"{PREFIX}{when:014.3f}-{source}", point)
    keys = sorted(store.items(PREFIX))
    for key in keys[:-KEEP]:
        store.delete(key)
    return point


def series(limit: int = KEEP) -> list[dict]:
    """The points kept, oldest first."""
    entries = state.current().items(PREFIX)
    return [entries[k].value for k in sorted(entries)][-limit:]
