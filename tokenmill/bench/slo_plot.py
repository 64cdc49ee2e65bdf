"""Per-request TTFT and TPOT against send time, one series per server, on the same arrivals:
where FCFS lets the queue (TTFT) or the batch (TPOT) grow past the SLO, the policy refuses at
once (x marks along the bottom of the TTFT panel) and keeps what it admits within the lines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from tokenmill.bench.serve import RequestResult
from tokenmill.bench.serve_slo import is_refused
from tokenmill.workload.slo import SLO

_STYLES = (("tab:blue", "o"), ("tab:orange", "s"), ("tab:green", "^"), ("tab:purple", "v"))


def plot_timelines(
    runs: Mapping[str, Sequence[RequestResult]], slo: SLO, path: str | Path, title: str
) -> Path:
    """TTFT and TPOT (log scales) of every admitted request of each run by send time, refusals
    marked, the SLO's targets drawn; written as a PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ttft, ax_tpot) = plt.subplots(2, 1, sharex=True, figsize=(12, 7.5))
    for i, (name, results) in enumerate(runs.items()):
        color, marker = _STYLES[i % len(_STYLES)]
        served = [r for r in results if r.ok]
        ax_ttft.scatter([r.start_s for r in served], [r.ttft_s * 1e3 for r in served],
                        s=14, alpha=0.7, color=color, marker=marker, label=name)  # fmt: skip
        timed = [r for r in served if r.tpot_s is not None]
        ax_tpot.scatter([r.start_s for r in timed], [r.tpot_s * 1e3 for r in timed],
                        s=14, alpha=0.7, color=color, marker=marker, label=name)  # fmt: skip
        refused = [r.start_s for r in results if is_refused(r)]
        if refused:
            # x in data units, y in axes units: a rug of refusals below the served points.
            rug_y = [0.03 + 0.04 * i] * len(refused)
            ax_ttft.scatter(refused, rug_y, transform=ax_ttft.get_xaxis_transform(), marker="x",
                            s=22, color=color, label=f"{name}: refused ({len(refused)})")  # fmt: skip
    for ax, target_s, label in ((ax_ttft, slo.ttft_s, "TTFT"), (ax_tpot, slo.tpot_s, "TPOT")):
        if target_s is not None:
            ax.axhline(target_s * 1e3, color="red", linestyle="--", linewidth=1,
                       label=f"SLO {label} {target_s * 1e3:g} ms")  # fmt: skip
        ax.set_ylabel(f"{label} (ms)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax_tpot.set_xlabel("send time (s from the start of the run)")
    ax_ttft.set_title(title.replace("; ", "\n", 1), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
