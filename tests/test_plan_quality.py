"""The planner quotes the quality quant-eval measured beside lowered precisions, and only there."""

from __future__ import annotations

from tokenmill.perf import Precision
from tokenmill.plan.quality import catalogue_from_quant_eval, quality_notes


def test_lowered_precisions_carry_their_measured_quality():
    weights = quality_notes(Precision(weights="int8"))
    assert weights and all(n.startswith("int8 weights (int8)") and "KL" in n for n in weights)
    kv = quality_notes(Precision(weights="bf16", kv="int8"))
    assert kv and all("KV cache (kv-int8)" in n for n in kv)
    assert quality_notes(Precision(weights="bf16")) == []


def test_catalogue_is_built_from_a_quant_eval_result():
    task = {"mean_kl": 0.01, "top1_agreement": 0.9, "accuracy": 0.5, "accuracy_name": "exact match"}
    ref = dict(task, mean_kl=0.0, top1_agreement=1.0, accuracy=0.75)
    result = {"models": [{"source": "/x/m.gguf", "schemes": [
        {"scheme": "reference", "is_reference": True, "tasks": {"math": ref}},
        {"scheme": "int8", "is_reference": False, "tasks": {"math": task}},
        {"scheme": "int4-g32", "is_reference": False, "tasks": {"math": task}},
    ]}]}  # fmt: skip
    out = catalogue_from_quant_eval(result, "today")
    assert set(out["models"]["m.gguf"]) == {"int8"}  # only the schemes the planner names
    assert out["models"]["m.gguf"]["int8"]["math"]["ref_accuracy"] == 0.75
