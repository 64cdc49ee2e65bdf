"""Scheduler: token budget, chunked prefill, preemption, priorities and abort, with tiny configs.

The runner's role here is played by `run_step`, which returns token 7 for every request that
samples: the scheduler only sees plain data, so nothing else is needed to exercise it.
"""

from tokenmill.config import SchedulerConfig
from tokenmill.engine.interfaces import RunnerOutput
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.sampling_params import SamplingParams

BS = 4


def make_scheduler(num_blocks=64, budget=16, max_seqs=8, policy="fcfs", max_len=64, **kw):
    kv = KVCacheManager(num_blocks, BS)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, policy=policy, **kw)
    return Scheduler(cfg, kv, max_model_len=max_len)


def req(req_id, prompt_len, max_tokens=4, priority=0, arrival=None, base=0):
    tokens = [base + i for i in range(prompt_len)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(req_id, tokens, params, arrival_time=arrival, priority=priority)


def run_step(sched: Scheduler) -> list[tuple[str, int]]:
    out = sched.schedule()
    sampled = {s.req_id: [7] for s in out.scheduled if s.do_sample}
    sched.update_from_output(out, RunnerOutput(sampled=sampled))
    sched.kv.check_invariants()
    return [(s.req_id, len(s.token_ids)) for s in out.scheduled]


def test_budget_is_shared_running_first_then_chunked_prefill():
    sched = make_scheduler(budget=16)
    for i, name in enumerate("abc"):
        sched.add_request(req(name, 10, arrival=float(i), base=100 * i))
    assert run_step(sched) == [("a", 10), ("b", 6)]
    assert run_step(sched) == [("a", 1), ("b", 4), ("c", 10)]
    assert run_step(sched) == [("a", 1), ("b", 1), ("c", 1)]


def test_request_finishes_at_max_tokens_and_frees_blocks():
    sched = make_scheduler()
    sched.add_request(req("a", 5, max_tokens=3))
    steps = 0
    while sched.has_unfinished():
        run_step(sched)
        steps += 1
    assert steps == 3
    assert sched.kv.usage == 0
    assert sched.kv.num_free_blocks == 64


def test_max_num_seqs_bounds_running():
    sched = make_scheduler(max_seqs=2, budget=100)
    for i in range(4):
        sched.add_request(req(f"r{i}", 3, arrival=float(i), base=10 * i))
    assert [r for r, _ in run_step(sched)] == ["r0", "r1"]
    assert sched.num_waiting == 2


def test_preemption_takes_latest_arrival_and_requeues_it_at_the_front():
    # 6 blocks of 4 tokens; three 8-token prompts fill 2 blocks each.
    sched = make_scheduler(num_blocks=6, budget=64)
    for i, name in enumerate("abc"):
        sched.add_request(req(name, 8, max_tokens=10, arrival=float(i), base=100 * i))
    run_step(sched)  # all three prefill and sample their 9th token
    assert sched.kv.num_free_blocks == 0
    # Each now needs a third block; c arrived last, so c is preempted and a and b go on.
    scheduled = run_step(sched)
    assert [r for r, _ in scheduled] == ["a", "b"]
    assert sched.requests["c"].status == RequestStatus.PREEMPTED
    assert sched.requests["c"].num_computed_tokens == 0
    assert list(sched.waiting)[0].request_id == "c"
    assert sched.num_preemptions == 1


def test_repeatedly_preempted_request_becomes_protected():
    sched = make_scheduler(num_blocks=6, budget=64, max_preemptions_before_protected=1)
    a, b = req("a", 7, max_tokens=12, arrival=0.0), req("b", 7, max_tokens=12, arrival=1.0, base=50)
    b.num_preemptions = 1  # already preempted once: protected now
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)
    run_step(sched)
    # Memory is short; b is protected, so the scheduler preempts a (older) instead of b.
    for _ in range(12):
        if sched.requests.get("a") and sched.requests["a"].num_preemptions:
            break
        run_step(sched)
    assert sched.requests["a"].num_preemptions >= 1
    assert b.num_preemptions == 1


def test_priority_policy_serves_lower_value_first():
    sched = make_scheduler(max_seqs=1, budget=64, policy="priority")
    sched.add_request(req("low", 3, priority=5, arrival=0.0))
    sched.add_request(req("high", 3, priority=-1, arrival=1.0, base=10))
    assert run_step(sched) == [("high", 3)]


def test_abort_frees_blocks_in_every_state():
    sched = make_scheduler(max_seqs=1, budget=64)
    sched.add_request(req("run", 9))
    sched.add_request(req("wait", 9, base=40))
    run_step(sched)
    assert sched.kv.usage > 0
    ended = sched.finish_requests(["run", "wait", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in ended] == ["run", "wait"]
    assert not sched.has_unfinished()
    assert sched.kv.usage == 0
    sched.kv.check_invariants()
    # The runner hears about the one it had state for.
    assert sched.schedule().finished_req_ids == ["run"]


def test_prefix_hit_skips_computed_tokens():
    sched = make_scheduler(budget=64)
    sched.add_request(req("a", 10))
    run_step(sched)
    sched.add_request(req("b", 10))
    # b shares a's first two full blocks (8 tokens): only 2 tokens are computed.
    assert run_step(sched) == [("a", 1), ("b", 2)]
    assert sched.requests["b"].num_cached_tokens == 8


def test_context_limit_ends_generation():
    sched = make_scheduler(max_len=12, budget=64)
    sched.add_request(req("a", 10, max_tokens=50))
    while sched.has_unfinished():
        run_step(sched)
    assert sched.kv.usage == 0


def test_no_chunking_waits_for_a_whole_prompt_budget():
    sched = make_scheduler(budget=8, enable_chunked_prefill=False)
    sched.add_request(req("a", 6))
    sched.add_request(req("b", 6, base=50))
    assert run_step(sched) == [("a", 6)]
    assert run_step(sched) == [("a", 1), ("b", 6)]


def test_a_long_running_prompt_leaves_room_for_waiting_requests():
    sched = make_scheduler(budget=16, num_blocks=64, max_len=256)
    sched.add_request(req("long", 100, arrival=0.0))
    assert run_step(sched) == [("long", 16)]  # alone: the whole budget
    sched.add_request(req("short", 3, arrival=1.0, base=500))
    # Someone waits: the long prompt's chunk is capped at half the budget and "short" starts.
    assert run_step(sched) == [("long", 8), ("short", 3)]
    assert run_step(sched) == [("long", 15), ("short", 1)]  # nobody waits: no cap


def test_long_prefill_threshold_zero_keeps_the_whole_budget():
    sched = make_scheduler(budget=16, max_len=256, long_prefill_token_threshold=0)
    sched.add_request(req("long", 100, arrival=0.0))
    run_step(sched)
    sched.add_request(req("short", 3, arrival=1.0, base=500))
    assert run_step(sched) == [("long", 16)]
