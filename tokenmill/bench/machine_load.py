"""How much of this machine a measurement had: the load average, and the CPU time that other
processes took while it ran.

On a small machine whose cores torch's threads share by spin-waiting on each other, another
process taking a few percent of a core slows a step several times, so calibration and validation
count other processes' CPU time per measurement and drop, rerun or flag the disturbed ones.
"""

from __future__ import annotations

import os

DISTURBED_SHARE = 0.05  # of a core taken by other processes: the measurement is not this machine's
CPU_TICK_SLACK_S = 0.02  # /proc/stat and os.times() count in 10 ms ticks


def load_average() -> tuple[float, ...]:
    """The 1, 5 and 15 minute load averages, rounded to 0.01; () where the OS has none."""
    if not hasattr(os, "getloadavg"):
        return ()
    return tuple(round(x, 2) for x in os.getloadavg())


def describe_load() -> str:
    return " ".join(f"{x:.2f}" for x in load_average()) or "?"


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU-seconds every process has used, those of this process and its waited children),
    or None where /proc/stat is missing. Steal time counts as used by others."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


def process_cpu_seconds(pid: int) -> float:
    """CPU-seconds process `pid` (and its waited children) has used; 0.0 where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def others_cpu_since(before: tuple[float, float] | None, extra_own_s: float = 0.0) -> float | None:
    """CPU-seconds other processes used since `before` (`extra_own_s`: ours not counted by
    os.times(), such as a server subprocess still running)."""
    now = cpu_seconds()
    if before is None or now is None:
        return None
    return max(0.0, (now[0] - before[0]) - (now[1] - before[1]) - extra_own_s)


def is_disturbed(others_cpu_s: float | None, wall_s: float) -> bool:
    """Other processes took more than DISTURBED_SHARE of a core over `wall_s` seconds (beyond
    the CPU counters' tick)."""
    return others_cpu_s is not None and others_cpu_s > DISTURBED_SHARE * wall_s + CPU_TICK_SLACK_S
