"""Prometheus metrics under the `tokenmill:` prefix, named as vLLM names them.

    gauges      tokenmill:num_requests_running, tokenmill:num_requests_waiting,
                tokenmill:kv_cache_usage_perc (a fraction, 0..1, as in vLLM)
    counters    tokenmill:prefix_cache_queries_total, tokenmill:prefix_cache_hits_total (tokens),
                tokenmill:prompt_tokens_total, tokenmill:generation_tokens_total,
                tokenmill:num_preemptions_total,
                tokenmill:engine_steps_total, tokenmill:engine_step_seconds_total,
                tokenmill:engine_prompt_step_seconds_total,
                tokenmill:engine_loop_seconds_total (tokenmill's own),
                tokenmill:request_success_total{finished_reason="stop|length|abort|error"},
                latency promises: tokenmill:slo_* and tokenmill:step_time_* (slo_metrics.py),
                speculative decoding: tokenmill:spec_decode_* (spec_metrics.py)
    histograms  tokenmill:time_to_first_token_seconds, tokenmill:inter_token_latency_seconds,
                tokenmill:e2e_request_latency_seconds

Every metric carries a `model_name` label. Each app has its own CollectorRegistry, so several
servers can live in one process (tests). Engine-wide values are read from the async engine's
snapshot at scrape time; per-request latencies arrive as observer events from the loop thread.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.server.slo_metrics import slo_families
from tokenmill.server.spec_metrics import spec_families

PREFIX = "tokenmill:"
FINISH_REASONS = ("stop", "length", "abort", "error")

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)  # fmt: skip
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)  # fmt: skip


class ServerMetrics:
    """The app's registry; also the RequestObserver the async engine reports latencies to."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self._ttft = Histogram(
            f"{PREFIX}time_to_first_token_seconds", "Time to first token in seconds.",
            labels, buckets=_TTFT_BUCKETS, registry=self.registry,
        ).labels(model_name)  # fmt: skip
        self._itl = Histogram(
            f"{PREFIX}inter_token_latency_seconds", "Time between output tokens in seconds.",
            labels, buckets=_ITL_BUCKETS, registry=self.registry,
        ).labels(model_name)  # fmt: skip
        self._e2e = Histogram(
            f"{PREFIX}e2e_request_latency_seconds", "End-to-end request latency in seconds.",
            labels, buckets=_E2E_BUCKETS, registry=self.registry,
        ).labels(model_name)  # fmt: skip
        success = Counter(
            f"{PREFIX}request_success", "Finished requests by finish reason.",
            ["model_name", "finished_reason"], registry=self.registry,
        )  # fmt: skip
        self._success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self.registry.register(_EngineCollector(engine, model_name))
        engine.add_observer(self)

    def on_first_token(self, ttft_s: float) -> None:
        self._ttft.observe(ttft_s)

    def on_inter_token(self, itl_s: float) -> None:
        self._itl.observe(itl_s)

    def on_finished(self, finish_reason: str, e2e_s: float) -> None:
        counter = self._success.get(finish_reason)
        if counter is not None:
            counter.inc()
        self._e2e.observe(e2e_s)

    def render(self) -> bytes:
        """The Prometheus text exposition of this app's metrics."""
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Engine-wide gauges and counters, read from the engine's latest snapshot at scrape time."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self._engine = engine
        self._model_name = model_name

    def collect(self):
        serving = self._engine.stats()
        stats = serving.engine
        labels = [self._model_name]
        gauges = (
            ("num_requests_running", "Requests in the running batch.", stats.num_running),
            ("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).",
             stats.kv_cache_usage),
        )  # fmt: skip
        for name, doc, value in gauges:
            family = GaugeMetricFamily(f"{PREFIX}{name}", doc, labels=["model_name"])
            family.add_metric(labels, value)
            yield family
        counters = (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             stats.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             stats.prefix_cache_hits),
            ("prompt_tokens", "Prompt tokens of started requests.", stats.num_prompt_tokens),
            ("generation_tokens", "Tokens generated.", stats.num_generation_tokens),
            ("num_preemptions", "Requests preempted to free KV-cache blocks.",
             stats.num_preemptions),
            ("engine_steps", "Engine steps that ran the model.", stats.num_model_steps),
            ("engine_step_seconds", "Wall time spent in engine steps.",
             serving.step_time_total_s),
            ("engine_prompt_step_seconds", "Wall time of the engine steps that computed prompt "
             "tokens.", stats.prompt_step_time_s),
            ("engine_loop_seconds", "Wall time of the engine loop's iterations that ran a step: "
             "the step, taking in new requests, handing out outputs.",
             serving.loop_time_total_s),
        )  # fmt: skip
        for name, doc, value in counters:
            family = CounterMetricFamily(f"{PREFIX}{name}", doc, labels=["model_name"])
            family.add_metric(labels, value)
            yield family
        yield from slo_families(stats.slo, self._model_name)
        yield from spec_families(stats.spec, self._model_name)
