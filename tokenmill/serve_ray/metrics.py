"""/metrics of the ingress: every replica's own metrics with a `replica` label, and the router's.

Each replica renders its `ServerMetrics` (the same families as `tokenmill serve`) into its
routing report; the ingress parses the latest report of each replica and adds `replica="<id>"`
to every sample, so one scrape shows all replicas (at most one stats period old) and
`sum by (...)` gives the whole. The router adds its own:

    tokenmill:router_requests_total{replica, reason}   reason: prefix | load | round-robin
    tokenmill:router_resent_requests_total              sent again after their replica was lost
    tokenmill:router_replicas                           replicas that have reported
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from tokenmill.serve_ray.remote_engine import ReplicaSetEngine
from tokenmill.server.metrics import PREFIX


class ReplicaSetMetrics:
    """The `metrics` of the ingress's ServerState: `render()` as ServerMetrics has it."""

    def __init__(self, engine: ReplicaSetEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_MergedCollector(engine, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _MergedCollector(Collector):
    def __init__(self, engine: ReplicaSetEngine, model_name: str) -> None:
        self._engine = engine
        self._model_name = model_name

    def collect(self):
        reports = self._engine.table.reports()
        yield from merge_with_label({r: rep.metrics_text for r, rep in reports.items()})
        yield from self._router_families(len(reports))

    def _router_families(self, num_replicas: int):
        name = self._model_name
        routed = CounterMetricFamily(
            f"{PREFIX}router_requests", "Requests routed, by replica and reason.",
            labels=["model_name", "replica", "reason"],
        )  # fmt: skip
        for (replica, reason), count in sorted(self._engine.table.num_routed.items()):
            routed.add_metric([name, replica, reason], count)
        yield routed
        resent = CounterMetricFamily(
            f"{PREFIX}router_resent_requests", "Requests sent again after their replica was lost.",
            labels=["model_name"],
        )  # fmt: skip
        resent.add_metric([name], self._engine.num_resent)
        yield resent
        replicas = GaugeMetricFamily(
            f"{PREFIX}router_replicas", "Replicas that have reported.", labels=["model_name"]
        )
        replicas.add_metric([name], num_replicas)
        yield replicas


def merge_with_label(texts: dict[str, str], label: str = "replica") -> list[Metric]:
    """The families of several Prometheus expositions, each sample labelled with its source."""
    merged: dict[str, Metric] = {}
    for source, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                labels = {**sample.labels, label: source}
                into.add_sample(sample.name, labels, sample.value, sample.timestamp)
    return list(merged.values())
