"""The engine thread's heap trims: rate-limited while busy, once on going idle after work,
never without work since the last one; and glibc's malloc_trim really returns freed pages."""

from __future__ import annotations

import ctypes

import pytest

from tokenmill.engine.heap_trim import HeapTrimmer, glibc_malloc_trim


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_busy_trims_once_per_interval_and_idle_trims_sooner():
    clock, calls = FakeClock(), []
    heap = HeapTrimmer(60.0, 5.0, trim=lambda pad: calls.append(pad) or 1, clock=clock)
    for _ in range(100):  # 100 steps in 59 s: no trim yet
        clock.now += 0.59
        heap.after_step()
    assert calls == []
    clock.now = 60.0
    heap.after_step()
    assert calls == [0] and heap.num_trims == 1
    heap.on_idle()  # nothing ran since: no trim
    assert heap.num_trims == 1
    clock.now = 62.0
    heap.after_step()  # work, but only 2 s after the last trim
    heap.on_idle()
    assert heap.num_trims == 1
    clock.now = 65.0
    heap.on_idle()  # idle 5 s after the last trim, with work since: trims
    assert heap.num_trims == 2
    clock.now = 500.0
    heap.on_idle()  # idle for long, nothing ran: no trim
    assert heap.num_trims == 2


def test_disabled_without_malloc_trim_or_with_interval_0():
    assert HeapTrimmer(60.0, clock=FakeClock()).enabled == (glibc_malloc_trim() is not None)
    clock, calls = FakeClock(), []
    heap = HeapTrimmer(0.0, trim=lambda pad: calls.append(pad) or 1, clock=clock)
    clock.now = 1000.0
    heap.after_step()
    heap.on_idle()
    assert not heap.enabled and calls == []


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


@pytest.mark.skipif(glibc_malloc_trim() is None, reason="not glibc")
def test_malloc_trim_hands_back_pages_freed_behind_a_live_chunk():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    # 64 chunks of 64 KiB (below the mmap threshold: in the heap), touched, then all but the
    # last freed: the live last chunk pins the heap's top, so only a trim returns the pages.
    chunks = [libc.malloc(64 * 1024) for _ in range(64)]
    for c in chunks:
        libc.memset(c, 1, 64 * 1024)
    for c in chunks[:-1]:
        libc.free(c)
    before = _rss_kb()
    clock = FakeClock()
    heap = HeapTrimmer(60.0, trim=glibc_malloc_trim(), clock=clock)
    clock.now = 60.0
    heap.after_step()
    after = _rss_kb()
    libc.free(chunks[-1])
    assert heap.num_trims == 1
    assert before - after >= 2 * 1024, (before, after)  # most of the 4 MiB came back
