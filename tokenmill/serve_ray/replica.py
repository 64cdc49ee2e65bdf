"""One replica: an AsyncEngine inside a Ray Serve replica actor.

The engine's torch work runs on its own engine thread with `num_threads` torch/OpenMP threads
(one by default): two replicas on two cores each keep one core busy instead of two OpenMP
teams of two fighting over both (libgomp stops spin-waiting once teams outnumber the cores).

Serve calls `record_routing_stats` every stats period; what it returns reaches the routers of
every handle to this deployment (`RunningReplica.routing_stats`), with the replica's Prometheus
text for the ingress to merge. `check_health` failing makes Serve replace the replica.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.request_stream import EngineInternalError, EngineStoppedError
from tokenmill.serve_ray.prefix_index import ReplicaReport, block_key
from tokenmill.serve_ray.wire import Accepted, Failed, Refused, ReplicaRequest, WireError


def build_engine_with_threads(config: EngineConfig, num_threads: int):
    """Runs on the engine thread: torch's thread count is set there, before any torch work."""
    import torch

    from tokenmill.engine.build import build_engine

    torch.set_num_threads(num_threads)
    return build_engine(config)


class EngineReplica:
    """The deployment's class (wrapped by `serve.deployment` in `cluster.py`)."""

    def __init__(self, engine_config: EngineConfig, model_name: str, num_threads: int = 1) -> None:
        from ray import serve

        from tokenmill.server.metrics import ServerMetrics

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.engine = AsyncEngine(
            build=lambda: build_engine_with_threads(engine_config, num_threads)
        )
        self.metrics = ServerMetrics(self.engine, model_name)
        self.block_size = engine_config.cache.block_size

    async def generate(self, request: ReplicaRequest) -> AsyncIterator[object]:
        """Accepted or Refused first; then the request's outputs (or Failed). Cancelling the
        call (the client went away) aborts the request here."""
        try:
            stream = await self.engine.add_request(
                request.request_id, request.prompt_token_ids, request.params,
                request.priority, request.output_kind, request.slo, request.arrival_time,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the caller raises it as its own
            yield Refused(WireError.of(exc))
            return
        yield Accepted(self.replica_id)
        try:
            async for output in stream:
                yield output
        except (EngineStoppedError, EngineInternalError) as exc:
            yield Failed(WireError.of(exc))
        finally:
            stream.abort()

    def info(self) -> dict:
        return {
            "replica_id": self.replica_id,
            "max_model_len": self.engine.max_model_len,
            "block_size": self.block_size,
        }

    def record_routing_stats(self) -> dict:
        stats = self.engine.stats().engine
        report = ReplicaReport(
            time=time.time(),
            block_keys=tuple(block_key(h) for h in self.engine.prefix_cache_hashes()),
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            kv_cache_usage=stats.kv_cache_usage,
            metrics_text=self.metrics.render().decode(),
        )
        # Plain data: Serve's controller unpickles it on its way to the routers.
        return report.to_dict()

    def check_health(self) -> None:
        if not self.engine.is_running:
            raise RuntimeError(f"replica {self.replica_id}: the engine loop is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
