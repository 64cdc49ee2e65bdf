"""Which KV-cache blocks each request holds, and the prefix cache over full blocks.

A full block's hash chains its parent's hash with its own token ids, so equal hashes mean equal
prefixes. Blocks are registered in the prefix cache as soon as a step is scheduled that fills
them: every layer writes the whole batch's K/V before any attention reads, so a second request in
the same step may already read them. If that step fails, `rollback_step` forgets those hashes.
"""

from __future__ import annotations

import hashlib
from array import array

from tokenmill.engine.block_pool import BlockPool, KVBlock
from tokenmill.engine.request import Request

_ROOT_HASH = b"tokenmill-kv-root"


def hash_block(parent_hash: bytes, token_ids: list[int]) -> bytes:
    # A cryptographic hash: one user's prompt must not be able to alias another's KV blocks.
    return hashlib.blake2b(parent_hash + array("q", token_ids).tobytes(), digest_size=16).digest()


def prefix_block_hashes(token_ids: list[int], block_size: int) -> list[bytes]:
    """The prefix cache's keys of `token_ids`' full blocks, in order: what a request with these
    leading tokens would look up (a replica router compares them with a replica's cache)."""
    hashes: list[bytes] = []
    for i in range(len(token_ids) // block_size):
        parent = hashes[-1] if hashes else _ROOT_HASH
        hashes.append(hash_block(parent, token_ids[i * block_size : (i + 1) * block_size]))
    return hashes


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._req_blocks: dict[str, list[KVBlock]] = {}
        # The same tables as ids, kept in step with _req_blocks: the scheduler hands these lists
        # to the runner every step without rebuilding them.
        self._req_block_ids: dict[str, list[int]] = {}
        self._num_hashed: dict[str, int] = {}  # leading blocks of a request already registered
        self._cached_this_step: list[KVBlock] = []
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests (cached-but-unreferenced ones are free)."""
        return self.pool.num_used_blocks / self.pool.num_blocks

    def cached_block_hashes(self) -> list[bytes]:
        """The hash of every block in the prefix cache (in use or evictable), a copy. Safe to call
        from another thread: it only reads the pool's fixed block list (a racing step may make
        the answer one step stale, never inconsistent with itself)."""
        return [b.block_hash for b in self.pool.blocks if b.block_hash is not None]

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a live list: read it, do not keep or change it)."""
        return self._req_block_ids.get(request_id, [])

    def num_blocks_held(self, request_id: str) -> int:
        return len(self._req_blocks.get(request_id, ()))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of the request's known tokens, in whole blocks.

        At least one token is always left to compute: its logits are what gets sampled.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        hashes = self._block_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in hashes[:max_hit_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[KVBlock] | None = None
    ) -> list[int] | None:
        """Make room for `num_new_tokens` past the computed ones; None if blocks are short.

        `computed_blocks` (a prefix hit from get_computed_blocks) are taken over first.
        Returns the ids of newly allocated blocks.
        """
        computed_blocks = computed_blocks or []
        blocks = self._req_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_total = num_computed + num_new_tokens
        num_new_blocks = max(
            0, cdiv(num_total, self.block_size) - len(blocks) - len(computed_blocks)
        )
        # Hit blocks nobody references sit in the free queue; taking them shrinks it too.
        num_hits_in_queue = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_hits_in_queue:
            return None
        self.pool.touch(computed_blocks)
        new_blocks = self.pool.allocate(num_new_blocks)
        blocks = self._req_blocks.setdefault(request.request_id, blocks)
        ids = self._req_block_ids.setdefault(request.request_id, [])
        if computed_blocks:
            blocks.extend(computed_blocks)
            ids.extend(b.block_id for b in computed_blocks)
            self._num_hashed[request.request_id] = len(blocks)
        blocks.extend(new_blocks)
        ids.extend(b.block_id for b in new_blocks)
        if self.enable_prefix_caching:
            # Draft tokens may be rejected: only blocks full of known tokens are registered.
            self._register_full_blocks(request, min(num_total, request.num_tokens))
        return [b.block_id for b in new_blocks]

    def free(self, request: Request) -> None:
        blocks = self._req_blocks.pop(request.request_id, [])
        self._req_block_ids.pop(request.request_id, None)
        self._num_hashed.pop(request.request_id, None)
        # Tail blocks are the least likely to be shared: queue them first so they go first.
        self.pool.free(reversed(blocks))

    def begin_step(self) -> None:
        self._cached_this_step.clear()

    def rollback_step(self) -> None:
        """The step that would have written the blocks registered since begin_step failed."""
        for block in self._cached_this_step:
            self.pool.uncache(block)
        self._cached_this_step.clear()
        for req_id in self._num_hashed:
            blocks = self._req_blocks[req_id]
            self._num_hashed[req_id] = next(
                (i for i, b in enumerate(blocks) if b.block_hash is None), len(blocks)
            )

    def reset_prefix_cache(self) -> int:
        self._num_hashed = dict.fromkeys(self._num_hashed, 0)
        return self.pool.reset_prefix_cache()

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        counts: dict[int, int] = {}
        for req_id, blocks in self._req_blocks.items():
            if self._req_block_ids[req_id] != [b.block_id for b in blocks]:
                raise AssertionError(f"block id table of {req_id} out of step")
            for block in blocks:
                counts[block.block_id] = counts.get(block.block_id, 0) + 1
        for block in self.pool.blocks:
            if block.ref_cnt != counts.get(block.block_id, 0):
                raise AssertionError(
                    f"{block}: ref count {block.ref_cnt}, held by {counts.get(block.block_id, 0)}"
                )

    def _block_hashes(self, request: Request) -> list[bytes]:
        hashes = request.block_hashes
        tokens = request.all_token_ids
        bs = self.block_size
        for i in range(len(hashes), len(tokens) // bs):
            parent = hashes[i - 1] if i else _ROOT_HASH
            hashes.append(hash_block(parent, tokens[i * bs : (i + 1) * bs]))
        return hashes

    def _register_full_blocks(self, request: Request, num_known_tokens: int) -> None:
        num_full = num_known_tokens // self.block_size
        start = self._num_hashed.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request)
        blocks = self._req_blocks[request.request_id]
        for i in range(start, num_full):
            if self.pool.cache(blocks[i], hashes[i]):
                self._cached_this_step.append(blocks[i])
        self._num_hashed[request.request_id] = num_full
