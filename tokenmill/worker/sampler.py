"""Turning a batch of logits into tokens: grammar masks, penalties, temperature, min-p, top-k,
top-p, logprobs.

Each row is one request (one sampled position). Greedy rows take the argmax. Random rows sample
by inverse CDF with one uniform drawn from the request's own generator, so a seeded request's
tokens do not depend on what else is in the batch. A row with a grammar matcher (structured
outputs) has the tokens its grammar forbids masked first, and its matcher advances by the token
chosen; rows without one pay nothing for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokenmill.engine.interfaces import TokenLogprobs
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.masks import apply_bitmask, fill_bitmask

if TYPE_CHECKING:
    from tokenmill.structured.compiler import GrammarMatcher


@dataclass
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    matcher: GrammarMatcher | None = None


def sample(
    logits: torch.Tensor, rows: list[SamplingRow], stop_ids_before_min: list[list[int]]
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits [N, V] (float32 ones are modified in place) -> one token per row, and logprobs
    if asked.

    `stop_ids_before_min[i]` are the ids forbidden in row i (EOS and stop tokens while the
    request is still short of min_tokens).
    """
    if all(_plain_greedy(r, ids) for r, ids in zip(rows, stop_ids_before_min, strict=True)):
        # Nothing to mask, penalise or report: the argmax is the whole answer.
        return greedy_tokens(logits).tolist(), [None] * len(rows)
    masked = _masked_greedy(logits, rows, stop_ids_before_min)
    if masked is not None:
        _advance_matchers(rows, masked)
        return masked, [None] * len(rows)
    logits = logits.float()
    want_logprobs = [r.params.logprobs is not None for r in rows]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    logits = constrained_logits(logits, rows, stop_ids_before_min)
    device = logits.device
    tokens = torch.empty(len(rows), dtype=torch.long, device=device)
    greedy = [i for i, r in enumerate(rows) if r.params.is_greedy]
    random = [i for i, r in enumerate(rows) if not r.params.is_greedy]
    if len(greedy) == len(rows):
        tokens = greedy_tokens(logits)
    elif greedy:
        idx = torch.tensor(greedy, device=device)
        tokens[idx] = greedy_tokens(logits[idx])
    if random:
        idx = torch.tensor(random, device=device)
        tokens[idx] = _sample_random(logits[idx], [rows[i] for i in random])
    token_list = tokens.tolist()
    _advance_matchers(rows, token_list)
    logprobs: list[TokenLogprobs | None] = [None] * len(rows)
    if raw_logprobs is not None:
        for i, row in enumerate(rows):
            if want_logprobs[i]:
                logprobs[i] = token_logprobs(raw_logprobs[i], token_list[i], row.params.logprobs)
    return token_list, logprobs


def constrained_logits(
    logits: torch.Tensor, rows: list[SamplingRow], stop_ids_before_min: list[list[int]]
) -> torch.Tensor:
    """float32 logits [N, V], modified in place: forbidden stop ids, grammar masks, penalties."""
    for i, ids in enumerate(stop_ids_before_min):
        if ids:
            logits[i, ids] = float("-inf")
    constrained = [i for i, row in enumerate(rows) if row.matcher is not None]
    if constrained:
        # All grammar rows in one bitmask and one masked fill (not ~0.2 ms per row).
        matchers = [rows[i].matcher for i in constrained]
        end_ids = [rows[i].params.stop_token_ids for i in constrained]
        bitmask = fill_bitmask(matchers, end_ids, parallel=logits.device.type != "cpu")
        apply_bitmask(logits, constrained, bitmask)
    if any(row.params.has_penalties for row in rows):
        _apply_penalties(logits, rows)
    # NaN never wins and +inf becomes the largest finite value (extreme penalties overflow) in
    # every row that is sampled, penalised, or argmaxed off the CPU; the CPU's native argmax
    # already skips NaN, so greedy rows there skip this pass.
    off_cpu = logits.device.type != "cpu"
    unclean = [
        i
        for i, row in enumerate(rows)
        if off_cpu or row.params.has_penalties or not row.params.is_greedy
    ]
    if unclean:
        idx = torch.tensor(unclean, device=logits.device)
        finite = torch.nan_to_num(
            logits[idx], nan=float("-inf"), posinf=torch.finfo(logits.dtype).max
        )
        logits[idx] = finite
    return logits


