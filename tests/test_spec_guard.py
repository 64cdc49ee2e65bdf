"""auto's throughput guard: it compares the steps it allowed to speculate with the steps it kept
plain, each charged what proposing cost, and keeps the faster arm (spec/guard.py)."""

from __future__ import annotations

import time

from tokenmill.engine.interfaces import RunnerOutput, ScheduledRequest, SchedulerOutput
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec.config import parse_speculative_config
from tokenmill.spec.cost import VerifyCost
from tokenmill.spec.decoder import SpecDecoder
from tokenmill.spec.guard import EXPLORE, ThroughputGuard

LOOKUP_S = 0.02


class SlowFruitlessLookup:
    """A lookup that takes LOOKUP_S and finds nothing: drafting never happens, yet every step
    the guard allows pays for looking."""

    is_lookup = True

    def __init__(self) -> None:
        self.calls = 0

    def propose(self, requests, num_drafts):
        self.calls += 1
        time.sleep(LOOKUP_S)
        return [[] for _ in requests]

    def draft_seconds(self, num_drafts) -> float:
        return 0.0

    def release(self, request_ids) -> None:
        pass


def decoding_requests(num: int) -> list[Request]:
    out = []
    for i in range(num):
        request = Request(f"d{i}", [1, 2, 3, 4], SamplingParams(max_tokens=64))
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = request.num_tokens - 1
        out.append(request)
    return out


def plain_step(requests: list[Request]) -> tuple[SchedulerOutput, RunnerOutput]:
    scheduled = [
        ScheduledRequest(r.request_id, [r.all_token_ids[-1]], r.num_computed_tokens, [], True)
        for r in requests
    ]
    return SchedulerOutput(scheduled, [], []), RunnerOutput({r.request_id: [5] for r in requests})


def test_guard_turns_speculation_off_where_it_measured_slower():
    guard = ThroughputGuard()
    assert not guard.allows(8)  # first measure without
    guard.record(8, False, tokens=8, seconds=0.1)
    assert guard.allows(8)  # then with
    guard.record(8, True, tokens=12, seconds=0.2)  # slower per request: 7.5 vs 10 tokens/s
    choices = [guard.allows(8) for _ in range(2 * EXPLORE)]
    assert choices.count(True) == 2  # only the exploring steps speculate
    assert not guard.allows(100) and guard.rate.get((7, True)) is None  # buckets apart
    guard.record(1, False, 1, 0.02)
    guard.record(1, True, 3, 0.03)  # batch 1: speculation measured faster
    assert sum(guard.allows(1) for _ in range(EXPLORE)) == EXPLORE - 1


def test_lookups_that_draft_nothing_are_charged_to_speculating_and_stop():
    """A step the guard allowed costs its lookups even when no draft comes of them: that arm,
    not the plain one, measures the loss, and the guard then stops looking."""
    config = parse_speculative_config({"method": "ngram", "num_speculative_tokens": "auto"})
    lookup = SlowFruitlessLookup()
    decoder = SpecDecoder(config, lookup, VerifyCost(None), 4096)
    requests = decoding_requests(4)
    for _ in range(2 * EXPLORE):
        decoder.propose(requests)
        assert all(r.spec_token_ids == [] for r in requests)
        decoder.observe(*plain_step(requests), wall_s=0.01)
    plain, allowed = decoder.guard.rate[(3, False)], decoder.guard.rate[(3, True)]
    assert allowed < plain / 2  # 10 ms steps, 20 ms more of looking
    assert lookup.calls <= 3  # the first allowed step, then one exploring step per EXPLORE
