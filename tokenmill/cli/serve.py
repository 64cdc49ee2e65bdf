"""`tokenmill serve [MODEL]`: the OpenAI-compatible HTTP server (loopback by default)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading

from tokenmill.cli.engine_args import add_engine_args, engine_config_from_args
from tokenmill.errors import ConfigError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (/v1/completions, ...)"
    )
    add_engine_args(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on")
    group.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free)")
    group.add_argument(
        "--max-queue", type=int, default=256,
        help="most requests waiting to be scheduled; beyond it requests get 429",
    )  # fmt: skip
    group.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    group.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413"
    )
    group.add_argument(
        "--served-model-name", default=None,
        help="the model name clients send (default: the model file or folder name)",
    )  # fmt: skip
    group.add_argument(
        "--shutdown-timeout", type=float, default=10.0,
        help="seconds in-flight requests may finish after SIGTERM before they are aborted",
    )  # fmt: skip
    group.add_argument(
        "--header-timeout", type=float, default=10.0,
        help="seconds a connection may take to send a request's line and headers (then 408)",
    )  # fmt: skip
    group.add_argument(
        "--body-timeout", type=float, default=30.0,
        help="seconds a request may take to send its body (then 408)",
    )  # fmt: skip
    group.add_argument(
        "--max-connections", type=int, default=1024,
        help="most open connections; more are answered 503 and closed",
    )  # fmt: skip
    group.add_argument("--access-log", action="store_true", help="log every HTTP request")
    group.add_argument(
        "--step-trace", default=None, metavar="PATH",
        help="record every engine step (batch shape, wall time) and write them to PATH as "
        "JSON lines when the server stops (for `tokenmill plan`: memory grows with the steps)",
    )  # fmt: skip
    replicas = parser.add_argument_group("replicas (Ray Serve; pip install 'tokenmill[ray]')")
    replicas.add_argument(
        "--replicas", type=int, default=0,
        help="serve N engine replicas on Ray Serve behind this server (0: one engine in-process)",
    )  # fmt: skip
    replicas.add_argument(
        "--ray-address", default=None,
        help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting one",
    )  # fmt: skip
    replicas.add_argument(
        "--routing", default="prefix-aware", choices=["prefix-aware", "round-robin"],
        help="which replica gets a request: the one caching its longest prefix, or in turn",
    )  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill import native
    from tokenmill.server import ServerConfig, create_app
    from tokenmill.server.launch import run_server

    _check_args(args)
    sock = _bind(args.host, args.port)  # before the slow model load: a busy port fails fast
    engine_config = engine_config_from_args(args, max_waiting=args.max_queue)
    if args.step_trace:
        engine_config = dataclasses.replace(engine_config, record_step_trace=True)
    config = ServerConfig(
        model_name=args.served_model_name or served_model_name(args.model),
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        shutdown_timeout_s=args.shutdown_timeout,
        max_queue=args.max_queue,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        max_connections=args.max_connections,
    )
    if args.replicas:
        return _run_replicas(args, sock, engine_config, config)
    app = create_app(None, config, model_root=args.model)
    startup = _EngineStartup(app, engine_config, args.step_trace)
    if native.needs_build():
        # Minutes of compiling: listen meanwhile, /health answering "starting".
        logger.warning("%s; /health answers 'starting' until then", native.build_notice())
        startup.start()
    else:
        startup.run()
    _print_banner(args.host, sock.getsockname()[1], config)
    code = run_server(
        app,
        sock,
        log_level=args.log_level.lower(),
        access_log=args.access_log,
        shutdown_timeout_s=args.shutdown_timeout,
    )
    if startup.trace is not None:
        startup.trace.flush()
    return 1 if startup.failed else code


def _run_replicas(args: argparse.Namespace, sock: socket.socket, engine_config, config) -> int:
    from tokenmill.serve_ray.cluster import ReplicaSetConfig, start_replica_app, stop_replicas
    from tokenmill.server.launch import run_server

    replica_config = ReplicaSetConfig(
        num_replicas=args.replicas, ray_address=args.ray_address, routing=args.routing
    )
    app = start_replica_app(engine_config, config, replica_config, model_root=args.model)
    _print_banner(args.host, sock.getsockname()[1], config)
    try:
        return run_server(
            app, sock, log_level=args.log_level.lower(), access_log=args.access_log,
            shutdown_timeout_s=args.shutdown_timeout,
        )  # fmt: skip
    finally:
        stop_replicas(replica_config)


class _EngineStartup:
    """Builds the AsyncEngine (the native kernels first) and hands it to the app: before the
    server listens, or on a thread of its own while the server answers 503 "starting"."""

    def __init__(self, app, engine_config, trace_path: str | None) -> None:
        self.app, self.engine_config, self.trace_path = app, engine_config, trace_path
        self.trace: _TraceWriter | None = None
        self.failed = False

    def run(self) -> None:
        from tokenmill import native
        from tokenmill.engine.async_engine import AsyncEngine
        from tokenmill.server.app import attach_engine

        native.kernels()  # compiles them if they are not built yet (a subprocess: no torch work)
        engine = AsyncEngine.from_config(self.engine_config)
        if self.trace_path:
            self.trace = _TraceWriter(self.trace_path, engine.step_trace)
            engine.idle_hook = self.trace.flush
        attach_engine(self.app, engine)

    def start(self) -> None:
        threading.Thread(target=self._run_or_stop, name="tokenmill-startup", daemon=True).start()

    def _run_or_stop(self) -> None:
        try:
            self.run()
        except Exception:
            logger.exception("the engine failed to start; stopping the server")
            self.failed = True
            os.kill(os.getpid(), signal.SIGTERM)


class _TraceWriter:
    """`--step-trace`: the engine's step records appended to the file whenever the engine goes
    idle (so a client can read a finished run's steps while the server runs) and at exit."""

    def __init__(self, path: str, records: list) -> None:
        from tokenmill.perf.trace import write_trace

        self.path, self.records, self.written = path, records, 0
        self._lock = threading.Lock()
        write_trace(path, [])

    def flush(self) -> None:
        from tokenmill.perf.trace import write_trace

        with self._lock:
            new = self.records[self.written :]
            if new:
                write_trace(self.path, new, mode="a")
                self.written += len(new)


def served_model_name(model: str | None) -> str:
    """The name clients use for the model: its file or folder name, without `.gguf`."""
    if model is None:
        return DEFAULT_MODEL_NAME
    name = os.path.basename(os.path.normpath(model))
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    folder = os.path.dirname(os.path.abspath(args.step_trace)) if args.step_trace else None
    if folder is not None and not os.path.isdir(folder):
        raise ConfigError(f"--step-trace: folder {folder} does not exist")
    if args.max_queue < 1:
        raise ConfigError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.max_body_bytes < 1024:
        raise ConfigError(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")
    for flag in ("header_timeout", "body_timeout"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if args.max_connections < 1:
        raise ConfigError(f"--max-connections must be >= 1, got {args.max_connections}")
    if args.shutdown_timeout < 0:
        raise ConfigError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.replicas < 0:
        raise ConfigError(f"--replicas must be >= 0, got {args.replicas}")
    if args.replicas and args.step_trace:
        raise ConfigError("--step-trace records one in-process engine: not with --replicas")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(2048)
    return sock


def _print_banner(host: str, port: int, config) -> None:
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::", "::1") else host
    base = f"http://{shown}:{port}"
    key = config.api_key or "EMPTY"
    auth = f" -H 'Authorization: Bearer {config.api_key}'" if config.api_key else ""
    print(
        f"tokenmill serving '{config.model_name}' on {base}\n"
        f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        f'    -d \'{{"model": "{config.model_name}", '
        f'"messages": [{{"role": "user", "content": "Hello!"}}]}}\'\n'
        f'  python -c "from openai import OpenAI; '
        f"c = OpenAI(base_url='{base}/v1', api_key='{key}'); "
        f"print(c.chat.completions.create(model='{config.model_name}', "
        f"messages=[{{'role': 'user', 'content': 'Hello!'}}]).choices[0].message.content)\"\n"
        f"  health: {base}/health   metrics: {base}/metrics   (Ctrl-C or SIGTERM stops it)",
        flush=True,
    )
    sys.stdout.flush()
