"""Giving the heap's free pages back to the operating system, now and then, between steps.

glibc keeps the pages of freed memory inside its heaps for reuse. In a long-running server the
heaps fragment (small long-lived objects pin pages between free chunks, one heap per thread
that allocates), so the resident memory creeps up although nothing live grows: a soak at
saturation grew by about 1 MB a minute after every real leak was gone (BENCHMARKS.md section
13). `malloc_trim(0)` returns every whole free page of every heap. It runs on the engine thread,
between two steps (never beside an OpenMP region): at most once per `interval_s` while it is
busy, and when it goes idle after working (at most once per `idle_interval_s`). Elsewhere
than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable

# A trim took 1.4-4.3 ms and returned 30-160 MB after batches of 48 ShareGPT requests
# (BENCHMARKS.md section 13): every 10 s is ~0.03% of a busy engine's time. Once a minute let
# the heap saw 50 MB up and down between trims, noise that hid the slope a soak measures.
HEAP_TRIM_INTERVAL_S = 10.0
HEAP_TRIM_IDLE_INTERVAL_S = 5.0


def glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (another C library, or no C library to load)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """`after_step()` after each engine step, `on_idle()` when the engine has nothing to do."""

    def __init__(
        self,
        interval_s: float = HEAP_TRIM_INTERVAL_S,
        idle_interval_s: float = HEAP_TRIM_IDLE_INTERVAL_S,
        trim: Callable[[int], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.idle_interval_s = idle_interval_s
        self._trim = trim if trim is not None else glibc_malloc_trim()
        self._clock = clock
        self._last = clock()
        self._steps_since = 0
        self.num_trims = 0

    @property
    def enabled(self) -> bool:
        return self._trim is not None and self.interval_s > 0

    def after_step(self) -> None:
        self._steps_since += 1
        self._maybe_trim(self.interval_s)

    def on_idle(self) -> None:
        self._maybe_trim(self.idle_interval_s)

    def _maybe_trim(self, interval_s: float) -> None:
        if not self.enabled or self._steps_since == 0:
            return
        now = self._clock()
        if now - self._last < interval_s:
            return
        self._trim(0)
        self._last = now
        self.num_trims += 1
        self._steps_since = 0
