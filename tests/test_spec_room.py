"""`auto` drafts only into the token budget that pending prompt work leaves (spec/room.py)."""

from __future__ import annotations

from tokenmill.config import SchedulerConfig
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec.config import parse_speculative_config
from tokenmill.spec.cost import FALLBACK_DECODE_S, PROBE_SHARE, VerifyCost, bucket
from tokenmill.spec.decoder import SpecDecoder, trim_counts
from tokenmill.spec.room import draft_room


def scheduler_with(prompts: list[int], budget: int, max_seqs: int) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    scheduler = Scheduler(config, KVCacheManager(256, 16, True), 4096)
    for i, n in enumerate(prompts):
        scheduler.add_request(Request(f"r{i}", list(range(n)), SamplingParams(max_tokens=8)))
    return scheduler


def test_room_is_the_budget_less_the_prompts_a_free_slot_would_take():
    assert draft_room(scheduler_with([], 64, 3)) == 64
    assert draft_room(scheduler_with([20] * 4, 64, 3)) == 64 - 3 * 20  # three slots free
    assert draft_room(scheduler_with([20] * 4, 64, 2)) == 64 - 2 * 20
    assert draft_room(scheduler_with([20] * 4, 32, 3)) == 0  # never below zero


def test_room_counts_one_token_per_decode_and_the_rest_of_a_running_prompt():
    scheduler = scheduler_with([20, 20], 64, 4)
    scheduler.schedule()  # both admitted: 20 + 20 prompt tokens
    decoding, prefilling = scheduler.running
    decoding.num_computed_tokens = decoding.num_tokens - 1
    prefilling.num_computed_tokens = 5
    assert draft_room(scheduler) == 64 - 1 - 15


class CountingLookup:
    is_lookup = True

    def __init__(self) -> None:
        self.calls = 0

    def propose(self, requests, num_drafts):
        self.calls += 1
        return [[7, 7, 7, 7][:k] for k in num_drafts]

    def draft_seconds(self, num_drafts) -> float:
        return 0.0

    def release(self, request_ids) -> None:
        pass


def decoding_requests(num: int) -> list[Request]:
    out = []
    for i in range(num):
        request = Request(f"d{i}", [1, 2, 3, 4], SamplingParams(max_tokens=32))
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = request.num_tokens - 1
        out.append(request)
    return out


def auto_decoder(room: int) -> tuple[SpecDecoder, CountingLookup]:
    config = parse_speculative_config({"method": "ngram", "num_speculative_tokens": "auto"})
    lookup = CountingLookup()
    decoder = SpecDecoder(config, lookup, VerifyCost(None), 4096, room=lambda: room)
    decoder.cost.observe([3] * 3, 3, FALLBACK_DECODE_S + 0.003)  # a measured marginal: 1 ms
    decoder.guard.record(3, False, tokens=3, seconds=1.0)  # the guard has measured drafting
    decoder.guard.record(3, True, tokens=9, seconds=1.0)  # as faster
    return decoder, lookup


def test_auto_drafts_nothing_and_looks_nothing_up_while_prompts_fill_the_step():
    decoder, lookup = auto_decoder(room=0)
    requests = decoding_requests(3)
    decoder.propose(requests)
    assert lookup.calls == 0 and all(r.spec_token_ids == [] for r in requests)


def test_auto_drafts_at_most_the_room():
    unlimited, _ = auto_decoder(room=1000)
    requests = decoding_requests(3)
    unlimited.propose(requests)
    assert sum(len(r.spec_token_ids) for r in requests) > 2  # what it drafts given room
    limited, lookup = auto_decoder(room=2)
    requests = decoding_requests(3)
    limited.propose(requests)
    assert lookup.calls == 1 and sum(len(r.spec_token_ids) for r in requests) == 2


def test_auto_drafts_few_tokens_while_the_marginal_cost_is_a_guess():
    config = parse_speculative_config({"method": "ngram", "num_speculative_tokens": "auto"})
    cost = VerifyCost(None)
    cost.marginal_s[bucket(8)] = 1e-5  # a roofline guess that makes drafts look free
    decoder = SpecDecoder(config, CountingLookup(), cost, 4096, room=lambda: 1000)
    decoder.guard.record(8, False, tokens=8, seconds=1.0)
    decoder.guard.record(8, True, tokens=24, seconds=1.0)
    requests = decoding_requests(8)
    decoder.propose(requests)
    assert sum(len(r.spec_token_ids) for r in requests) == 8 // PROBE_SHARE


def test_drafts_are_cut_the_largest_first():
    assert trim_counts([4, 4, 1, 0], 5) == [2, 2, 1, 0]
    assert trim_counts([4, 3, 1], 6) == [3, 2, 1]
    assert trim_counts([4, 3, 1], 8) == [4, 3, 1]
    assert trim_counts([4, 3, 1], 0) == [0, 0, 0]


def test_prompts_that_arrive_after_the_proposal_take_back_the_room():
    decoder, _ = auto_decoder(room=1000)
    requests = decoding_requests(3)
    decoder.propose(requests)
    assert sum(len(r.spec_token_ids) for r in requests) > 2
    decoder.room = lambda: 2  # a prompt arrived: the step's budget has room for two drafts
    decoder.before_schedule()
    assert sum(len(r.spec_token_ids) for r in requests) == 2
    decoder.room = lambda: 0
    decoder.before_schedule()  # only the proposal's own drafts are revised, once
    assert sum(len(r.spec_token_ids) for r in requests) == 2
