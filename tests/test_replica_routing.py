"""The replica router's policy and its view of a prefix cache, without Ray: the ranking, views
with reports and optimistic routes, and the keys matching what the engine's cache holds."""

from __future__ import annotations

from tokenmill.sampling_params import SamplingParams
from tokenmill.serve_ray.prefix_index import (
    ROUTED_GRACE_S,
    Candidate,
    ReplicaReport,
    ReplicaView,
    block_key,
    block_keys,
    rank_by_prefix,
)
from tokenmill.serve_ray.wire import Refused, WireError


def test_longest_prefix_wins_while_the_load_is_balanced():
    ranked, reason = rank_by_prefix([Candidate("a", 1, 2), Candidate("b", 5, 4)], 4)
    assert ranked == ["b", "a"] and reason == "prefix"


def test_the_least_loaded_wins_when_the_load_is_imbalanced():
    ranked, reason = rank_by_prefix([Candidate("a", 0, 0), Candidate("b", 9, 5)], 4)
    assert ranked[0] == "a" and reason == "load"


def test_without_a_cached_prefix_the_emptiest_replica_of_the_least_loaded_wins():
    candidates = [Candidate("a", 0, 1, 50), Candidate("b", 0, 1, 10), Candidate("c", 0, 2, 0)]
    assert rank_by_prefix(candidates, 4)[0][0] == "b"


def test_a_view_matches_the_leading_run_of_keys_only():
    view = ReplicaView()
    view.adopt(ReplicaReport(time=100.0, block_keys=(1, 2, 4)))
    assert view.num_matched([1, 2, 3, 4]) == 2
    view.note_routed([1, 2, 3], now=101.0)
    assert view.num_matched([1, 2, 3, 4]) == 4
    assert view.num_matched([1, 2, 3, 4], reported_only=True) == 2


def test_a_newer_report_replaces_the_view_and_drops_old_routes():
    view = ReplicaView()
    view.note_routed([7], now=100.0)
    view.adopt(ReplicaReport(time=100.0 + ROUTED_GRACE_S + 1, block_keys=(1,)))
    assert view.num_matched([7]) == 0 and view.num_matched([1]) == 1
    assert not view.adopt(ReplicaReport(time=50.0, block_keys=(9,)))  # older: ignored
    assert ReplicaReport.from_dict(view.report.to_dict()) == view.report


def test_keys_are_what_the_engines_prefix_cache_holds(llm_fp32):
    prompt = "A prompt long enough to fill a few blocks of sixteen tokens each, " * 4
    llm_fp32.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    token_ids = llm_fp32.get_tokenizer().encode(prompt)
    cached = {block_key(h) for h in llm_fp32.engine.kv_manager.cached_block_hashes()}
    keys = block_keys(token_ids, llm_fp32.engine.config.cache.block_size)
    assert len(keys) >= 3 and set(keys) <= cached


def test_refusals_travel_as_their_own_error_type():
    from tokenmill.errors import SloUnattainableError

    error = SloUnattainableError("ttft of 1s is unattainable", 2.5, "ttft")
    rebuilt = Refused(WireError.of(error)).error.rebuild()
    assert type(rebuilt) is SloUnattainableError and str(rebuilt) == str(error)
    assert (rebuilt.retry_after_s, rebuilt.reason) == (2.5, "ttft")
