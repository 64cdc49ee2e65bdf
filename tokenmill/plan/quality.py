"""What a lower precision costs in quality, as tokenmill quant-eval measured it on the CPU
runtime: the planner quotes it beside any answer that uses int8/int4 weights or an int8/fp8 KV
cache, so a speed or $/Mtok figure never comes without its quality price.

The figures live in plan/quant_quality.json, written from a quant-eval result by
`python -m tokenmill.plan.quality QUANT_EVAL_JSON` (BENCHMARKS.md says which run).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

from tokenmill.perf import Precision

CATALOGUE = Path(__file__).parent / "quant_quality.json"
# Planner precision -> the quant-eval scheme that stores the same way (int4 here: groups of 128
# with one bf16 scale, i.e. symmetric).
WEIGHT_SCHEMES = {"int8": "int8", "int4": "int4-g128-sym"}
KV_SCHEMES = {"int8": "kv-int8", "fp8": "kv-fp8"}


@functools.cache
def _catalogue() -> dict:
    return json.loads(CATALOGUE.read_text()) if CATALOGUE.is_file() else {}


def quality_notes(precision: Precision) -> list[str]:
    """One line per measured model for each lowered precision `precision` uses."""
    wanted = []
    if precision.weights in WEIGHT_SCHEMES:
        wanted.append((f"{precision.weights} weights", WEIGHT_SCHEMES[precision.weights]))
    if precision.kv in KV_SCHEMES:
        wanted.append((f"{precision.kv} KV cache", KV_SCHEMES[precision.kv]))
    data = _catalogue()
    notes = []
    for label, scheme in wanted:
        rows = [
            (m, tasks[scheme]) for m, tasks in data.get("models", {}).items() if scheme in tasks
        ]
        if not rows:
            notes.append(f"{label}: quality not measured (run tokenmill quant-eval)")
            continue
        for model, tasks in rows:
            parts = [f"{task} KL {t['mean_kl']:.4f}, top-1 {t['top1_agreement']:.1%}"
                     + (f", {t['accuracy_name']} {t['accuracy']:.1%} (ref {t['ref_accuracy']:.1%})"
                        if t.get("accuracy") is not None else "")
                     for task, t in tasks.items()]  # fmt: skip
            notes.append(f"{label} ({scheme}) on {model}, {data['measured']}: " + "; ".join(parts))
    return notes


def catalogue_from_quant_eval(result: dict, measured: str) -> dict:
    """The catalogue's content from a quant-eval JSON file's content."""
    models = {}
    for model in result["models"]:
        schemes = {s["scheme"]: s for s in model["schemes"] if not s.get("error")}
        ref = next(s for s in model["schemes"] if s["is_reference"])
        keep = set(WEIGHT_SCHEMES.values()) | set(KV_SCHEMES.values())
        models[Path(model["source"]).name] = {
            name: {
                task: {
                    "mean_kl": t["mean_kl"],
                    "top1_agreement": t["top1_agreement"],
                    "accuracy": t["accuracy"],
                    "accuracy_name": t["accuracy_name"],
                    "ref_accuracy": ref["tasks"][task]["accuracy"],
                }  # fmt: skip
                for task, t in s["tasks"].items()
            }
            for name, s in schemes.items()
            if name in keep
        }
    return {"measured": measured, "models": models}


if __name__ == "__main__":
    source, measured = sys.argv[1], sys.argv[2]  # the quant-eval JSON, "date, machine"
    content = catalogue_from_quant_eval(json.loads(Path(source).read_text()), measured)
    CATALOGUE.write_text(json.dumps(content, indent=1) + "\n")
