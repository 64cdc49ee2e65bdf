"""Quality loss vs speed, one panel per task: a PNG per model.

x: decode tokens/s at the smallest batch measured (weight MB when speed was not measured);
y: mean KL(reference || scheme) per token on a symmetric-log axis, so the reference (0) shows.
"""

from __future__ import annotations

from pathlib import Path

from tokenmill.quant_eval.results import ModelResult


def plot_model(model: ModelResult, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = [s for s in model.schemes if s.ok]
    tasks = list(model.reference.tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    x_label, xs = _x_values(schemes)
    for ax, task in zip(axes[0], tasks, strict=True):
        kls = [s.tasks[task].mean_kl for s in schemes]
        ax.scatter(xs, kls)
        for s, x, kl in zip(schemes, xs, kls, strict=True):
            ax.annotate(s.scheme, (x, kl), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("symlog", linthresh=1e-5)
        ax.set_title(task)
        ax.set_xlabel(x_label)
        ax.set_ylabel("mean KL(reference || scheme), nats/token")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"quant-eval: {model.model}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _x_values(schemes) -> tuple[str, list[float]]:
    with_speed = [s for s in schemes if s.speed is not None]
    if with_speed and len(with_speed) == len(schemes):
        batch = min(with_speed[0].speed.decode_tok_s, key=int)
        return f"decode tokens/s, batch {batch}", [s.speed.decode_tok_s[batch] for s in schemes]
    return "weights MB", [s.memory.weight_bytes / 1e6 for s in schemes]
