"""KVCacheManager: exact block ids, reference counts, prefix hits and eviction order."""

import pytest

from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request
from tokenmill.sampling_params import SamplingParams

BS = 4


def make(req_id: str, tokens: list[int]) -> Request:
    return Request(req_id, tokens, SamplingParams(max_tokens=8))


def admit(kv: KVCacheManager, req: Request, num_new: int | None = None) -> list[int] | None:
    """Take a prefix hit, then allocate for the rest (as the scheduler does on admission)."""
    hit_blocks, num_hit = kv.get_computed_blocks(req)
    num_new = req.num_tokens - num_hit if num_new is None else num_new
    new = kv.allocate_slots(req, num_new, hit_blocks)
    if new is not None:
        req.num_computed_tokens = num_hit + num_new
    kv.check_invariants()
    return new


def test_allocation_takes_lowest_free_ids_and_counts_refs():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make("a", list(range(10)))  # 10 tokens -> 3 blocks
    assert admit(kv, a) == [0, 1, 2]
    assert kv.block_ids("a") == [0, 1, 2]
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [1, 1, 1, 0]
    assert kv.num_free_blocks == 5
    assert kv.usage == pytest.approx(3 / 8)
    # Only the two full blocks are registered in the prefix cache.
    assert [kv.pool.blocks[i].block_hash is not None for i in range(3)] == [True, True, False]


def test_decode_growth_allocates_a_block_only_at_a_boundary():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make("a", list(range(8)))
    assert admit(kv, a) == [0, 1]
    a.append_output_token(100)  # token 9 needs a third block
    assert kv.allocate_slots(a, 1) == [2]
    a.num_computed_tokens += 1
    for t in (101, 102, 103):
        a.append_output_token(t)
        assert kv.allocate_slots(a, 1) == []
        a.num_computed_tokens += 1
    kv.check_invariants()
    # Block 2 filled with known tokens on the last grant: it is now registered too.
    assert kv.pool.blocks[2].block_hash is not None


def test_prefix_hit_shares_blocks_and_leaves_last_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make("a", list(range(8)))
    admit(kv, a)
    b = make("b", list(range(8)))  # identical 8 tokens: only 1 block may hit (1 token left)
    hit_blocks, num_hit = kv.get_computed_blocks(b)
    assert [blk.block_id for blk in hit_blocks] == [0] and num_hit == 4
    assert kv.allocate_slots(b, 4, hit_blocks) == [2]
    kv.check_invariants()
    assert kv.pool.blocks[0].ref_cnt == 2
    assert kv.block_ids("b") == [0, 2]
    c = make("c", list(range(12)) + [99])
    hit_blocks, num_hit = kv.get_computed_blocks(c)
    assert [blk.block_id for blk in hit_blocks] == [0, 1] and num_hit == 8
    assert kv.prefix_hits == 4 + 8 and kv.prefix_queries == 8 + 8 + 13


def test_free_returns_blocks_to_cache_and_evicts_tail_first_in_lru_order():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make("a", list(range(12)) + [7])  # blocks 0,1,2 full + block 3 partial
    admit(kv, a)
    kv.free(a)
    kv.check_invariants()
    assert kv.usage == 0
    # Freed in reverse: the partial block 3 and the tail block 2 queue before 1 and 0.
    order = list(kv.pool._free_queue)
    assert order == [4, 5, 3, 2, 1, 0]
    # A new request takes never-used blocks first, then the unhashed one, then evicts tail.
    b = make("b", [50 + i for i in range(16)])
    assert admit(kv, b) == [4, 5, 3, 2]
    assert kv.pool.num_evictions == 1  # block 2 carried a hash
    # The chain a[0:4], a[4:8] is still cached in blocks 0 and 1.
    hit_blocks, num_hit = kv.get_computed_blocks(make("c", list(range(9))))
    assert [blk.block_id for blk in hit_blocks] == [0, 1] and num_hit == 8


def test_allocation_fails_cleanly_when_blocks_run_out():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make("a", list(range(8)))
    admit(kv, a)
    b = make("b", [90 + i for i in range(9)])
    assert admit(kv, b) is None
    assert kv.block_ids("b") == []
    assert kv.num_free_blocks == 1
    kv.check_invariants()


def test_hit_on_unreferenced_cached_blocks_counts_them_against_free_space():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make("a", list(range(8)))
    admit(kv, a)
    kv.free(a)  # blocks 0,1 cached, unreferenced: all 4 blocks are "free"
    b = make("b", list(range(8)) + list(range(100, 109)))  # hit 2 blocks, 9 more tokens
    # 2 hit blocks come out of the free queue, leaving 2; 9 tokens need 3 -> refused.
    assert admit(kv, b) is None
    kv.check_invariants()
    assert kv.usage == 0


def test_rollback_forgets_hashes_registered_in_a_failed_step():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    kv.begin_step()
    a = make("a", list(range(8)))
    admit(kv, a)
    kv.rollback_step()
    kv.check_invariants()
    assert kv.get_computed_blocks(make("b", list(range(9))))[1] == 0


def test_prefix_caching_disabled_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    admit(kv, make("a", list(range(8))))
    assert kv.get_computed_blocks(make("b", list(range(9)))) == ([], 0)
    assert all(b.block_hash is None for b in kv.pool.blocks)
