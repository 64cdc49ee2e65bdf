"""Per-step attention inputs, built once by the runner and read by every layer.

For B requests with T scheduled tokens in all (no padding):

    query_start_loc [B+1]   request b's tokens are q[query_start_loc[b] : query_start_loc[b+1]]
    num_computed    [B]     tokens of request b already in the cache before this step
    seq_lens        [B]     num_computed + query_len: the keys request b attends to
    block_table     [B, max_blocks]  the cache blocks of request b, padded with 0
    slot_mapping    [T]     flat cache slot (block_id * block_size + offset) of each new token
    num_drafts      [B]     (a list) draft tokens request b's query ends with: a decode verifying
                            them (0 for prompts and plain decodes; empty when none has any)

Python-list copies of the small per-request arrays are kept too: backends on the CPU loop over
prefill segments, and reading a list is far cheaper than reading a tensor element.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    num_tokens: int
    query_start_loc: torch.Tensor  # [B+1] int64
    seq_lens: torch.Tensor  # [B] int64
    num_computed: torch.Tensor  # [B] int64
    block_table: torch.Tensor  # [B, max_blocks] int64
    slot_mapping: torch.Tensor  # [T] int64
    block_size: int
    query_start_loc_list: list[int]
    seq_lens_list: list[int]
    num_computed_list: list[int]
    num_drafts_list: list[int] = field(default_factory=list)
    # Backend-specific precomputation shared by all layers of the step (masks, gather indices).
    backend_state: dict = field(default_factory=dict)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_list, default=0)
