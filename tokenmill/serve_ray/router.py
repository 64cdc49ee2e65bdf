"""Ray Serve request routers for the replicas: prefix-aware (default) and round-robin.

Serve runs a router inside every process that holds a handle to the deployment (here the
ingress), on the handle's own event loop thread, and asks it for each request which replicas to
try, best first (`choose_replicas`). The routers keep what they learn in a `RoutingTable`, one
per deployment in the process, which the ingress reads too: the replicas' latest reports (for
the merged /metrics) and the decisions made (for the router's own counters and the tests).

Serve pickles this module by value (its copy of the class is what each handle runs), so the
table lives in `routing_table.py`, which is imported by reference: one table per process.

    request (block keys) -> views of the replicas (report | routed) -> rank_by_prefix
                         -> Serve sends it to the first replica that has room
                         -> on_request_routed: in flight + 1, its keys routed to that replica
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from tokenmill.serve_ray.routing_table import POLICIES, PREFIX_AWARE, routing_table
from tokenmill.serve_ray.wire import ReplicaRequest


class ReplicaRouter(RequestRouter):
    """Prefix-aware or round-robin routing of `EngineReplica.generate` calls."""

    def initialize_state(
        self, table: str = "tokenmill", policy: str = PREFIX_AWARE, max_imbalance: int = 4
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {POLICIES}, got {policy!r}")
        self.table = routing_table(table)
        self.policy = policy
        self.max_imbalance = max_imbalance

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        for replica_id, replica in by_id.items():
            self.table.adopt(replica_id, replica.routing_stats)
        request = _replica_request(pending_request)
        ids = sorted(by_id)
        if request is None:  # not a generate call (info): the least loaded first
            return [[by_id[i]] for i in ids]
        ranked = self.table.rank(ids, request, self.policy, self.max_imbalance)
        return [[by_id[ranked[0]]], [by_id[i] for i in ranked[1:]]]

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        for replica in replicas:
            self.table.adopt(replica.replica_id.unique_id, replica.routing_stats)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result):
        self.table.on_routed(replica_id.unique_id, _replica_request(pending_request))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.table.on_completed(replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget(replica_id.unique_id)


def _replica_request(pending_request: PendingRequest | None) -> ReplicaRequest | None:
    if pending_request is None:
        return None
    for arg in pending_request.args:
        if isinstance(arg, ReplicaRequest):
            return arg
    return None
