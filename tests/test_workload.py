import json
import math
import time

import numpy as np
import pytest

from tokenmill.errors import ConfigError
from tokenmill.workload import (
    ArrivalSpec,
    build_workload,
    iter_records,
    load_pairs,
    parse_workload,
    random_lengths,
    sample_sharegpt,
)


class WordTokenizer:
    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))


def _conv(prompt_words: int, reply_words: int, turns: int = 2) -> dict:
    conv = [
        {"from": "human", "value": " ".join(["w"] * prompt_words)},
        {"from": "gpt", "value": " ".join(["r"] * reply_words)},
    ]
    return {"id": "x", "conversations": conv[:turns]}


def _truncated_file(tmp_path, records) -> str:
    text = json.dumps(records, indent=2)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[: len(text) - 40])  # cut inside the last record, as the package is
    return str(path)


def test_iter_records_stops_at_the_truncated_tail():
    text = json.dumps([{"a": 1}, {"a": 2}, {"a": 3}])
    assert [r["a"] for r in iter_records(text[:-8])] == [1, 2]
    assert [r["a"] for r in iter_records(text)] == [1, 2, 3]


def test_sharegpt_sampling_rules(tmp_path):
    records = [
        _conv(10, 20),  # kept
        _conv(3, 20),  # prompt under 4
        _conv(10, 3),  # output under 4
        _conv(1100, 10),  # prompt over 1024
        _conv(1000, 1100),  # pair over 2048
        _conv(10, 20, turns=1),  # one turn
        _conv(50, 60),  # kept
        _conv(7, 7),  # kept
        _conv(9, 9),  # truncated away
    ]
    path = _truncated_file(tmp_path, records)
    assert len(load_pairs(path)) == 7
    got = sample_sharegpt(WordTokenizer(), 3, seed=0, path=path)
    assert sorted((r.prompt_len, r.output_len) for r in got) == [(7, 7), (10, 20), (50, 60)]
    assert all(r.prompt is not None for r in got)
    again = sample_sharegpt(WordTokenizer(), 3, seed=0, path=path)
    assert [r.prompt_len for r in again] == [r.prompt_len for r in got]
    with pytest.raises(ConfigError, match="only 3"):
        sample_sharegpt(WordTokenizer(), 4, path=path)


def test_bundled_sharegpt_samples_fast():
    start = time.perf_counter()
    wl = build_workload("sharegpt", 1000, tokenizer=WordTokenizer(), seed=0)
    assert time.perf_counter() - start < 10
    lens = [r.prompt_len for r in wl.requests]
    assert wl.num_requests == 1000 and min(lens) >= 4 and max(lens) <= 1024
    assert all(r.prompt_len + r.output_len <= 2048 for r in wl.requests)


def test_synthetic_lengths():
    wl = build_workload("fixed:in=100,out=20", 5)
    assert {(r.prompt_len, r.output_len, r.prompt) for r in wl.requests} == {(100, 20, None)}
    pairs = random_lengths(2000, 100, 50, 0.5, seed=1)
    ins = [i for i, _ in pairs]
    assert min(ins) >= 50 and max(ins) <= 150 and 95 < np.mean(ins) < 105
    assert random_lengths(2000, 100, 50, 0.5, seed=1) == pairs  # seeded


def test_arrivals():
    assert ArrivalSpec().offsets(3) == [0.0, 0.0, 0.0]
    offsets = ArrivalSpec(rate=10.0).offsets(5001, seed=0)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert 5000 / offsets[-1] == pytest.approx(10.0, rel=0.05)
    bursty = np.diff(ArrivalSpec(rate=10.0, burstiness=0.2).offsets(5001, seed=0))
    poisson = np.diff(offsets)
    assert bursty.std() > 1.5 * poisson.std()
    assert ArrivalSpec(rate=10.0).offsets(10, seed=4) == ArrivalSpec(rate=10.0).offsets(10, seed=4)
    wl = build_workload("fixed:in=1,out=1", 4, ArrivalSpec(max_concurrency=2))
    assert wl.max_concurrency == 2
    assert math.isinf(ArrivalSpec().rate)


@pytest.mark.parametrize(
    "text, match",
    [
        ("poisson:in=1", "unknown workload"),
        ("fixed:in=10", "needs in= and out="),
        ("fixed:in=0,out=5", "must be >= 1"),
        ("fixed:in=ten,out=5", "workload"),
        ("random:in=10,out=5,zz=1", "bad option"),
    ],
)
def test_bad_workloads(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_workload(text)


def test_bad_arrivals():
    with pytest.raises(ConfigError):
        ArrivalSpec(rate=0)
    with pytest.raises(ConfigError):
        ArrivalSpec(rate=1, burstiness=-1)
    with pytest.raises(ConfigError):
        ArrivalSpec(max_concurrency=0)
    with pytest.raises(ConfigError, match="tokenizer"):
        build_workload("sharegpt", 3)
