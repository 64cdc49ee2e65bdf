"""The routers' state in this process: each replica's view (`prefix_index.ReplicaView`), the
routing decisions made, and the counters /metrics reports. One table per deployment, shared by
the Serve router (on the handle's event loop thread) and the ingress (its own thread)."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

from tokenmill.serve_ray.prefix_index import Candidate, ReplicaReport, ReplicaView, rank_by_prefix
from tokenmill.serve_ray.wire import ReplicaRequest

PREFIX_AWARE = "prefix-aware"
ROUND_ROBIN = "round-robin"
POLICIES = (PREFIX_AWARE, ROUND_ROBIN)


@dataclass(frozen=True)
class RoutingDecision:
    request_id: str
    replica: str  # where Serve sent it
    preferred: str  # the router's first choice (the same unless that replica was full)
    reason: str  # "prefix", "load" or "round-robin"
    num_matched: dict[str, int]  # leading prompt blocks per replica, in the router's view
    num_reported: dict[str, int]  # the same in the replicas' latest reports alone
    num_blocks: int  # full blocks of the prompt


class RoutingTable:
    """The routers' state in this process; every method may be called from any thread."""

    def __init__(self, max_decisions: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._views: dict[str, ReplicaView] = {}
        self._pending: dict[str, RoutingDecision] = {}  # chosen, not yet routed
        self.decisions: deque[RoutingDecision] = deque(maxlen=max_decisions)
        self.num_routed: Counter[tuple[str, str]] = Counter()  # (replica, reason)
        self._next_rr = 0

    def adopt(self, replica: str, stats: dict) -> None:
        report = ReplicaReport.from_dict(stats or {})
        if report is not None:
            with self._lock:
                self._views.setdefault(replica, ReplicaView()).adopt(report)

    def forget(self, replica: str) -> None:
        with self._lock:
            self._views.pop(replica, None)

    def rank(
        self, replicas: list[str], request: ReplicaRequest, policy: str, max_imbalance: int
    ) -> list[str]:
        """Replicas best first. The first is counted in flight at once: requests routed
        concurrently see each other before Serve reports where they went."""
        keys = request.block_keys
        with self._lock:
            self._unpend(request.request_id)
            views = [self._views.setdefault(r, ReplicaView()) for r in replicas]
            matched = {r: v.num_matched(keys) for r, v in zip(replicas, views, strict=True)}
            if policy == ROUND_ROBIN:
                start, self._next_rr = self._next_rr % len(replicas), self._next_rr + 1
                ranked, reason = replicas[start:] + replicas[:start], ROUND_ROBIN
            else:
                candidates = [
                    Candidate(r, matched[r], v.num_in_flight, v.num_blocks)
                    for r, v in zip(replicas, views, strict=True)
                ]
                ranked, reason = rank_by_prefix(candidates, max_imbalance)
            reported = {
                r: v.num_matched(keys, reported_only=True)
                for r, v in zip(replicas, views, strict=True)
            }
            self._views[ranked[0]].num_in_flight += 1
            self._pending[request.request_id] = RoutingDecision(
                request.request_id, "", ranked[0], reason, matched, reported, len(keys)
            )
        return ranked

    def on_routed(self, replica: str, request: ReplicaRequest | None) -> None:
        with self._lock:
            chosen = self._unpend(request.request_id) if request is not None else None
            view = self._views.setdefault(replica, ReplicaView())
            view.num_in_flight += 1
            if request is None:
                return
            view.note_routed(request.block_keys, time.time())
            if chosen is not None:
                decision = RoutingDecision(**{**vars(chosen), "replica": replica})
                self.decisions.append(decision)
                self.num_routed[(replica, decision.reason)] += 1

    def _unpend(self, request_id: str) -> RoutingDecision | None:
        """Take back a decision's in-flight count (the lock is held)."""
        chosen = self._pending.pop(request_id, None)
        view = self._views.get(chosen.preferred) if chosen is not None else None
        if view is not None and view.num_in_flight > 0:
            view.num_in_flight -= 1
        return chosen

    def on_completed(self, replica: str) -> None:
        with self._lock:
            view = self._views.get(replica)
            if view is not None and view.num_in_flight > 0:
                view.num_in_flight -= 1

    def reports(self) -> dict[str, ReplicaReport]:
        with self._lock:
            return {r: v.report for r, v in self._views.items() if v.report is not None}


_TABLES: dict[str, RoutingTable] = {}
_TABLES_LOCK = threading.Lock()


def routing_table(name: str) -> RoutingTable:
    """The table of the deployment `name` in this process (created on first use)."""
    with _TABLES_LOCK:
        return _TABLES.setdefault(name, RoutingTable())
