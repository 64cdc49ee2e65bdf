"""The pool of KV-cache blocks: reference counts, the prefix-hash map, and LRU eviction.

Every block is in exactly one of three states:
    free    ref_cnt == 0, no hash          in the free queue
    cached  ref_cnt == 0, hash set         in the free queue (evictable) and in the hash map
    in use  ref_cnt > 0 (hash or not)      not in the free queue
The free queue is ordered least-recently-freed first; allocation takes from its head, and taking a
cached block evicts its hash.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, hash={h})"


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, KVBlock] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: free ones and evictable cached ones."""
        return len(self._free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_queue)

    @property
    def num_cached_unreferenced(self) -> int:
        return sum(1 for b in self._cached.values() if b.ref_cnt == 0)

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    def allocate(self, num: int) -> list[KVBlock]:
        if num > len(self._free_queue):
            raise RuntimeError(f"asked for {num} blocks, {len(self._free_queue)} free")
        out = []
        for _ in range(num):
            block_id, _ = self._free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
                self.num_evictions += 1
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on blocks found in the prefix cache."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free_queue[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop a reference; blocks reaching zero join the queue's tail in the order given."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free_queue[block.block_id] = None
            elif block.ref_cnt < 0:
                raise RuntimeError(f"double free of {block}")

    def cache(self, block: KVBlock, block_hash: bytes) -> bool:
        """Register a full block's hash; False when another block already holds that content."""
        if block.block_hash is not None or block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return True

    def uncache(self, block: KVBlock) -> None:
        if block.block_hash is not None and self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
        block.block_hash = None

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash (used blocks keep their data); returns how many."""
        num = len(self._cached)
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        return num

    def check_invariants(self) -> None:
        free = cached = used = 0
        for block in self.blocks:
            in_queue = block.block_id in self._free_queue
            if block.ref_cnt < 0:
                raise AssertionError(f"negative ref count: {block}")
            if (block.ref_cnt == 0) != in_queue:
                raise AssertionError(f"free-queue membership wrong: {block}, in_queue={in_queue}")
            if block.block_hash is not None and self._cached.get(block.block_hash) is not block:
                raise AssertionError(f"hash map does not point back to {block}")
            if block.ref_cnt > 0:
                used += 1
            elif block.block_hash is not None:
                cached += 1
            else:
                free += 1
        if free + cached + used != self.num_blocks:
            raise AssertionError(
                f"free {free} + cached {cached} + used {used} != {self.num_blocks}"
            )
        if len(self._cached) != sum(1 for b in self.blocks if b.block_hash is not None):
            raise AssertionError("hash map holds blocks that do not carry its hash")
