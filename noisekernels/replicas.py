"""The replica count of the current pass (ARCHITECTURE.md section 3).

Inside `with replicas(n):` a batch of n*B rows holds n replicas of B inputs, replica-major, and
noise layers take their batch-wide statistics per replica. A plain module global, so
torch.compile guards on it instead of breaking the graph.
"""

import contextlib

_count = 1


def current():
    """Replicas in the batch being run (1 outside any `replicas` block)."""
    return _count


@contextlib.contextmanager
def replicas(n):
    """Runs the enclosed passes with batches of `n` replicas."""
    global _count
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    before, _count = _count, n
    try:
        yield
    finally:
        _count = before
