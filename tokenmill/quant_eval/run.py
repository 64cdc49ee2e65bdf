"""A whole quant-eval run: each model evaluated in turn, then the JSON, markdown and plots."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenmill.quant_eval.harness import EvalSettings, evaluate_model
from tokenmill.quant_eval.plot import plot_model
from tokenmill.quant_eval.report import format_markdown, recommendations
from tokenmill.quant_eval.results import ModelResult, Tolerance, as_json
from tokenmill.quant_eval.schemes import Scheme

# Names for the bundled models; anything else is a GGUF file or a Hugging Face folder.
BUNDLED_MODELS = ("smollm2", "gemma3")


@dataclass
class RunOutput:
    models: list[ModelResult]
    markdown: str
    json_path: Path
    markdown_path: Path
    plot_paths: list[Path]
    summary_lines: list[str]  # one per (model, task): the cheapest scheme within tolerance


def resolve_model(name: str) -> str:
    from tokenmill.loader import default_model

    if name == "smollm2":
        return default_model.default_model_path()
    if name == "gemma3":
        return default_model.gemma3_model_path()
    return name


def run_quant_eval(
    model_names: Sequence[str],
    schemes: Sequence[Scheme],
    settings: EvalSettings,
    tolerance: Tolerance,
    out_dir: str | Path,
) -> RunOutput:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = [evaluate_model(resolve_model(n), schemes, settings, name=n) for n in model_names]
    markdown = format_markdown(models, tolerance)
    record = as_json(models, tolerance, {**asdict(settings), "schemes": [s.name for s in schemes]})
    json_path = out_dir / "quant_eval.json"
    json_path.write_text(json.dumps(record, indent=2))
    markdown_path = out_dir / "quant_eval.md"
    markdown_path.write_text(markdown)
    plots = [plot_model(m, out_dir / f"quant_eval_{_slug(m.model)}.png") for m in models]
    summary = [f"{m.model} {line}" for m in models for line in recommendations(m, tolerance)]
    return RunOutput(models, markdown, json_path, markdown_path, plots, summary)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name or name)
