"""One step's prompt tokens under promised TPOTs: how long the step may take, and the chunks that
fit in it.

A request's TPOT is the mean gap between its tokens, so what a step may take is what every
promised decoding request can still afford without its mean passing its planned TPOT (its
target times slo_tpot_share), counting the time already spent:

    allowance = min over them of  n * planned_tpot - (now - first token time)     (n: its tokens)

A request that has been decoding faster than planned has banked time; one that just produced its
first token has one planned TPOT. The allowance is capped at MAX_STEP_PLANNED_TPOTS planned
TPOTs, so that no single gap is long (streamed tokens stay smooth).

Each chunk is then the largest whose predicted step (the step's decodes, the chunks granted
before it and itself, each at its real context, sampling or not) fits the allowance. A first
chunk under MIN_EFFICIENT_CHUNK tokens waits one step when a decode-only step would bank enough
time for MIN_EFFICIENT_CHUNK tokens in the next: every step with prompt tokens pays a fixed
cost (on this CPU under GGUF weights 15-45 ms more than its decodes alone, BENCHMARKS.md
section 11), and paying it for 2-4 tokens a step left a promised prompt trickling in past its
TTFT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenmill.engine.slo_predictor import StepTimePredictor
from tokenmill.perf.step_cost import RequestShape

if TYPE_CHECKING:
    from tokenmill.engine.request import Request

MIN_PROMPT_CHUNK = 16  # prompt tokens a step still gets when nothing fits beside its decodes
MIN_EFFICIENT_CHUNK = 32  # a smaller first chunk waits while a decode-only step banks time
MAX_STEP_PLANNED_TPOTS = 2.0  # the longest step, in planned TPOTs of the tightest request


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
    """One step's prompt chunks within `cap` seconds: the step the runner gets is the step
    predicted. `next_cap`: the allowance after one decode-only step instead (None: waiting
    banks nothing), which a tiny first chunk may wait for."""

    def __init__(
        self,
        predictor: StepTimePredictor,
        decoding: list[Request],
        cap: float,
        next_cap: float | None = None,
    ) -> None:
        self.predictor, self.cap, self.next_cap = predictor, cap, next_cap
        self.decoding_ids = {r.request_id for r in decoding}
        # (1 + drafts, context, 1 + drafts): RequestShape.of a decode as it will be scheduled.
        self.shapes = [
            RequestShape(1 + len(r.spec_token_ids), r.num_tokens - 1, 1 + len(r.spec_token_ids))
            for r in decoding
        ]
        self.num_prompt_tokens = 0

    def cap_chunk(self, request: Request, num_new: int, num_context: int) -> int:
        """How many of `num_new` prompt tokens after `num_context` fit. When none does and the
        step has no prompt tokens yet (the decodes alone are predicted over the cap),
        MIN_PROMPT_CHUNK, so that prompts still progress, unless the chunk may wait."""
        if request.request_id in self.decoding_ids:
            return num_new

        def fits(n: int, cap: float = self.cap) -> bool:
            chunk = RequestShape(n, num_context, int(num_context + n >= request.num_tokens))
            return self.predictor.predict_shapes([*self.shapes, chunk]) <= cap

        if fits(num_new):
            return num_new
        lo, hi = 0, num_new - 1  # the predicted step grows with the chunk: bisect
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        efficient = min(num_new, MIN_EFFICIENT_CHUNK)
        first_and_tiny = self.num_prompt_tokens == 0 and lo < efficient
        if first_and_tiny and self.next_cap is not None and fits(efficient, self.next_cap):
            return 0  # a decode-only step first: the next one affords a real chunk
        if lo == 0 and self.num_prompt_tokens == 0:
            return min(num_new, MIN_PROMPT_CHUNK)
        return lo

    def take(self, request: Request, num_computed: int, num_new: int) -> None:
        """A chunk was scheduled: later chunks of the step are predicted beside it."""
        if request.request_id in self.decoding_ids:
            return
        is_last = num_computed + num_new >= request.num_tokens
        self.shapes.append(RequestShape(num_new, num_computed, int(is_last)))
        self.num_prompt_tokens += num_new
