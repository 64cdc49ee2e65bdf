"""One step's prompt tokens under promised TPOTs: how long the step may take, the chunks that
fit in it, and when a prompt should wait for a larger chunk.

A request's TPOT is the mean gap between its tokens, so what a step may take is what every
promised decoding request can still afford without its mean passing its planned TPOT (its
target times slo_tpot_share), counting the time already spent:

    allowance = min over them of  n * planned_tpot - (now - first token time)     (n: its tokens)

A request that has been decoding faster than planned has banked time; one that just produced its
first token has one planned TPOT. The allowance is capped at MAX_STEP_PLANNED_TPOTS planned
TPOTs, so that no single gap is long (streamed tokens stay smooth).

Each chunk is then the largest whose predicted step (the step's decodes, the chunks granted
before it and itself, each at its real context, sampling or not) fits the allowance.

Banked chunks. Every step with prompt tokens pays a fixed cost (on this CPU under GGUF weights
15-45 ms more than its decodes alone, BENCHMARKS.md section 11), so a prompt served in the few
tokens that fit beside the decodes each step progresses slowly. A decode-only step banks
(planned TPOT - its time) for the next one; after w of them a step may take

    cap(w) = min(planned + w * (planned - decode-only step), MAX_STEP_PLANNED_TPOTS * planned)

`banked_chunk` picks the w whose chunk c(w) carries the most prompt tokens per planned TPOT,
c(w) / (w + 1): one cycle of w waits and a chunk step takes at most (w + 1) planned TPOTs. The
scheduler's first chunk of a step waits (a decode-only step) while the step cannot carry that
chunk (or the pending prompt tokens, if fewer), and admission (slo_admission.py) charges exactly
that cycle, so what it promises is what the scheduler does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from tokenmill.engine.slo_predictor import StepTimePredictor
from tokenmill.perf.step_cost import RequestShape

if TYPE_CHECKING:
    from tokenmill.engine.request import Request

MIN_PROMPT_CHUNK = 16  # prompt tokens a step still gets when nothing fits beside its decodes
MAX_STEP_PLANNED_TPOTS = 2.0  # the longest step, in planned TPOTs of the tightest request
MAX_WAITS = 16  # decode-only steps a banked chunk may wait for


def largest_fitting(step_s: Callable[[int], float], cap: float, limit: int) -> int:
    """The largest n in [0, limit] with step_s(n) <= cap, for step_s growing with n (step_s(0)
    is not asked: 0 always counts as fitting). Interpolation between the bracket's ends, then a
    probe of the neighbour, falling back to halving: a step time that is nearly linear in n is
    found in a handful of predictions, which the scheduler pays every step."""
    if limit <= 0:
        return 0
    s_hi = step_s(limit)
    if s_hi <= cap:
        return limit
    s_lo = step_s(1)
    if s_lo > cap:
        return 0
    lo, hi = 1, limit  # step_s(lo) <= cap < step_s(hi)
    interpolate = True
    while hi - lo > 1:
        width = hi - lo
        if interpolate and s_hi > s_lo:
            guess = lo + int((cap - s_lo) / (s_hi - s_lo) * width)
        else:
            guess = (lo + hi) // 2
        guess = min(max(guess, lo + 1), hi - 1)
        s = step_s(guess)
        if s <= cap:
            lo, s_lo = guess, s
            if lo + 1 < hi and step_s(lo + 1) > cap:
                return lo
        else:
            hi, s_hi = guess, s
            if hi - 1 > lo and step_s(hi - 1) <= cap:
                return hi - 1
        interpolate = hi - lo <= width // 2  # it halved the bracket: interpolate again
    return lo


def banked_chunk(
    step_s: Callable[[int], float], decode_s: float, planned: float, limit: int
) -> tuple[int, int]:
    """(chunk, waits): the prompt chunk, at most `limit` tokens, that a step should carry after
    `waits` decode-only steps, chosen for the most prompt tokens per planned TPOT (module
    docstring). With a fixed cost per prompt step the rate grows with waits until the cap
    reaches the ceiling, so the candidates are no wait, the last wait below the ceiling and the
    first at it; ties go to fewer waits. chunk = 0: no chunk fits even after waiting."""
    best = (largest_fitting(step_s, planned, limit), 0)
    bank = planned - decode_s
    if bank <= 0 or best[0] >= limit:
        return best
    ceiling = MAX_STEP_PLANNED_TPOTS * planned
    top = min(math.ceil((ceiling - planned) / bank), MAX_WAITS)
    for waits in sorted({max(top - 1, 1), top}):
        chunk = largest_fitting(step_s, min(planned + waits * bank, ceiling), limit)
        if chunk * (best[1] + 1) > best[0] * (waits + 1):
            best = (chunk, waits)
    return best


def step_allowance(decoding: list[Request], share: float, now: float) -> tuple[float, float]:
    """(allowance, the tightest planned TPOT) of a step: what every promised request decoding
    with a TPOT target can afford (see the module docstring); (inf, inf) when none."""
    allowance = tightest = float("inf")
    for r in decoding:
        if not r.is_promised or r.is_best_effort or not r.slo.tpot_s:
            continue
        planned = r.slo.tpot_s * share
        tightest = min(tightest, planned)
        if r.first_token_time is None:
            allowance = min(allowance, planned)
            continue
        allowance = min(allowance, r.num_output_tokens * planned - (now - r.first_token_time))
    if tightest == float("inf"):
        return allowance, tightest
    return min(max(allowance, 0.0), MAX_STEP_PLANNED_TPOTS * tightest), tightest


class PromptBudget:
    """One step's prompt chunks within `cap` seconds (the allowance): the step the runner gets
    is the step predicted. `planned`: the tightest planned TPOT, for banked chunks;
    `pending_tokens`: the prompt tokens the step could serve (running prompts and promised
    waiting ones; a best-effort one starting adds its own); `limit`: the step's token budget
    for prompts."""

    def __init__(
        self,
        predictor: StepTimePredictor,
        decoding: list[Request],
        cap: float,
        planned: float = math.inf,
        pending_tokens: int = 0,
        limit: int = 0,
    ) -> None:
        self.predictor, self.cap, self.planned = predictor, cap, planned
        self.pending_tokens, self.limit = pending_tokens, limit
        self.decoding_ids = {r.request_id for r in decoding}
        # (1 + drafts, context, 1 + drafts): RequestShape.of a decode as it will be scheduled.
        self.shapes = [
            RequestShape(1 + len(r.spec_token_ids), r.num_tokens - 1, 1 + len(r.spec_token_ids))
            for r in decoding
        ]
        self.num_prompt_tokens = 0
        self.is_waiting = False  # the step waits: no prompt tokens at all, in serving order

    @functools.cached_property
    def decode_s(self) -> float:
        """The step's decodes alone, predicted (only a step with a prompt to size asks)."""
        return self.predictor.predict_shapes(self.shapes)

    @property
    def may_wait(self) -> bool:
        """Whether a decode-only step now banks time toward a larger chunk."""
        ceiling = MAX_STEP_PLANNED_TPOTS * self.planned
        return self.decode_s < self.planned and self.cap < ceiling

    def cap_chunk(self, request: Request, num_new: int, num_context: int) -> int:
        """How many of `num_new` prompt tokens after `num_context` fit. The step's first chunk
        is 0, and so is every later one (a decode-only step: no prompt behind it jumps ahead),
        while waiting banks time toward the banked chunk that the step cannot carry yet; when
        none fits and waiting cannot help, MIN_PROMPT_CHUNK, so that prompts still progress."""
        if request.request_id in self.decoding_ids:
            return num_new
        if self.is_waiting:
            return 0

        @functools.cache  # the banked chunk's search and this chunk's share predictions
        def step_s(n: int) -> float:
            chunk = RequestShape(n, num_context, int(num_context + n >= request.num_tokens))
            return self.predictor.predict_shapes([*self.shapes, chunk])

        is_first = self.num_prompt_tokens == 0
        if is_first and self.may_wait:
            target, _ = banked_chunk(step_s, self.decode_s, self.planned, self.limit)
            target = min(target, max(self.pending_tokens, num_new))
            if target > 0 and step_s(target) > self.cap:
                self.is_waiting = True  # a decode-only step: a later one carries the chunk
                return 0
        fitting = largest_fitting(step_s, self.cap, num_new)
        if fitting == 0 and is_first:
            return min(num_new, MIN_PROMPT_CHUNK)
        return fitting

    def take(self, request: Request, num_computed: int, num_new: int) -> None:
        """A chunk was scheduled: later chunks of the step are predicted beside it."""
        if request.request_id in self.decoding_ids:
            return
        is_last = num_computed + num_new >= request.num_tokens
        self.shapes.append(RequestShape(num_new, num_computed, int(is_last)))
        self.num_prompt_tokens += num_new
