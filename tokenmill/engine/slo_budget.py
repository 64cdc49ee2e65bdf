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

When the machine is not what the predictor says, the cycles are not either, and two rules keep
the promised prompts moving:
- A wait must bank. After a decode-only step, the next step waits again only if the allowance
  grew by at least half of what a wait should bank: decode-only steps that take the whole
  planned TPOT (a slow phase) would otherwise hold a prompt back until the decodes end.
- A late prompt may spend the targets' slack. When the pending promised prompts, served in
  cycles from now, would bring one past its planned first token, the step may take what every
  promised decode affords of its TPOT target itself (not the plan, and without the 2-TPOT
  ceiling): the margin kept for mispredicted steps goes to the promise about to break.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
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


def _affordable(decoding: list[Request], share: float, now: float) -> tuple[float, float]:
    """(what every promised decode with a TPOT target affords at `share` of it, negative when
    one is behind, the tightest such TPOT); (inf, inf) when none."""
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
    return allowance, tightest


def step_allowance(decoding: list[Request], share: float, now: float) -> tuple[float, float]:
    """(allowance, the tightest planned TPOT) of a step: what every promised request decoding
    with a TPOT target can afford (see the module docstring; negative: one is behind its plan,
    and the step has no time for prompts); (inf, inf) when none."""
    allowance, tightest = _affordable(decoding, share, now)
    return min(allowance, MAX_STEP_PLANNED_TPOTS * tightest), tightest


def target_allowance(decoding: list[Request], now: float) -> float:
    """What a late prompt's step may take: every promised decode's TPOT target, not its plan,
    with no ceiling (module docstring)."""
    return max(_affordable(decoding, 1.0, now)[0], 0.0)


