"""A self-draft reads the target's K/V instead of computing its own for the prompt.

The self-draft is the target's own model with quantized weights: where a request starts
drafting, the draft would otherwise prefill the whole prompt (on ShareGPT ~850 tokens to gain
from a reply of <= 96), and after a spell without drafts every token since. The target has
computed those tokens' K/V already, with its own (better) weights; drafts need not be exact
(verification is), so the draft takes them by a block copy between the two paged caches (a few
milliseconds for a long prompt instead of a prefill).

Only where both caches hold the same layers, heads, block size and dtype (a "draft" model of
another architecture computes its own).
"""

from __future__ import annotations

import torch

from tokenmill.worker.model_runner import ModelRunner

# A gap shorter than this is computed by the catch-up step as before (a token or two after each
# verify); copying pays for prompts and long spells without drafts.
COPY_MIN_TOKENS = 16


class TargetKV:
    def __init__(self, target: ModelRunner, draft: ModelRunner) -> None:
        self.target = target
        self.draft = draft
        self.block_size = draft.block_size

    @staticmethod
    def compatible(target, draft: ModelRunner) -> bool:
        if not isinstance(target, ModelRunner):
            return False
        t, d = target.kv_cache, draft.kv_cache
        same_scales = (target.kv_scales is None) == (draft.kv_scales is None)
        return (
            t.dtype == d.dtype
            and t.shape[:2] == d.shape[:2]
            and t.shape[3:] == d.shape[3:]
            and target.block_size == draft.block_size
            and same_scales
        )

    def copyable(self, request_id: str, computed: int, start: int, end: int) -> int:
        """How far the draft can take the target's K/V for a shadow holding `start` tokens,
        whose request the target has computed `computed` of (at most `end`, the draft must
        compute a token itself for its first draft's logits): `start` when not worth a copy."""
        upto = min(computed, end)
        if upto - start < COPY_MIN_TOKENS or request_id not in self.target._states:
            return start
        return upto

    def copy(self, moves: list[tuple[str, list[int], int, int]]) -> None:
        """(request id, the draft's block table, first, end): the target's K/V of positions
        first .. end - 1 into the draft's blocks (whole blocks: the first block's earlier
        slots get the target's values for the same tokens, the last block's later slots are
        written by the draft before they are read)."""
        src, dst = [], []
        for request_id, draft_table, first, end in moves:
            target_table = self.target._states[request_id].block_ids
            lo, hi = first // self.block_size, (end - 1) // self.block_size + 1
            src += target_table[lo:hi]
            dst += draft_table[lo:hi]
        if not src:
            return
        device = self.draft.kv_cache.device
        src_t = torch.tensor(src, device=device)
        dst_t = torch.tensor(dst, device=device)
        self.draft.kv_cache[:, :, dst_t] = self.target.kv_cache[:, :, src_t]
        if self.draft.kv_scales is not None:
            self.draft.kv_scales[:, :, dst_t] = self.target.kv_scales[:, :, src_t]
