"""Serving metrics from per-request results, and their markdown and JSON forms.

Percentiles interpolate linearly between samples (numpy's default), as vLLM's serving benchmark
does, so numbers compare across tools. ITL statistics pool every gap of every request; TTFT,
TPOT and end-to-end latency take one sample per completed request (TPOT only from requests with
at least two output tokens). Goodput counts the completed requests that met every SLO target
given (tokenmill.workload.slo).
"""

from __future__ import annotations

import os
import platform
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from tokenmill.bench.machine_load import load_average
from tokenmill.bench.serve import LoadRun, RequestResult
from tokenmill.platform_info import cpu_model_name
from tokenmill.workload.slo import SLO

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Stat:
    """A latency distribution in milliseconds."""

    mean: float
    median: float
    p90: float
    p99: float
    std: float
    count: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stat:
        if not seconds:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0)
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p90, p99 = np.percentile(ms, PERCENTILES)
        return cls(float(ms.mean()), float(p50), float(p90), float(p99), float(ms.std()), ms.size)


@dataclass
class ServeMetrics:
    num_completed: int
    num_failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output) tokens / s
    ttft: Stat
    tpot: Stat
    itl: Stat
    e2el: Stat
    max_in_flight: int = 0
    goodput: float | None = None  # requests / s meeting every SLO target
    slo_ms: dict[str, float] = field(default_factory=dict)  # the targets: key -> ms
    output_len_mismatches: int = 0  # completed requests that got other than max_tokens tokens


def meets_slo(result: RequestResult, slo: SLO) -> bool:
    itl_max = max(result.itl_s) if result.itl_s else None
    return result.ok and slo.is_met(result.ttft_s, result.tpot_s, itl_max, result.latency_s)


def summarize(
    results: Sequence[RequestResult],
    duration_s: float,
    slo: SLO | None = None,
    max_in_flight: int = 0,
) -> ServeMetrics:
    done = [r for r in results if r.ok]
    total_in = sum(r.prompt_len for r in done)
    total_out = sum(r.output_len for r in done)
    tpots = [t for r in done if (t := r.tpot_s) is not None]
    goodput = None
    if slo is not None:
        goodput = sum(meets_slo(r, slo) for r in done) / duration_s
    return ServeMetrics(
        num_completed=len(done),
        num_failed=len(results) - len(done),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(done) / duration_s,
        output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        ttft=Stat.of([r.ttft_s for r in done]),
        tpot=Stat.of(tpots),
        itl=Stat.of([gap for r in done for gap in r.itl_s]),
        e2el=Stat.of([r.latency_s for r in done]),
        max_in_flight=max_in_flight,
        goodput=goodput,
        slo_ms=slo.targets_ms() if slo is not None else {},
        output_len_mismatches=sum(r.output_len != r.expected_output_len for r in done),
    )


def summarize_run(run: LoadRun, slo: SLO | None = None) -> ServeMetrics:
    return summarize(run.results, run.duration_s, slo, run.max_in_flight)


def machine_info() -> dict:
    """What the numbers were measured on, load included: on a shared machine the load average
    says how much of it the benchmark had."""
    import torch

    info = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if load := load_average():
        info["loadavg_1_5_15"] = list(load)
    return info


