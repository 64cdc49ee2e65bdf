"""Property tests: random interleavings of add / step / abort / preempt keep the KV books exact."""

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_scheduler import make_scheduler, req, run_step
from tokenmill.engine.request import RequestStatus

op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 30), st.integers(1, 12), st.integers(0, 3)),
    st.tuples(st.just("step"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("abort"), st.integers(0, 40), st.just(0), st.just(0)),
    st.tuples(st.just("preempt"), st.integers(0, 40), st.just(0), st.just(0)),
)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(op, max_size=60),
    num_blocks=st.integers(8, 24),
    budget=st.integers(1, 24),
    policy=st.sampled_from(["fcfs", "priority"]),
    shared_prefix=st.booleans(),
)
def test_random_interleavings_keep_invariants(ops, num_blocks, budget, policy, shared_prefix):
    # Context limit fits the cache, as the engine guarantees: any single request always fits.
    sched = make_scheduler(num_blocks=num_blocks, budget=budget, policy=policy, max_len=32)
    kv = sched.kv
    added: list[str] = []
    for i, (kind, a, b, c) in enumerate(ops):
        if kind == "add":
            base = 0 if shared_prefix else 1000 * i
            sched.add_request(
                req(f"r{i}", a, max_tokens=b, priority=c, arrival=float(i), base=base)
            )
            added.append(f"r{i}")
        elif kind == "step":
            run_step(sched)
        elif kind == "abort" and added:
            sched.finish_requests([added[a % len(added)]], RequestStatus.FINISHED_ABORTED)
        elif kind == "preempt" and added:
            sched.preempt_request(added[a % len(added)])
        kv.check_invariants()
        pool = kv.pool
        free = sum(1 for blk in pool.blocks if blk.ref_cnt == 0 and blk.block_hash is None)
        cached = sum(1 for blk in pool.blocks if blk.ref_cnt == 0 and blk.block_hash is not None)
        used = sum(1 for blk in pool.blocks if blk.ref_cnt > 0)
        assert free + cached + used == num_blocks
        held = {blk for r in sched.requests for blk in kv.block_ids(r)}
        assert used == len(held)
    # Drain: every request finishes in bounded steps (no livelock), nothing stays referenced.
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        run_step(sched)
    assert not sched.has_unfinished()
    assert kv.usage == 0
    assert all(blk.ref_cnt == 0 for blk in kv.pool.blocks)
    kv.check_invariants()
