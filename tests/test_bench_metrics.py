"""The serving metrics on known inputs: percentiles, TPOT, throughputs, goodput, and the
comparison's medians, targets and plots."""

from __future__ import annotations

import math

import pytest

from tokenmill.bench import report
from tokenmill.bench.serve import RequestResult
from tokenmill.errors import ConfigError
from tokenmill.workload.slo import SLO, parse_slo


def _result(ttft, latency, out, itl=(), ok=True, prompt=10, expected=None):
    return RequestResult(
        ok, prompt, out, expected if expected is not None else out, 0.0, ttft, latency, list(itl),
        num_chunks=out,
    )  # fmt: skip


def test_stat_matches_linear_interpolation_percentiles():
    s = report.Stat.of([0.001 * x for x in range(1, 101)])  # 1..100 ms
    assert s.count == 100
    assert s.mean == pytest.approx(50.5)
    assert s.median == pytest.approx(50.5)
    assert s.p90 == pytest.approx(90.1)  # 1 + 0.9 * 99
    assert s.p99 == pytest.approx(99.01)
    assert report.Stat.of([]) == report.Stat(0.0, 0.0, 0.0, 0.0, 0.0, 0)


def test_tpot_excludes_the_first_token_and_needs_two():
    r = _result(ttft=0.5, latency=1.5, out=11)
    assert r.tpot_s == pytest.approx(0.1)  # 1.0 s over 10 tokens after the first
    assert _result(0.5, 0.5, 1).tpot_s is None


def test_summarize_throughputs_and_failures():
    results = [
        _result(0.1, 1.1, 11, itl=[0.1] * 10, prompt=100),
        _result(0.3, 2.3, 21, itl=[0.1] * 20, prompt=50),
        _result(0.0, 0.0, 0, ok=False, prompt=999),
    ]
    m = report.summarize(results, duration_s=4.0, max_in_flight=3)
    assert (m.num_completed, m.num_failed, m.max_in_flight) == (2, 1, 3)
    assert m.total_input_tokens == 150 and m.total_output_tokens == 32
    assert m.request_throughput == pytest.approx(0.5)
    assert m.output_throughput == pytest.approx(8.0)
    assert m.total_token_throughput == pytest.approx(182 / 4)
    assert m.ttft.mean == pytest.approx(200.0)
    assert m.tpot.mean == pytest.approx(100.0)
    assert m.itl.count == 30 and m.itl.median == pytest.approx(100.0)
    assert m.e2el.median == pytest.approx(1700.0)
    assert m.goodput is None and m.output_len_mismatches == 0


def test_goodput_counts_requests_meeting_every_slo():
    results = [
        _result(0.1, 1.1, 11),  # ttft 100 ms, tpot 100 ms
        _result(0.6, 1.6, 11),  # ttft 600 ms: misses ttft:500
        _result(0.1, 2.1, 11),  # tpot 200 ms: misses tpot:150
    ]
    m = report.summarize(results, 2.0, parse_slo("ttft=500,tpot=150ms"))
    assert m.goodput == pytest.approx(0.5)  # one request in 2 s
    assert m.slo_ms == {"ttft": 500.0, "tpot": 150.0}
    m = report.summarize(results, 2.0, parse_slo("e2e=1.7s"))
    assert m.goodput == pytest.approx(1.0)
    itl = [_result(0.1, 1.1, 3, itl=[0.1, 0.9])]  # its longest gap misses itl=500ms
    assert report.summarize(itl, 1.0, parse_slo("itl=500ms")).goodput == 0.0


def test_output_len_mismatches_are_counted():
    m = report.summarize([_result(0.1, 1.0, 5, expected=8)], 1.0)
    assert m.output_len_mismatches == 1


def test_slo_syntax_takes_units_and_bare_milliseconds():
    slo = parse_slo("ttft=2s, tpot=100ms,itl=250,e2e=1.5e1s,pct=90")
    assert slo == SLO(ttft_s=2.0, tpot_s=0.1, itl_s=0.25, e2e_s=15.0, percentile=90.0)
    assert slo.describe() == "p90 ttft <= 2000 ms, tpot <= 100 ms, itl <= 250 ms, e2e <= 15000 ms"


@pytest.mark.parametrize(
    "bad, named",
    [("ttft", "'ttft'"), ("foo=3", "'foo=3'"), ("tpot=-1", "tpot"), ("ttft=0", "ttft"),
     ("ttft:500", "'ttft:500'"), ("ttft=5min", "'5min'"), ("pct=95", "'95'"), ("pct=99", "no target")],
)  # fmt: skip
def test_bad_slo_is_an_error_naming_the_bad_part(bad, named):
    with pytest.raises(ConfigError, match=named):
        parse_slo(bad)


def test_format_serve_markdown_has_every_metric():
    m = report.summarize([_result(0.1, 1.1, 11, itl=[0.1] * 10)], 1.0, SLO(ttft_s=0.5))
    text = report.format_serve_markdown(m, "t")
    for word in ("TTFT", "TPOT", "ITL", "E2EL", "goodput", "output tok/s"):
        assert word in text


def _serve_metrics(out_tok_s: float, ttft_p99: float) -> dict:
    stat = {"mean": 1.0, "median": 1.0, "p90": 1.0, "p99": ttft_p99, "std": 0.0, "count": 1}
    return {"output_throughput": out_tok_s, "ttft": stat, "tpot": stat, "itl": stat, "e2el": stat}


def _records():
    recs = []
    for rep, (tm, lc, hf) in enumerate([(100.0, 40.0, 10.0), (90.0, 50.0, 30.0), (110.0, 45, 20)]):
        for engine, v in (("tokenmill", tm), ("llama.cpp", lc), ("transformers", hf)):
            recs.append({"scenario": "offline", "engine": engine, "repetition": rep, "point": "",
                         "metrics": {"output_throughput": v}})  # fmt: skip
        recs.append({"scenario": "serve", "engine": "tokenmill", "repetition": rep, "point": "",
                     "metrics": _serve_metrics(tm, 500.0)})  # fmt: skip
        recs.append({"scenario": "serve", "engine": "llama.cpp", "repetition": rep, "point": "",
                     "metrics": _serve_metrics(lc, 900.0)})  # fmt: skip
        for point in ("1", "4"):
            recs.append({"scenario": "sweep-concurrency", "engine": "tokenmill",
                         "repetition": rep, "point": point, "metrics": _serve_metrics(tm, 5)})  # fmt: skip
            recs.append({"scenario": "sweep-rate", "engine": "llama.cpp",
                         "repetition": rep, "point": point, "metrics": _serve_metrics(lc, 5)})  # fmt: skip
    return recs


def test_compare_markdown_takes_medians_and_checks_targets():
    text = report.compare_markdown(_records())
    assert "| tokenmill | 100.0 | 3 |" in text  # median of 100, 90, 110
    assert "| llama.cpp | 45.0 | 3 |" in text
    assert "| offline out tok/s vs transformers | >= 5x | 5.00x | met |" in text
    assert "| offline out tok/s vs llama.cpp | >= 2x | 2.22x | met |" in text
    assert "| serve p99 TTFT vs llama-server | lower | 500 vs 900 ms | met |" in text


def test_compare_plots_are_written(tmp_path):
    paths = report.compare_plots(_records(), tmp_path)
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == [
        "latency_vs_rate.png",
        "throughput_vs_concurrency.png",
    ]
    assert all((tmp_path / p.rsplit("/", 1)[1]).stat().st_size > 1000 for p in paths)


def test_median_of_nothing_is_nan():
    assert math.isnan(report._median([]))
