"""The router's view of each replica's prefix cache, and the choice between cache and load.

    replica report (every stats period)   keys of every block in its prefix cache, its load
    routed since then                      keys of the prompts the router sent it (optimistic:
                                           a prompt's blocks are cached once it is scheduled)
    view = reported | routed               a prompt's match: its longest run of leading keys
                                           found in the view, in blocks

A key is the first 8 bytes of the engine's own block hash (`prefix_block_hashes`: blake2b chained
over the block's tokens), so equal keys mean equal prefixes and a report of a few thousand blocks
is tens of kilobytes. Routed keys older than the grace period are dropped once a newer report is
in: the report says what the replica really kept (LRU eviction included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from tokenmill.engine.kv_cache_manager import prefix_block_hashes

# Routed keys stay in a view this long past a report taken after they were routed: the prompt
# may still be queued (not yet cached) when the report is taken.
ROUTED_GRACE_S = 5.0


def block_keys(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The prompt's full-block keys, as a replica's report lists them."""
    return [block_key(h) for h in prefix_block_hashes(list(token_ids), block_size)]


def block_key(block_hash: bytes) -> int:
    return int.from_bytes(block_hash[:8], "little")


@dataclass(frozen=True)
class ReplicaReport:
    """What a replica reports: `time` is its wall clock (time.time()) when it was taken."""

    time: float
    block_keys: tuple[int, ...]
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    metrics_text: str = ""  # its Prometheus exposition, merged by the ingress

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> ReplicaReport | None:
        if "time" not in data:
            return None  # not reported yet
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class ReplicaView:
    """One replica as the router sees it."""

    reported: frozenset[int] = frozenset()
    report: ReplicaReport | None = None
    routed: dict[int, float] = field(default_factory=dict)  # key -> wall time routed
    num_in_flight: int = 0  # requests this router sent it that have not completed

    def adopt(self, report: ReplicaReport) -> bool:
        """Take a newer report; False if it is not newer than the one held."""
        if self.report is not None and report.time <= self.report.time:
            return False
        self.report = report
        self.reported = frozenset(report.block_keys)
        cutoff = report.time - ROUTED_GRACE_S
        self.routed = {k: t for k, t in self.routed.items() if t > cutoff}
        return True

    def note_routed(self, keys: Sequence[int], now: float) -> None:
        for key in keys:
            self.routed[key] = now

    def num_matched(self, keys: Sequence[int], reported_only: bool = False) -> int:
        """Leading blocks of `keys` this replica holds (in its report, or routed to it)."""
        num = 0
        for key in keys:
            if key not in self.reported and (reported_only or key not in self.routed):
                break
            num += 1
        return num

    @property
    def num_blocks(self) -> int:
        return len(self.reported) + len(self.routed)


@dataclass(frozen=True)
class Candidate:
    replica: str
    num_matched: int  # leading blocks of the prompt in its view
    load: int  # requests in flight
    num_blocks: int = 0  # blocks in its view (the tie-break: spread new prefixes)


def rank_by_prefix(candidates: Sequence[Candidate], max_imbalance: int) -> tuple[list[str], str]:
    """Replicas best first, and why the first: "prefix" (the longest cached prefix among the
    replicas whose load is within `max_imbalance` of the least loaded) or "load" (no cached
    prefix there: the least loaded, then the emptiest cache)."""
    least = min(c.load for c in candidates)
    allowed = [c for c in candidates if c.load - least <= max_imbalance]
    best = max(allowed, key=lambda c: (c.num_matched, -c.load, -c.num_blocks))
    if best.num_matched == 0:
        best = min(candidates, key=lambda c: (c.load, c.num_blocks))
    rest = sorted((c for c in candidates if c is not best), key=lambda c: (c.load, -c.num_matched))
    return [best.replica] + [c.replica for c in rest], "prefix" if best.num_matched else "load"
