"""quant-eval's results as markdown: per model a speed/memory table, one quality table per task,
the schemes that could not be measured, and one line per task naming the cheapest scheme
within tolerance of the reference.

Cheapest: the fewest weight bytes, then the fewest KV bytes per token, then the fastest batch-1
decode. The reference itself is a candidate, so every task names one.
"""

from __future__ import annotations

from tokenmill.quant_eval.results import ModelResult, SchemeResult, TaskResult, Tolerance


def format_markdown(models: list[ModelResult], tolerance: Tolerance) -> str:
    lines: list[str] = []
    for model in models:
        lines += [f"## {model.model}", "", f"`{model.source}`", ""]
        lines += _cost_table(model)
        for task in model.reference.tasks:
            lines += ["", f"### {task}", ""] + _quality_table(model, task)
        failed = [s for s in model.schemes if not s.ok]
        if failed:
            lines += ["", "Not measured:"] + [f"- {s.scheme}: {s.error}" for s in failed]
        lines += ["", f"Cheapest within tolerance ({tolerance.describe()}):", ""]
        lines += [f"- {line}" for line in recommendations(model, tolerance)]
        lines.append("")
    return "\n".join(lines)


def _cost_table(model: ModelResult) -> list[str]:
    batches = _batch_sizes(model)
    head = "| scheme | engine | weights MB | KV B/token | prefill tok/s |"
    head += "".join(f" decode tok/s b{b} |" for b in batches)
    lines = [head, "|" + "---|" * (5 + len(batches))]
    for s in model.schemes:
        if not s.ok:
            continue
        e = s.engine
        engine = f"{e.get('dtype')}, kv {e.get('kv_cache_dtype')}, {e.get('quantization')}"
        speed = s.speed
        prefill = f"{speed.prefill_tok_s:.0f}" if speed else "-"
        decode = "".join(f" {speed.decode_tok_s[b]:.1f} |" if speed else " - |" for b in batches)
        lines.append(
            f"| {s.scheme} | {engine} | {s.memory.weight_bytes / 1e6:.1f} | "
            f"{s.memory.kv_bytes_per_token:.0f} | {prefill} |{decode}"
        )
    return lines


def _quality_table(model: ModelResult, task: str) -> list[str]:
    ref = model.reference.tasks[task]
    acc_head = f" {ref.accuracy_name} |" if ref.accuracy is not None else ""
    lines = [
        f"{ref.num_texts} texts, {ref.num_tokens} scored tokens"
        + (f"; {ref.num_answers} questions" if ref.num_answers else ""),
        "",
        f"| scheme | perplexity | change | mean KL | p99 KL | top-1 agree |{acc_head}",
        "|---|---|---|---|---|---|" + ("---|" if acc_head else ""),
    ]
    for s in model.schemes:
        if not s.ok:
            continue
        r = s.tasks[task]
        acc = f" {r.accuracy:.3f} |" if acc_head else ""
        lines.append(
            f"| {s.scheme} | {r.perplexity:.3f} | {r.perplexity_change_pct:+.2f}% | "
            f"{r.mean_kl:.2e} | {r.p99_kl:.2e} | {r.top1_agreement:.4f} |{acc}"
        )
    return lines


def recommendations(model: ModelResult, tolerance: Tolerance) -> list[str]:
    """One line per task: the cheapest scheme within tolerance, with what it costs."""
    lines = []
    for task, ref in model.reference.tasks.items():
        ok = [s for s in model.schemes if s.ok and tolerance.accepts(s.tasks[task], ref)]
        best = min(ok, key=_cost)
        r: TaskResult = best.tasks[task]
        acc = f", {r.accuracy_name} {r.accuracy:.3f}" if r.accuracy is not None else ""
        lines.append(
            f"{task}: {best.scheme} (weights {best.memory.weight_bytes / 1e6:.1f} MB, "
            f"KV {best.memory.kv_bytes_per_token:.0f} B/token, mean KL {r.mean_kl:.2e}, "
            f"top-1 {r.top1_agreement:.4f}{acc})"
        )
    return lines


def _cost(s: SchemeResult) -> tuple[float, float, float]:
    speed = s.speed.decode_tok_s.get("1", 0.0) if s.speed else 0.0
    return (s.memory.weight_bytes, s.memory.kv_bytes_per_token, -speed)


def _batch_sizes(model: ModelResult) -> list[str]:
    for s in model.schemes:
        if s.ok and s.speed:
            return list(s.speed.decode_tok_s)
    return []
