"""spec_bench's summary of `auto` against the best fixed draft count, per part."""

from __future__ import annotations

from tokenmill.bench.spec_bench import auto_vs_fixed, default_runs


def row(config: str, part: str, tok_s: float) -> dict:
    return {"config": config, "part": part, "output_tok_s": tok_s}


def test_auto_is_compared_with_the_best_fixed_k_including_none():
    rows = [
        row("tm-q4", "c1", 100.0), row("tm-q4-ngram-k1", "c1", 110.0),
        row("tm-q4-ngram-k4", "c1", 120.0), row("tm-q4-ngram-auto", "c1", 114.0),
        row("tm-q4", "c64", 130.0), row("tm-q4-ngram-k2", "c64", 90.0),
        row("tm-q4-ngram-auto", "c64", 127.4),
    ]  # fmt: skip
    lines = auto_vs_fixed(rows).splitlines()
    assert lines[2] == "| c1 | 4 | 120.0 | 114.0 | 0.95 | 1.14 |"
    assert lines[3] == "| c64 | 0 | 130.0 | 127.4 | 0.98 | 0.98 |"  # none was the best
    assert len(lines) == 4


def test_each_fixed_k_is_its_own_configuration():
    names = [r.name for r in default_runs((1, 2, 8), ("ngram",))]
    assert names == ["tm-q4", "tm-q4-ngram-k1", "tm-q4-ngram-k2", "tm-q4-ngram-k8",
                     "tm-q4-ngram-auto"]  # fmt: skip
