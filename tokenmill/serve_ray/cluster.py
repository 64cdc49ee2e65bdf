"""Starting the replicas on Ray Serve and the ingress app in front of them.

    start_ray(config)                  a local Ray instance sized for this machine, or join
                                       `ray_address`'s cluster
    deploy_replicas(engine, config)    Serve deployment of EngineReplicas with ReplicaRouter
                                       -> ReplicaSetEngine (the ingress's engine)
    create_replica_app(engine, ...)    tokenmill's own FastAPI app (routes, errors, streaming)
                                       over the ReplicaSetEngine, /metrics merged

The ingress runs in the calling process (`tokenmill serve` listens there as it always does);
Serve's HTTP proxy is off. The same code joins a multi-node cluster: replicas go wherever Ray
has CPUs for them (each node needs tokenmill and the model installed).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass

from tokenmill.config import EngineConfig
from tokenmill.errors import ConfigError
from tokenmill.serve_ray.routing_table import PREFIX_AWARE, routing_table

logger = logging.getLogger(__name__)

_ROUTER_CLASS = "tokenmill.serve_ray.router.ReplicaRouter"


@dataclass(frozen=True)
class ReplicaSetConfig:
    num_replicas: int = 2
    ray_address: str | None = None  # None: start a local Ray instance
    routing: str = PREFIX_AWARE
    num_threads: int = 1  # torch threads (and Ray CPUs) per replica
    # Prefix affinity gives way to the least loaded replica past this many more requests.
    max_imbalance: int = 4
    stats_period_s: float = 0.25  # how often replicas report their cache and metrics
    app_name: str = "tokenmill"
    max_ongoing_requests: int = 256  # per replica; beyond it requests wait in the router
    object_store_mib: int = 128  # a local instance's object store (outputs are small)


def start_ray(config: ReplicaSetConfig) -> None:
    """Connect to `ray_address`, or start a local instance: no dashboard, no usage stats, a
    small object store, its files under the temporary directory."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if config.ray_address:
        ray.init(address=config.ray_address, logging_level=logging.WARNING)
        return
    num_cpus = max(os.cpu_count() or 1, config.num_replicas * config.num_threads)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=config.object_store_mib << 20,
        _temp_dir=os.path.join(tempfile.gettempdir(), f"tokenmill-ray-{os.getuid()}"),
        logging_level=logging.WARNING,
    )


def deploy_replicas(engine_config: EngineConfig, model_name: str, config: ReplicaSetConfig):
    """Deploy the replicas (waits until every one has loaded the model); the ingress engine."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from tokenmill.loader.registry import open_model
    from tokenmill.serve_ray.remote_engine import ReplicaSetEngine
    from tokenmill.serve_ray.replica import EngineReplica

    start_ray(config)
    serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
    threads = str(config.num_threads)
    deployment = serve.deployment(
        EngineReplica,
        name="EngineReplica",
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={
            "num_cpus": config.num_threads,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}},
        },
        logging_config={"log_level": "WARNING", "enable_access_log": False},
        request_router_config=RequestRouterConfig(
            request_router_class=_ROUTER_CLASS,
            request_router_kwargs={
                "table": config.app_name,
                "policy": config.routing,
                "max_imbalance": config.max_imbalance,
            },
            request_routing_stats_period_s=config.stats_period_s,
        ),
    )
    app = deployment.bind(engine_config, model_name, config.num_threads)
    handle = serve.run(app, name=config.app_name, route_prefix=None)
    info = handle.info.remote().result()
    loaded = open_model(engine_config.model)  # the tokenizer only: weights load lazily
    return ReplicaSetEngine(
        handle, routing_table(config.app_name), loaded.tokenizer, info["max_model_len"],
        info["block_size"],
    )  # fmt: skip


def create_replica_app(engine, server_config, model_root: str | None = None):
    """`tokenmill serve`'s app over the replicas: the same routes, errors and streaming."""
    from tokenmill.serve_ray.metrics import ReplicaSetMetrics
    from tokenmill.server.app import create_app
    from tokenmill.server.state import ServerState
    from tokenmill.tokenizer.chat_template import end_of_turn_token_ids

    app = create_app(None, server_config, model_root=model_root)
    if engine.tokenizer is not None and engine.tokenizer.chat_template is not None:
        end_of_turn_token_ids(engine.tokenizer)
    app.state.tokenmill = ServerState(
        engine=engine,
        config=server_config,
        metrics=ReplicaSetMetrics(engine, server_config.model_name),
        tokenizer=engine.tokenizer,
        max_model_len=engine.max_model_len,
        model_root=model_root,
    )
    return app


def start_replica_app(engine_config, server_config, config: ReplicaSetConfig, model_root=None):
    """`tokenmill serve --replicas N`: the replicas deployed, the ingress app over them."""
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        raise ConfigError("--replicas needs Ray Serve: pip install 'tokenmill[ray]'") from exc
    engine = deploy_replicas(
        engine_config_for_replicas(engine_config), server_config.model_name, config
    )
    logger.warning("%d replicas on Ray Serve, %s routing", config.num_replicas, config.routing)
    return create_replica_app(engine, server_config, model_root)


def stop_replicas(config: ReplicaSetConfig) -> None:
    """A local Ray instance is stopped whole (its processes may have had the terminal's
    Ctrl-C already); on a joined cluster the deployment is deleted, without waiting."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        if config.ray_address:
            serve.delete(config.app_name, _blocking=False)
    finally:
        ray.shutdown()


def engine_config_for_replicas(engine_config: EngineConfig) -> EngineConfig:
    """The replicas' config: the engine's own; a step trace stays off (it would grow unread)."""
    return dataclasses.replace(engine_config, record_step_trace=False)
