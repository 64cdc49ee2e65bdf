"""Grammar masks of a whole batch at once: one bitmask for every constrained row, filled by the
grammar engine in one call, applied to the logits as one masked fill.

    bitmask = fill_bitmask(matchers, end_ids)        # (M, W) int32; bit t of row j: token t
                                                     # allowed (little-endian words)
    apply_bitmask(logits, rows, bitmask)             # logits [N, V]: rows[j] masked by row j

`fill_bitmask` is llguidance (Rust, no torch, the GIL released), so it may run on a worker
thread while the engine thread runs the forward. `apply_bitmask` is torch
and stays on the engine thread. The same tokens come out as `GrammarMatcher.mask_logits`, row by
row (tests/test_structured_mask.py), without its ~0.2 ms per row of unpacking and indexing.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from tokenmill.structured.compiler import GrammarMatcher


@lru_cache(maxsize=1)
def _executor() -> Any:
    from llguidance import LLExecutor

    return LLExecutor()


def fill_bitmask(
    matchers: Sequence[GrammarMatcher], end_ids: Sequence[Sequence[int]], parallel: bool = False
) -> np.ndarray:
    """The next-token bitmask of each matcher, (M, W) int32, W = ceil(vocab / 32) of the grammar
    engine's vocabulary. `end_ids[j]` (stop tokens the engine does not know) are allowed in row
    j where its grammar allows EOS (the output is complete).

    `parallel`: in llguidance's thread pool (for a GPU engine, whose CPU cores are idle). Else
    row after row on the calling thread (~20 us a row): on a CPU engine a second pool of busy
    threads would take cores from the forward pass's OpenMP team."""
    num_words = -(-matchers[0].vocab_size // 32)
    bitmask = np.zeros((len(matchers), num_words), dtype=np.int32)
    if parallel:
        engine_matchers = [(m.engine_matcher, j) for j, m in enumerate(matchers)]
        _executor().unsafe_compute_mask_ptr(
            engine_matchers, bitmask.ctypes.data, num_words * 4, len(matchers)
        )
    else:
        for j, m in enumerate(matchers):
            m.engine_matcher.unsafe_compute_mask_ptr(bitmask[j].ctypes.data, num_words * 4)
    words = bitmask.view(np.uint32)  # bit 31 is a token too
    for j, (matcher, ids) in enumerate(zip(matchers, end_ids, strict=True)):
        if ids and matcher.is_accepting:
            for t in ids:
                if t < 32 * num_words:
                    words[j, t >> 5] |= np.uint32(1 << (t & 31))
    return bitmask


def apply_bitmask(logits: torch.Tensor, rows: Sequence[int], bitmask: np.ndarray) -> None:
    """logits [N, V], in place: -inf in row rows[j] for every token bit j of `bitmask` (M, W)
    does not allow. Tokens past the bitmask (a vocabulary padded past the tokenizer's) are
    never allowed."""
    vocab = logits.shape[1]
    width = min(vocab, 32 * bitmask.shape[1])
    if logits.device.type == "cpu":
        # Inverted words unpack straight to the forbidden tokens: (M, width) bools.
        forbidden = np.unpackbits(
            (~bitmask).view(np.uint8), axis=1, count=width, bitorder="little"
        ).view(bool)
        _fill_cpu(logits.numpy(), rows, forbidden)
        return
    words = torch.from_numpy(bitmask).to(logits.device, non_blocking=True)  # (M, W)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (words[:, :, None] >> shifts) & 1  # (M, W, 32)
    forbidden_t = (bits == 0).view(len(rows), -1)[:, :width]  # (M, width)
    if list(rows) == list(range(logits.shape[0])):
        logits[:, :width].masked_fill_(forbidden_t, float("-inf"))
        logits[:, width:] = float("-inf")
        return
    idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
    masked = logits[idx]  # (M, V), a copy
    masked[:, :width].masked_fill_(forbidden_t, float("-inf"))
    masked[:, width:] = float("-inf")
    logits[idx] = masked


def _fill_cpu(logits: np.ndarray, rows: Sequence[int], forbidden: np.ndarray) -> None:
    # In numpy: one thread. torch's masked fill wakes OpenMP's threads, which on a busy
    # machine costs several times the work (3 ms -> 15 ms for 64 rows of 49k).
    width = forbidden.shape[1]
    if list(rows) == list(range(logits.shape[0])):
        np.copyto(logits[:, :width], -np.inf, where=forbidden)
        logits[:, width:] = -np.inf
        return
    for j, i in enumerate(rows):
        np.copyto(logits[i, :width], -np.inf, where=forbidden[j])
        logits[i, width:] = -np.inf
