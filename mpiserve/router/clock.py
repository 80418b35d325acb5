"""The clock rank 0's request bookkeeping reads: `time.monotonic` in a real job, the virtual
clock of the simulator's event loop under `mpiserve simulate` (which swaps it with `using`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_source: Callable[[], float] = time.monotonic


def now() -> float:
    """Seconds on the current clock (monotonic; only differences mean something)."""
    return _source()


@contextmanager
def using(source: Callable[[], float]) -> Iterator[None]:
    """Read `source` instead of time.monotonic inside the block."""
    global _source
    previous, _source = _source, source
    try:
        yield
    finally:
        _source = previous
