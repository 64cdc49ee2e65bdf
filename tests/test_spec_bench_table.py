"""spec_bench's summary of `auto` against the best fixed draft count, per part."""

from __future__ import annotations

from tokenmill.bench.spec_bench import auto_vs_fixed, default_runs, mean_rows, pair_ratios, schedule


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


def test_prompt_lookup_on_the_default_weights_is_paired_with_them():
    runs = {r.name: r for r in default_runs((4,), ("ngram-bf16", "self"))}
    assert list(runs) == ["tm-q4", "tm-bf16", "tm-bf16-ngram-auto", "tm-bf16-self-auto"]
    lookup = runs["tm-bf16-ngram-auto"]
    assert lookup.baseline == "tm-bf16"
    assert lookup.args[: len(runs["tm-bf16"].args)] == runs["tm-bf16"].args  # the same weights
    assert '"method": "ngram"' in lookup.args[-1]


def test_repetitions_alternate_their_order_and_pair_side_by_side():
    runs = default_runs((4,), ("ngram",))
    order = schedule(runs, ["c1", "c64"], interleave=True, repeats=2)
    names = [(run.name, parts, rep) for run, parts, rep in order]
    assert names[:6] == [
        ("tm-q4", ["c1"], 0), ("tm-q4-ngram-k4", ["c1"], 0), ("tm-q4-ngram-auto", ["c1"], 0),
        ("tm-q4-ngram-auto", ["c1"], 1), ("tm-q4-ngram-k4", ["c1"], 1), ("tm-q4", ["c1"], 1),
    ]  # fmt: skip
    assert len(order) == 12 and all(parts == ["c64"] for _, parts, _ in order[6:])


def test_repetitions_are_averaged_and_their_ratios_listed():
    def rep_row(config, rep, tok_s, drafted):
        return row(config, "c64", tok_s) | {
            "rep": rep,
            "tpot_ms_median": 10.0,
            "drafted": drafted,
            "accepted": drafted // 2,
        }

    rows = [rep_row("tm-q4", 0, 100.0, 0), rep_row("tm-q4-ngram-auto", 0, 96.0, 10),
            rep_row("tm-q4-ngram-auto", 1, 105.0, 30), rep_row("tm-q4", 1, 100.0, 0),
            rep_row("tm-q4", 2, 110.0, 0), rep_row("tm-q4-ngram-auto", 2, 110.0, 0)]  # fmt: skip
    means = {r["config"]: r for r in mean_rows(rows)}
    assert means["tm-q4"]["output_tok_s"] == (100 + 100 + 110) / 3
    assert means["tm-q4-ngram-auto"]["drafted"] == 40
    assert means["tm-q4-ngram-auto"]["acceptance"] == 0.5
    assert pair_ratios(rows).splitlines()[2] == "| c64 | 0.96, 1.05, 1.00 | 1.00 |"
