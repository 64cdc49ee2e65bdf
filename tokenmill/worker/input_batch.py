"""Flattening a scheduled step into the runner's tensors: one token stream, no padding."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.engine.interfaces import ScheduledRequest


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    # Rows of the hidden states whose logits are computed, and which request each belongs to.
    logits_indices: torch.Tensor  # [N]
    sample_rows: list[tuple[int, int]]  # (scheduled index, row in logits) for do_sample requests
    prompt_logprob_rows: dict[int, tuple[int, int]]  # scheduled index -> [row_start, row_end)
    # Requests verifying k drafts: scheduled index -> the first of their k + 1 logits rows (the
    # last one is their sample row).
    draft_rows: dict[int, int] = field(default_factory=dict)
    # The longest query of the step, and whether any request computes prompt tokens.
    max_query_len: int = 1
    has_prompt_tokens: bool = False


def prepare_inputs(
    scheduled: list[ScheduledRequest],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
    wants_prompt_logprobs,
) -> StepInputs:
    """`block_tables[b]` is scheduled request b's block table (the runner's copy);
    `wants_prompt_logprobs(req_id) -> bool` says which prompt chunks need all their logits."""
    q_lens = np.array([len(s.token_ids) for s in scheduled], dtype=np.int64)
    starts = np.zeros(len(scheduled) + 1, dtype=np.int64)
    np.cumsum(q_lens, out=starts[1:])
    computed = np.array([s.num_computed_tokens for s in scheduled], dtype=np.int64)
    seq_lens = computed + q_lens
    num_tokens = int(starts[-1])

    token_ids: list[int] = []
    for s in scheduled:
        token_ids.extend(s.token_ids)
    req_idx = np.repeat(np.arange(len(scheduled)), q_lens)  # (T,) which request owns each token
    positions = np.arange(num_tokens, dtype=np.int64) - starts[req_idx] + computed[req_idx]

    max_blocks = max(len(t) for t in block_tables)
    block_table = np.zeros((len(scheduled), max_blocks), dtype=np.int64)  # (B, max_blocks)
    for b, table in enumerate(block_tables):
        block_table[b, : len(table)] = table
    slot_mapping = (
        block_table[req_idx, positions // block_size] * block_size + positions % block_size
    )
    logits_idx, sample_rows, prompt_rows, draft_rows = _logits_rows(
        scheduled, starts, wants_prompt_logprobs
    )

    def to_t(a) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    metadata = AttentionMetadata(
        num_tokens=num_tokens,
        query_start_loc=to_t(starts),
        seq_lens=to_t(seq_lens),
        num_computed=to_t(computed),
        block_table=to_t(block_table),
        slot_mapping=to_t(slot_mapping),
        block_size=block_size,
        query_start_loc_list=starts.tolist(),
        seq_lens_list=seq_lens.tolist(),
        num_computed_list=computed.tolist(),
        num_drafts_list=[len(s.spec_token_ids) for s in scheduled] if draft_rows else [],
    )
    return StepInputs(
        input_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
        positions=to_t(positions),
        metadata=metadata,
        logits_indices=torch.tensor(logits_idx, dtype=torch.long, device=device),
        sample_rows=sample_rows,
        prompt_logprob_rows=prompt_rows,
        draft_rows=draft_rows,
        max_query_len=int(q_lens.max()) if len(q_lens) else 0,
        has_prompt_tokens=any(s.is_prompt_step for s in scheduled),
    )


def _logits_rows(scheduled: list[ScheduledRequest], starts: np.ndarray, wants_prompt_logprobs):
    """Which token rows get logits: the last of each sampling request (its last k + 1 when it
    verifies k drafts), and every row of a prompt chunk whose prompt logprobs are asked for."""
    logits_idx: list[int] = []
    sample_rows: list[tuple[int, int]] = []
    prompt_rows: dict[int, tuple[int, int]] = {}
    draft_rows: dict[int, int] = {}
    for b, s in enumerate(scheduled):
        start, end = int(starts[b]), int(starts[b + 1])
        if s.is_prompt_step and wants_prompt_logprobs(s.req_id):
            prompt_rows[b] = (len(logits_idx), len(logits_idx) + end - start)
            logits_idx.extend(range(start, end))
            if s.do_sample:
                sample_rows.append((b, len(logits_idx) - 1))
        elif s.do_sample:
            num_drafts = len(s.spec_token_ids)
            if num_drafts:
                draft_rows[b] = len(logits_idx)
            logits_idx.extend(range(end - 1 - num_drafts, end))
            sample_rows.append((b, len(logits_idx) - 1))
    return logits_idx, sample_rows, prompt_rows, draft_rows
