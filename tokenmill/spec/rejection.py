"""The rejection sampler: accept drafts so that every emitted token follows the target's
distribution exactly (Leviathan et al., 2023; Chen et al., 2023).

A draft token d drawn from q is accepted with probability min(1, p(d) / q(d)); on rejection the
token is drawn from the residual max(0, p - q), renormalised. A proposer that drafts without a
distribution (prompt lookup, a greedy draft model) is a point mass: q(d) = 1, so d is accepted
with probability p(d) and the residual is p without d. When every draft is accepted, one more
token (the bonus) is drawn from the target at the next position. Greedy rows are the limit of a
point-mass p: a draft is accepted iff it is the argmax, and nothing random is drawn.
"""

from __future__ import annotations

import torch


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from probs [V] by inverse CDF with a single uniform from the generator."""
    cdf = probs.double().cumsum(0)
    u = torch.rand(1, generator=generator, device=probs.device, dtype=torch.float64)
    index = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
    return min(index, probs.shape[0] - 1)


def accept_draft(
    p: torch.Tensor,
    draft: int,
    generator: torch.Generator | None,
    q: torch.Tensor | None = None,
) -> tuple[bool, int]:
    """One position: p [V] the target's probabilities, `draft` the proposed token, q [V] the
    draft's probabilities (None: a point mass on `draft`). Returns (accepted, token)."""
    q_d = 1.0 if q is None else float(q[draft])
    p_d = float(p[draft])
    u = float(torch.rand(1, generator=generator, device=p.device, dtype=torch.float64))
    if q_d > 0 and u * q_d < p_d:  # u < p(d) / q(d), without dividing by a tiny q
        return True, draft
    if q is None:
        residual = p.clone()
        residual[draft] = 0
    else:
        residual = (p - q).clamp_(min=0)
    if float(residual.sum()) <= 0:  # p == q up to rounding: nothing to correct towards
        residual = p
    return False, draw(residual, generator)


def rejection_sample(
    target_probs: torch.Tensor,
    draft_tokens: list[int],
    generator: torch.Generator | None,
    draft_probs: torch.Tensor | None = None,
) -> list[int]:
    """target_probs [k+1, V] at the k draft positions and the one after; draft_tokens [k];
    draft_probs [k, V] or None (point masses). Returns the emitted tokens: the accepted drafts
    and then one drawn token (a correction, or the bonus when all k were accepted)."""
    out: list[int] = []
    for i, draft in enumerate(draft_tokens):
        q = None if draft_probs is None else draft_probs[i]
        accepted, token = accept_draft(target_probs[i], draft, generator, q)
        out.append(token)
        if not accepted:
            return out
    out.append(draw(target_probs[len(draft_tokens)], generator))
    return out


def greedy_accept(draft_tokens: list[int], target_tokens: list[int]) -> list[int]:
    """Greedy verification: target_tokens [k+1] are the target's argmax at each position. The
    drafts are kept while they equal it; the first disagreement (or the bonus) ends the run."""
    out: list[int] = []
    for draft, target in zip(draft_tokens, target_tokens, strict=False):
        out.append(target)
        if draft != target:
            return out
    out.append(target_tokens[len(draft_tokens)])
    return out