@dataclass(frozen=True)
class PendingPrompts:
    """The promised prompts a step could serve, in service order: after each, the prompt tokens
    up to and including it, and when its first token is planned (inf: no TTFT promise)."""

    cumulative_tokens: tuple[int, ...] = ()
    first_token_by: tuple[float, ...] = ()

    @classmethod
    def of(
        cls, prompts: list[Request], first_token_by: Callable[[Request], float]
    ) -> PendingPrompts:
        counts = itertools.accumulate(r.num_tokens - r.num_computed_tokens for r in prompts)
        return cls(tuple(counts), tuple(first_token_by(r) for r in prompts))

    @property
    def num_tokens(self) -> int:
        return self.cumulative_tokens[-1] if self.cumulative_tokens else 0

    @functools.cached_property
    def has_deadline(self) -> bool:
        """Whether any of them has a first token planned (a TTFT promise)."""
        return any(by != math.inf for by in self.first_token_by)

    def is_late(self, now: float, chunk: int, cycle_s: float) -> bool:
        """Whether `chunk` tokens a cycle of `cycle_s` from now brings any past its planned first
        token (chunk 0: nothing would)."""
        if not self.has_deadline:
            return False
        if chunk <= 0:
            return True
        return any(
            now + -(-tokens // chunk) * cycle_s > by
            for tokens, by in zip(self.cumulative_tokens, self.first_token_by, strict=True)
        )


class PromptBudget:
    """One step's prompt chunks within `cap` seconds (the allowance): the step the runner gets
    is the step predicted. `planned`: the tightest planned TPOT, for banked chunks; `pending`:
    the promised prompts the step could serve (a best-effort one starting adds its own);
    `limit`: the step's token budget for prompts; `target_cap`: what a late prompt's step may
    take (target_allowance); `may_bank`: whether a decode-only step may wait for a chunk (not
    right after waits that banked nothing)."""

    def __init__(
        self,
        predictor: StepTimePredictor,
        decoding: list[Request],
        cap: float,
        planned: float = math.inf,
        pending: PendingPrompts | None = None,
        limit: int = 0,
        *,
        now: float = 0.0,
        target_cap: float = 0.0,
        may_bank: bool = True,
    ) -> None:
        self.predictor, self.allowance, self.planned = predictor, cap, planned
        self.cap = max(cap, 0.0)
        self.pending, self.limit = pending or PendingPrompts(), limit
        self.now, self.target_cap, self.may_bank = now, target_cap, may_bank
        self.decoding_ids = {r.request_id for r in decoding}
        # (1 + drafts, context, 1 + drafts): RequestShape.of a decode as it will be scheduled.
        self.shapes = [
            RequestShape(1 + len(r.spec_token_ids), r.num_tokens - 1, 1 + len(r.spec_token_ids))
            for r in decoding
        ]
        self.num_prompt_tokens = 0
        self.is_waiting = False  # the step waits: no prompt tokens at all, in serving order
        self.is_late = False  # a promised prompt would pass its plan: the targets' slack is spent

    @functools.cached_property
    def decode_s(self) -> float:
        """The step's decodes alone, predicted (only a step with a prompt to size asks)."""
        return self.predictor.predict_shapes(self.shapes)

    @property
    def may_wait(self) -> bool:
        """Whether a decode-only step now banks time toward a larger chunk."""
        ceiling = MAX_STEP_PLANNED_TPOTS * self.planned
        return self.may_bank and self.decode_s < self.planned and self.cap < ceiling

    def banked(self, next_allowance: float) -> bool:
        """Asked of the previous step's budget: whether its wait (if it waited) banked, the
        next step's allowance grown by at least half of what it was predicted to bank."""
        expected = self.planned - self.decode_s
        return not self.is_waiting or next_allowance - self.allowance >= expected / 2

    def cap_chunk(self, request: Request, num_new: int, num_context: int) -> int:
        """How many of `num_new` prompt tokens after `num_context` fit. The step's first chunk
        is 0, and so is every later one (a decode-only step: no prompt behind it jumps ahead),
        while waiting banks time toward the banked chunk that the step cannot carry yet; when
        none fits and waiting cannot help, MIN_PROMPT_CHUNK, so that prompts still progress.
        A late prompt (module docstring) raises the step's cap first."""
        if request.request_id in self.decoding_ids:
            return num_new
        if self.is_waiting:
            return 0

        @functools.cache  # the banked chunk's search and this chunk's share predictions
        def step_s(n: int) -> float:
            chunk = RequestShape(n, num_context, int(num_context + n >= request.num_tokens))
            return self.predictor.predict_shapes([*self.shapes, chunk])

        is_first = self.num_prompt_tokens == 0
        if is_first:
            # The cycle is what waiting needs and what lateness is judged by; a step with no
            # TTFT promise pending and no wait to plan (most steps) skips its predictions.
            needs_cycle = self.may_wait or self.pending.has_deadline
            target, cycle_s = self._cycle(step_s) if needs_cycle else (0, 0.0)
            self.is_late = self.pending.has_deadline and self.pending.is_late(
                self.now, target, cycle_s
            )
            if self.is_late:
                self.cap = max(self.cap, self.target_cap)
            target = min(target, max(self.pending.num_tokens, num_new))
            if self.may_wait and target > 0 and step_s(target) > self.cap:
                self.is_waiting = True  # a decode-only step: a later one carries the chunk
                return 0
        fitting = largest_fitting(step_s, self.cap, num_new)
        if fitting == 0 and is_first:
            return min(num_new, MIN_PROMPT_CHUNK)
        return fitting

    def _cycle(self, step_s: Callable[[int], float]) -> tuple[int, float]:
        """(chunk, seconds) of the cycle prompts get from now: the banked chunk after its waits
        when waiting may bank, else what fits in one step of the allowance (at least
        MIN_PROMPT_CHUNK tokens, a step of at least one planned TPOT)."""
        if self.may_wait:
            chunk, waits = banked_chunk(step_s, self.decode_s, self.planned, self.limit)
            return chunk, (waits + 1) * self.planned
        chunk = max(largest_fitting(step_s, self.cap, self.limit), MIN_PROMPT_CHUNK)
        return chunk, max(self.cap, self.planned, step_s(chunk))

    def take(self, request: Request, num_computed: int, num_new: int) -> None:
        """A chunk was scheduled: later chunks of the step are predicted beside it."""
        if request.request_id in self.decoding_ids:
            return
        is_last = num_computed + num_new >= request.num_tokens
        self.shapes.append(RequestShape(num_new, num_computed, int(is_last)))
        self.num_prompt_tokens += num_new
