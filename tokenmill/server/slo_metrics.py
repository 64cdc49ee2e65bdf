"""Prometheus families of the engine's latency promises (engine/slo_stats.py):

    tokenmill:slo_attained_total{kind="ttft|tpot", class="<priority>|best_effort"}
    tokenmill:slo_missed_total{kind, class}
    tokenmill:slo_good_requests_total, tokenmill:slo_good_tokens_total   (goodput: rate() them)
    tokenmill:slo_refused_total{reason="ttft|tpot|capacity|ttft_expired"}
    tokenmill:step_time_predicted_seconds_total{kind="prompt|decode|verify"}, ..._measured_..., and
    tokenmill:step_time_prediction_abs_error_seconds_total{kind}; the last step's predicted
    minus measured time: the gauge tokenmill:step_time_prediction_error_seconds{kind}
    tokenmill:slo_ttft_predictions_total, ..._ttft_predicted_seconds_total, ..._measured_...:
    promised requests' first tokens, the TTFT their admission predicted and the one measured;
    tokenmill:slo_ttft_measured_over_predicted (histogram): each one's measured / predicted TTFT

Read from the engine's snapshot at scrape time, like the other engine-wide families.
"""

from __future__ import annotations

from itertools import accumulate

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from tokenmill.engine.slo_stats import TTFT_RATIO_BOUNDS, SloSnapshot

PREFIX = "tokenmill:"


def _labelled_counter(name, doc, labels, values, model_name):
    family = CounterMetricFamily(f"{PREFIX}{name}", doc, labels=["model_name", *labels])
    for key, value in sorted(values.items()):
        family.add_metric([model_name, *(key if isinstance(key, tuple) else (key,))], value)
    return family


def slo_families(slo: SloSnapshot, model_name: str):
    yield _labelled_counter("slo_attained", "Finished requests that met a latency target.",
                            ["kind", "class"], slo.attained, model_name)  # fmt: skip
    yield _labelled_counter("slo_missed", "Finished requests that missed a latency target.",
                            ["kind", "class"], slo.missed, model_name)  # fmt: skip
    yield _labelled_counter("slo_refused", "Requests refused: their SLO could not be met.",
                            ["reason"], slo.refused, model_name)  # fmt: skip
    for name, doc, value in (
        ("slo_good_requests", "Finished requests that met every target they set.",
         slo.num_good_requests),
        ("slo_good_tokens", "Output tokens of the requests that met every target.",
         slo.num_good_tokens),
    ):  # fmt: skip
        family = CounterMetricFamily(f"{PREFIX}{name}", doc, labels=["model_name"])
        family.add_metric([model_name], value)
        yield family
    pred = slo.step_prediction
    for field, doc in (
        ("predicted_s", "Predicted step time, summed."),
        ("measured_s", "Measured step time, summed."),
        ("abs_error_s", "Absolute difference of predicted and measured step time, summed."),
    ):
        name = {"predicted_s": "step_time_predicted_seconds",
                "measured_s": "step_time_measured_seconds",
                "abs_error_s": "step_time_prediction_abs_error_seconds"}[field]  # fmt: skip
        values = {kind: getattr(stats, field) for kind, stats in pred.items()}
        yield _labelled_counter(name, doc, ["kind"], values, model_name)
    gauge = GaugeMetricFamily(
        f"{PREFIX}step_time_prediction_error_seconds",
        "The last step's predicted minus measured time.", labels=["model_name", "kind"],
    )  # fmt: skip
    for kind, stats in sorted(pred.items()):
        gauge.add_metric([model_name, kind], stats.last_error_s)
    yield gauge
    ttft = slo.ttft_prediction
    for name, doc, value in (
        ("slo_ttft_predictions", "Promised requests' first tokens.", ttft.num_steps),
        ("slo_ttft_predicted_seconds", "The TTFT their admission predicted, summed.",
         ttft.predicted_s),
        ("slo_ttft_measured_seconds", "Their measured TTFT, summed.", ttft.measured_s),
    ):  # fmt: skip
        family = CounterMetricFamily(f"{PREFIX}{name}", doc, labels=["model_name"])
        family.add_metric([model_name], value)
        yield family
    ratio = HistogramMetricFamily(
        f"{PREFIX}slo_ttft_measured_over_predicted",
        "Promised requests' measured TTFT over the one their admission predicted.",
        labels=["model_name"],
    )
    cumulative = list(accumulate(slo.ttft_ratio_counts))
    ratio.add_metric([model_name], [(f"{b:g}" if b != float("inf") else "+Inf", n)
                                    for b, n in zip(TTFT_RATIO_BOUNDS, cumulative, strict=True)],
                     sum_value=slo.ttft_ratio_sum)  # fmt: skip
    yield ratio