def sampling_probs(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """The distribution a random row samples from: constrained logits [V] after temperature,
    min-p, top-k and top-p (what speculative verification compares drafts against)."""
    return torch.softmax(_filtered_logits(logits[None], [row])[0], dim=-1)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """argmax of each row [N, V] -> [N], the first of equal values, never a NaN; natively on
    CPUs (PyTorch's bf16 argmax is slow)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.bfloat16, torch.float32):
        from tokenmill.native import kernels as native_kernels

        kernels = native_kernels()
        if kernels is not None:
            return kernels.argmax_last_dim(logits.contiguous())
    return logits.argmax(dim=-1)


def _plain_greedy(row: SamplingRow, forbidden: list[int]) -> bool:
    return row.params.is_plain_greedy and not forbidden and row.matcher is None


def _masked_greedy(
    logits: torch.Tensor, rows: list[SamplingRow], stop_ids_before_min: list[list[int]]
) -> list[int] | None:
    """Every row greedy with nothing else to apply, some under a grammar, on the CPU: the
    native argmax reads each grammar row's bitmask in place (no float copy of the logits, no
    masked fill). None where that does not apply."""
    if logits.device.type != "cpu" or logits.dtype not in (torch.bfloat16, torch.float32):
        return None
    if any(ids for ids in stop_ids_before_min) or not all(
        r.params.is_greedy and r.params.logprobs is None and not r.params.has_penalties
        for r in rows
    ):
        return None
    from tokenmill.native import kernels as native_kernels

    kernels = native_kernels()
    if kernels is None:
        return None
    constrained = [i for i, row in enumerate(rows) if row.matcher is not None]
    matchers = [rows[i].matcher for i in constrained]
    bitmask = fill_bitmask(matchers, [rows[i].params.stop_token_ids for i in constrained])
    return kernels.argmax_last_dim_masked(
        logits.contiguous(), torch.tensor(constrained), torch.from_numpy(bitmask)
    ).tolist()


def _advance_matchers(rows: list[SamplingRow], tokens: list[int]) -> None:
    for row, token in zip(rows, tokens, strict=True):
        if row.matcher is not None and token not in row.params.stop_token_ids:
            row.matcher.accept(token)


def token_logprobs(logprobs: torch.Tensor, token_id: int, num_top: int) -> TokenLogprobs:
    """logprobs [V] of one position; the chosen token's logprob, rank and the top-n."""
    chosen = logprobs[token_id]
    rank = int((logprobs > chosen).sum()) + 1
    top = torch.topk(logprobs, num_top) if num_top > 0 else None
    return TokenLogprobs(
        token_id=token_id,
        logprob=float(chosen),
        rank=rank,
        top_ids=top.indices.tolist() if top is not None else [],
        top_logprobs=top.values.tolist() if top is not None else [],
    )


def batch_token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> list[TokenLogprobs]:
    """logits [N, V] and the token taken at each row [N] -> logprobs, ranks and top-n per row."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None])  # (N, 1)
    ranks = ((logprobs > chosen).sum(dim=1) + 1).tolist()
    top_ids: list[list[int]] = [[] for _ in ranks]
    top_values: list[list[float]] = [[] for _ in ranks]
    if num_top > 0:
        top = torch.topk(logprobs, num_top, dim=-1)
        top_ids, top_values = top.indices.tolist(), top.values.tolist()
    return [
        TokenLogprobs(t, lp, r, ids, vals)
        for t, lp, r, ids, vals in zip(
            token_ids.tolist(), chosen[:, 0].tolist(), ranks, top_ids, top_values, strict=True
        )
    ]


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        p = row.params
        if not p.has_penalties:
            continue
        device = logits.device
        out_ids = torch.tensor(row.output_token_ids, dtype=torch.long, device=device)
        counts = torch.zeros(vocab, dtype=logits.dtype, device=device)
        counts.index_add_(0, out_ids, torch.ones_like(out_ids, dtype=logits.dtype))
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            if row.prompt_token_ids:
                seen[torch.tensor(row.prompt_token_ids, device=device)] = True
            penalised = torch.where(
                logits[i] > 0, logits[i] / p.repetition_penalty, logits[i] * p.repetition_penalty
            )
            logits[i] = torch.where(seen, penalised, logits[i])
        if p.frequency_penalty:
            logits[i] -= p.frequency_penalty * counts
        if p.presence_penalty:
            logits[i] -= p.presence_penalty * (counts > 0).to(logits.dtype)


def _filtered_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, min-p, top-k and top-p applied to logits [M, V] of random rows."""
    device = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype, device=device)
    logits = logits / temps[:, None]
    min_ps = [r.params.min_p for r in rows]
    if any(min_ps):
        probs = torch.softmax(logits, dim=-1)
        min_p = torch.tensor(min_ps, dtype=logits.dtype, device=device)[:, None]
        threshold = min_p * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    top_ks = [r.params.effective_top_k for r in rows]
    if any(top_ks):
        logits = _top_k(logits, top_ks)
    top_ps = [r.params.top_p for r in rows]
    if any(p < 1.0 for p in top_ps):
        logits = _top_p(logits, top_ps)
    return logits


def _sample_random(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logits [M, V] of random rows -> [M] token ids."""
    device = logits.device
    logits = _filtered_logits(logits, rows)
    # Inverse CDF, one uniform per row drawn from the row's own generator: a seeded request's
    # tokens do not depend on the batch, and a draw costs one random number instead of one per
    # vocabulary entry (an exponential race over 49k entries took ~0.7 ms per row).
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    u = torch.cat([torch.rand(1, generator=r.generator, device=device) for r in rows])
    # The first entry whose cumulative mass exceeds the target: never a zero-probability one.
    tokens = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1).contiguous(), right=True)
    return tokens.squeeze(1).clamp_(max=cdf.shape[1] - 1)


def _top_k(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    vocab = logits.shape[1]
    ks = [k if 0 < k < vocab else vocab for k in top_ks]
    max_k = max(ks)
    top_values = torch.topk(logits, max_k, dim=-1).values  # (M, max_k), descending
    kth = top_values.gather(1, torch.tensor(ks, device=logits.device)[:, None] - 1)  # (M, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(logits: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    rows = [i for i, p in enumerate(top_ps) if p < 1.0]
    idx = torch.tensor(rows, device=logits.device)
    sub = logits[idx]
    sorted_logits, order = sub.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it
    # already does. The first token is always kept.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    limits = torch.tensor([top_ps[i] for i in rows], dtype=logits.dtype, device=logits.device)
    drop = mass_before >= limits[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    logits = logits.clone()
    logits[idx] = torch.empty_like(sub).scatter_(1, order, sorted_logits)
    return logits
