"""The costliest decode batch admitted requests can form from now on: what admission checks a
new promise against.

Every running decode is served one token a step (the scheduler serves decodes before prompt
chunks, and a promise is never preempted for a lower class), so `s` steps from now a request
decoding with r tokens left is gone when s >= r and otherwise attends to its context now plus
s. A request still in its prompt starts decoding at an unknown step: it is taken as decoding
from now on and never gone, its context growing by one a step up to its last token's. Between
two of these events every context grows, so the costliest step is at one of them: the step
before a request leaves, or the step a pending one's context stops growing.

Taking every request at its last token's context at once (what admission did before) is a
bound too, and a loose one: replies of different lengths are never all at their end together.
A request with drafts pending can take several tokens a step, so it is taken at its last
token's context throughout; so is one with no max_tokens, at its context now (nothing bounds
it). With speculative decoding on, a request with no drafts now may draft later and outgrow its
one-token-a-step context: there the batch is a prediction, not a bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tokenmill.perf.step_cost import RequestShape

if TYPE_CHECKING:
    from tokenmill.engine.request import Request

Predict = Callable[[list[RequestShape]], float]


def in_prefill(request: Request) -> bool:
    """More than one token to compute: a prompt (or a recompute after preemption) is pending."""
    return request.num_tokens - request.num_computed_tokens > 1


def _tokens_left(request: Request) -> int | None:
    """Tokens it may still generate after its next one; None: no max_tokens."""
    max_tokens = request.sampling_params.max_tokens
    return None if max_tokens is None else max(max_tokens - request.num_output_tokens - 1, 0)


def final_decode_shapes(requests: list[Request]) -> list[RequestShape]:
    """Each request decoding at the most context it will have: its last token's step (its
    context now when it has no max_tokens)."""
    return [RequestShape(1, r.num_tokens - 1 + (_tokens_left(r) or 0)) for r in requests]


def _shape_at(request: Request, step: int) -> RequestShape | None:
    """Its decode `step` steps from now (module docstring); None when it is gone by then."""
    left = _tokens_left(request)
    now = request.num_tokens - 1
    if left is None or request.spec_token_ids:
        return RequestShape(1, now + (left or 0))
    if in_prefill(request):
        return RequestShape(1, now + min(step, left))
    return RequestShape(1, now + step) if step <= left else None


def worst_decode_batch(requests: list[Request], predict: Predict) -> list[RequestShape]:
    """The decode batch of the costliest step `requests` can form from now on, by `predict`."""
    events = {0}
    for r in requests:
        left = _tokens_left(r)
        if left is not None and not r.spec_token_ids:
            events.add(left)  # the step of its last token (decoding) or its last growth (prompt)
    worst: list[RequestShape] = []
    worst_s = -1.0
    for step in sorted(events):
        batch = [shape for r in requests if (shape := _shape_at(r, step)) is not None]
        seconds = predict(batch)
        if seconds > worst_s:
            worst, worst_s = batch, seconds
    return worst