def format_serve_markdown(m: ServeMetrics, title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    lines += [
        f"- completed {m.num_completed}, failed {m.num_failed}, "
        f"duration {m.duration_s:.2f} s, most in flight {m.max_in_flight}",
        f"- tokens: {m.total_input_tokens} in, {m.total_output_tokens} out"
        + (
            f" ({m.output_len_mismatches} requests off max_tokens)"
            if m.output_len_mismatches
            else ""
        ),
        f"- throughput: {m.request_throughput:.2f} req/s, {m.output_throughput:.1f} output tok/s, "
        f"{m.total_token_throughput:.1f} total tok/s",
    ]
    if m.goodput is not None:
        slos = ", ".join(f"{k} <= {v:g} ms" for k, v in m.slo_ms.items())
        lines.append(f"- goodput ({slos}): {m.goodput:.2f} req/s")
    lines += ["", "| ms | mean | median | p90 | p99 |", "|---|---|---|---|---|"]
    for name in ("ttft", "tpot", "itl", "e2el"):
        s: Stat = getattr(m, name)
        lines.append(
            f"| {name.upper()} | {s.mean:.1f} | {s.median:.1f} | {s.p90:.1f} | {s.p99:.1f} |"
        )
    return "\n".join(lines)


def serve_json(
    m: ServeMetrics, run: LoadRun | None, config: Mapping, per_request: bool = False
) -> dict:
    """The JSON result of a `bench serve` run: config, machine, metrics, optionally requests."""
    out = {"config": dict(config), "machine": machine_info(), "metrics": asdict(m)}
    if run is not None:
        out["errors"] = [r.error for r in run.results if not r.ok][:20]
        if per_request:
            out["requests"] = [asdict(r) for r in run.results]
    return out


# ---- the comparison's table and plots -------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def group_records(records: Sequence[Mapping]) -> dict[tuple[str, str, str], list[dict]]:
    """(scenario, engine, point) -> the metrics of each repetition."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["scenario"], r["engine"], r["point"]), []).append(r["metrics"])
    return groups


def _pick(groups, scenario: str, engine: str, fn, point: str = "") -> tuple[float, int]:
    runs = groups.get((scenario, engine, point), [])
    return _median([fn(m) for m in runs]), len(runs)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and b == b and a == a else "n/a"


def compare_markdown(records: Sequence[Mapping], header: str = "") -> str:
    """Medians over repetitions of each scenario, and the issue's targets as ratios."""
    g = group_records(records)
    out = [header] if header else []
    offline = {e: _pick(g, "offline", e, lambda m: m["output_throughput"]) for e in _ENGINES}
    if any(n for _, n in offline.values()):
        out += ["", "#### Offline: output tokens/s (median)", "", "| engine | out tok/s | runs |",
                "|---|---|---|"]  # fmt: skip
        out += [f"| {e} | {v:.1f} | {n} |" for e, (v, n) in offline.items() if n]
    serve_rows = []
    for e in _ENGINES:
        runs = g.get(("serve", e, ""), [])
        if runs:
            med = {k: _median([_get(m, k) for m in runs]) for k in _SERVE_KEYS}
            serve_rows.append((e, med, len(runs)))
    if serve_rows:
        out += ["", "#### Serving, all requests at once (medians over runs)", "",
                "| engine | out tok/s | TTFT median ms | TTFT p99 ms | TPOT median ms | "
                "ITL p99 ms | E2EL median ms | runs |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for e, m, n in serve_rows:
            out.append(f"| {e} | " + " | ".join(f"{m[k]:.1f}" for k in _SERVE_KEYS) + f" | {n} |")
    out += _tpot_section(g)
    out += _engine_section(g)
    out += _targets(g, offline, dict((e, m) for e, m, _ in serve_rows))
    return "\n".join(out)


_ENGINES = ("tokenmill", "llama.cpp", "transformers")
_SERVE_KEYS = ("output_throughput", "ttft.median", "ttft.p99", "tpot.median", "itl.p99",
               "e2el.median")  # fmt: skip


def _get(m: Mapping, dotted: str) -> float:
    for part in dotted.split("."):
        m = m[part]
    return float(m)  # type: ignore[arg-type]


def _tpot_section(g) -> list[str]:
    rows = []
    for e in ("tokenmill", "llama.cpp"):
        tpot, n = _pick(g, "tpot", e, lambda m: m["tpot"]["median"])
        if n:
            ttft, _ = _pick(g, "tpot", e, lambda m: m["ttft"]["median"])
            rows.append(f"| {e} (server, concurrency 1) | {tpot:.1f} | {ttft:.1f} | {n} |")
    tg, n = _pick(g, "llama-bench", "llama.cpp", lambda m: m.get("tg_tok_s", float("nan")))
    if n:
        pp, _ = _pick(g, "llama-bench", "llama.cpp", lambda m: m.get("pp_tok_s", float("nan")))
        rows.append(
            f"| llama.cpp (llama-bench tg128; pp512 {pp:.0f} tok/s) | {1e3 / tg:.1f} | | {n} |"
        )
    if not rows:
        return []
    return ["", "#### Concurrency 1", "", "| engine | TPOT ms | TTFT ms | runs |",
            "|---|---|---|---|", *rows]  # fmt: skip


def _engine_phases(g) -> dict[str, list[dict]]:
    phases: dict[str, list[dict]] = {}
    for run in g.get(("engine", "tokenmill", ""), []):
        peak = run["ceilings"]["matmul_flops"]
        for p in run["phases"]:
            p = dict(p, matmul_fraction=p["achieved_gflops"] * 1e9 / peak[p["dtype"]])
            p["peak_gflops"] = peak[p["dtype"]] / 1e9
            weights = p.get("quantization", "none")
            label = p["name"] if weights == "none" else f"{p['name']}, {weights} weights"
            phases.setdefault(label, []).append(p)
    return phases


def _engine_section(g) -> list[str]:
    phases = _engine_phases(g)
    if not phases:
        return []
    out = ["", "#### tokenmill engine steps vs this machine's matmul FLOP/s (medians)", "",
           "| phase | tokens/s | step ms | GFLOP/s | matmul peak GFLOP/s | of peak | runs |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, runs in phases.items():
        med = {k: _median([r[k] for r in runs]) for k in
               ("tokens_per_s", "step_time_s", "achieved_gflops", "peak_gflops", "matmul_fraction")}  # fmt: skip
        out.append(
            f"| {name} | {med['tokens_per_s']:.1f} | {med['step_time_s'] * 1e3:.1f} | "
            f"{med['achieved_gflops']:.1f} | {med['peak_gflops']:.0f} | "
            f"{med['matmul_fraction']:.0%} | {len(runs)} |"
        )
    return out


def _targets(g, offline, serve) -> list[str]:
    rows = []
    tm = offline.get("tokenmill", (float("nan"), 0))[0]
    for peer, need in (("transformers", 5.0), ("llama.cpp", 2.0)):
        if offline.get(peer, (0, 0))[1]:
            ratio = tm / offline[peer][0]
            rows.append(f"| offline out tok/s vs {peer} | >= {need:g}x | {ratio:.2f}x | "
                        f"{'met' if ratio >= need else 'missed'} |")  # fmt: skip
    if "tokenmill" in serve and "llama.cpp" in serve:
        a, b = serve["tokenmill"], serve["llama.cpp"]
        ratio = a["output_throughput"] / b["output_throughput"]
        rows.append(f"| serve out tok/s vs llama-server | >= 2x | {ratio:.2f}x | "
                    f"{'met' if ratio >= 2 else 'missed'} |")  # fmt: skip
        ok = a["ttft.p99"] < b["ttft.p99"]
        rows.append(f"| serve p99 TTFT vs llama-server | lower | {a['ttft.p99']:.0f} vs "
                    f"{b['ttft.p99']:.0f} ms | {'met' if ok else 'missed'} |")  # fmt: skip
    tm_tpot, n1 = _pick(g, "tpot", "tokenmill", lambda m: m["tpot"]["median"])
    lc_tpot, n2 = _pick(g, "tpot", "llama.cpp", lambda m: m["tpot"]["median"])
    if n1 and n2:
        rows.append(f"| concurrency-1 TPOT vs llama-server | <= | {tm_tpot:.1f} vs {lc_tpot:.1f} ms"
                    f" | {'met' if tm_tpot <= lc_tpot else 'missed'} |")  # fmt: skip
    phases = _engine_phases(g)
    # The float path's large batches (labels of quantized phases carry ", <scheme> weights").
    decode = [n for n in phases if re.fullmatch(r"decode batch \d+", n) and n != "decode batch 1"]
    if decode:
        best = max(decode, key=lambda n: int(n.rsplit(" ", 1)[1]))
        frac = _median([r["matmul_fraction"] for r in phases[best]])
        rows.append(f"| {best}: fraction of matmul FLOP/s | >= 60% | {frac:.1%} | "
                    f"{'met' if frac >= 0.6 else 'missed'} |")  # fmt: skip
    if not rows:
        return []
    return ["", "#### Targets (ratios from this run)", "", "| target | need | got | |",
            "|---|---|---|---|", *rows]  # fmt: skip


def compare_plots(records: Sequence[Mapping], folder: str | os.PathLike) -> list[str]:
    """latency_vs_rate.png and throughput_vs_concurrency.png from the sweep records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = group_records(records)
    written = []
    for scenario, fname, xlabel in (
        ("sweep-rate", "latency_vs_rate.png", "request rate (req/s, Poisson)"),
        ("sweep-concurrency", "throughput_vs_concurrency.png", "max concurrency"),
    ):
        series = {}
        for (s, engine, point), runs in g.items():
            if s == scenario:
                series.setdefault(engine, []).append((float(point), runs))
        if not series:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for engine, points in sorted(series.items()):
            points.sort()
            xs = [x for x, _ in points]
            if scenario == "sweep-rate":
                for ax, key in zip(axes, ("ttft", "tpot"), strict=True):
                    ax.plot(xs, [_median([m[key]["median"] for m in r]) for _, r in points],
                            "o-", label=f"{engine} median")  # fmt: skip
                    ax.plot(xs, [_median([m[key]["p99"] for m in r]) for _, r in points],
                            "x--", label=f"{engine} p99")  # fmt: skip
                    ax.set_ylabel(f"{key.upper()} (ms)")
            else:
                axes[0].plot(xs, [_median([m["output_throughput"] for m in r]) for _, r in points],
                             "o-", label=engine)  # fmt: skip
                axes[0].set_ylabel("output tokens/s")
                axes[1].plot(xs, [_median([m["tpot"]["median"] for m in r]) for _, r in points],
                             "o-", label=engine)  # fmt: skip
                axes[1].set_ylabel("median TPOT (ms)")
                for ax in axes:
                    ax.set_xscale("log", base=2)
        for ax in axes:
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(folder, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
