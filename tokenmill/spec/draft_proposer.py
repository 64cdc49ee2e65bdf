"""Drafting with a model: a smaller model (or the target's own weights, quantized) continues each
speculating request greedily, k tokens in k batched steps of its own runner and paged KV cache.

Each request has a shadow: the tokens whose K/V sit in the draft's cache. Drafts fed to the draft
model stay there after the target rejects them; the next round keeps only the shadow's common
prefix with what the request now knows, so a rejection costs a lower computed count and nothing
else (the blocks stay with the shadow and are overwritten).

    all_token_ids:  [ prompt ............. output ....... a1 a2 c ]   (accepted drafts, + one)
    shadow.tokens:  [ prompt ............. output ....... d1 d2 d3 ]  (drafts fed last round)
                    |<------------- valid ------------------->|       common prefix
    this round:     catch-up: valid .. end of all_token_ids computed, d1' sampled
                    then d1' .. d(k-1)' fed one per step, d2' .. dk' sampled

The draft runner sees the SchedulerOutput stream a scheduler would send it (block tables as
diffs, prompts announced once, finished requests named), built here from the shadows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from tokenmill.engine.interfaces import (
    NewRequestData,
    ScheduledRequest,
    SchedulerOutput,
)
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec.cost import bucket
from tokenmill.spec.target_kv import TargetKV
from tokenmill.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Drafts are the draft model's argmax (point masses for the rejection sampler).
GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 30)
ALPHA = 0.2  # weight of the newest step time
MAX_TIMED_TOKENS = 2  # steps with longer queries (prompt catch-up) are not decode steps
_CALIBRATION_ID = "tokenmill-draft-calibration"


@dataclass
class _Shadow:
    """One request as the draft model has it. Its own KV table lives in the draft's
    KVCacheManager, keyed by `request_id`; `num_computed_tokens` is what that manager reads."""

    request_id: str
    tokens: list[int] = field(default_factory=list)  # in the draft's KV cache, in order
    num_known: int = 0  # leading `tokens` that are the request's own (not drafts)
    num_block_ids_sent: int = 0  # leading entries of the table the draft runner has
    is_announced: bool = False  # the draft runner has state for it

    @property
    def num_computed_tokens(self) -> int:
        return len(self.tokens)


@dataclass
class _Round:
    """A request drafting this round: its index in the proposal, its shadow, how many drafts
    it may take, and the tokens that end it (drafting past them is wasted)."""

    index: int
    shadow: _Shadow
    num_drafts: int
    ends: frozenset[int]


@dataclass
class _CatchUp:
    """A request's share of the catch-up: the known tokens it still computes this round."""

    shadow: _Shadow
    pending: list[int]
    prompt_len: int
    round: _Round | None  # None: a prompt chunk that ends short of the known tokens


class DraftStepTimes:
    """Seconds per draft step by batch-size bucket (1, 2-3, 4-7, ...), an EMA of measured
    steps; a bucket never measured borrows the nearest measured one, else the prior."""

    def __init__(self, prior_s: float) -> None:
        self.prior_s = prior_s
        self.seconds_by_bucket: dict[int, float] = {}

    def observe(self, batch_size: int, seconds: float) -> None:
        key = bucket(batch_size)
        old = self.seconds_by_bucket.get(key)
        self.seconds_by_bucket[key] = seconds if old is None else old + ALPHA * (seconds - old)

    def seconds(self, batch_size: int) -> float:
        key = bucket(batch_size)
        if key in self.seconds_by_bucket:
            return self.seconds_by_bucket[key]
        if not self.seconds_by_bucket:
            return self.prior_s
        nearest = min(self.seconds_by_bucket, key=lambda b: (abs(b - key), b))
        return self.seconds_by_bucket[nearest]


class DraftModelProposer:
    """The Proposer of "draft" and "self" (spec/draft_model.py builds it).

    `max_len`: the most tokens one request may have in the draft's cache (its context, and
    what its KV holds); `max_catch_up_tokens`: the most tokens one catch-up step computes
    (a long new prompt is computed in chunks over several rounds, undrafted meanwhile)."""

    def __init__(
        self,
        runner: ModelRunner,
        kv: KVCacheManager,
        max_len: int,
        max_catch_up_tokens: int,
        target_kv: TargetKV | None = None,
    ) -> None:
        self.runner = runner
        self.kv = kv
        self.max_len = max_len
        self.max_catch_up_tokens = max_catch_up_tokens
        self.target_kv = target_kv  # self-draft: long gaps copied from the target's cache
        self.times = DraftStepTimes(0.0)  # the prior is measured by calibrate()
        self._shadows: dict[str, _Shadow] = {}

    # ---- the Proposer protocol ---------------------------------------------------------

    def propose(self, requests: list[Request], num_drafts: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in requests]
        try:
            rounds = self._catch_up(requests, num_drafts, drafts)
            while rounds := [r for r in rounds if self._wants_more(r, drafts[r.index])]:
                self._feed(rounds, drafts)
        except Exception:  # noqa: BLE001 - a draft fault must never fail the target's step
            logger.exception("the draft model failed: no drafts this step, its state is reset")
            self._reset()
            return [[] for _ in requests]
        return drafts

    def draft_seconds(self, num_drafts: list[int]) -> float:
        num_drafting = sum(1 for k in num_drafts if k > 0)
        if not num_drafting:
            return 0.0
        return max(num_drafts) * self.times.seconds(num_drafting)

    def release(self, request_ids: list[str]) -> None:
        announced = []
        for request_id in request_ids:
            shadow = self._shadows.pop(request_id, None)
            if shadow is None:
                continue
            self.kv.free(shadow)
            if shadow.is_announced:
                announced.append(request_id)
        if announced:
            self.runner.execute(SchedulerOutput([], [], announced))

    def calibrate(self, num_steps: int = 4) -> float:
        """Time single-token draft steps of a throwaway request (a short prompt, then its own
        drafts fed back): the fastest is the prior of draft_seconds until real rounds are
        measured. A prior too high would keep "auto" from ever drafting, so never measuring."""
        shadow = _Shadow(_CALIBRATION_ID)
        prompt = [self.runner.arch.bos_token_id or 0] * 8
        if self.kv.allocate_slots(shadow, len(prompt) + num_steps) is None:
            return self.times.prior_s
        shadow.is_announced = True
        new = [NewRequestData(_CALIBRATION_ID, prompt, GREEDY)]
        token = self._execute([self._schedule(shadow, prompt, True)], new)[_CALIBRATION_ID][-1]
        fastest = float("inf")
        for _ in range(num_steps):
            start = time.perf_counter()
            token = self._execute([self._schedule(shadow, [token], True)], [])[_CALIBRATION_ID][-1]
            fastest = min(fastest, time.perf_counter() - start)
        self._shadows[_CALIBRATION_ID] = shadow
        self.release([_CALIBRATION_ID])
        self.times.prior_s = fastest
        return fastest

    def _reset(self) -> None:
        """Forget every shadow (their blocks back to the pool) after a draft fault."""
        try:
            self.release(list(self._shadows))
        except Exception:  # noqa: BLE001 - the blocks are free; the runner's state is moot
            logger.exception("the draft runner could not drop its request state")

    @property
    def num_shadows(self) -> int:
        return len(self._shadows)

    # ---- one round -----------------------------------------------------------------------

    def _catch_up(
        self, requests: list[Request], num_drafts: list[int], drafts: list[list[int]]
    ) -> list[_Round]:
        """Compute each request's tokens missing from the draft cache (usually the target's
        correction, or the last draft and the bonus: a few tokens, which the fused CPU decode
        layer takes in one step) and sample its first draft, in one varlen step."""
        plans, new_requests, moves = self._plan_catch_up(requests, num_drafts)
        if moves:
            self.target_kv.copy(moves)
        if not plans:
            return []
        scheduled = []
        for p in plans:
            take, p.pending = p.pending, []
            is_prompt = len(p.shadow.tokens) < p.prompt_len
            scheduled.append(self._schedule(p.shadow, take, p.round is not None, is_prompt))
        sampled = self._execute(scheduled, new_requests)
        rounds = [p.round for p in plans if p.round is not None]
        for r in rounds:
            drafts[r.index].extend(sampled[r.shadow.request_id])
        return rounds

    def _plan_catch_up(self, requests: list[Request], num_drafts: list[int]):
        """What each request computes this round, with the whole round's slots allocated: all
        its missing tokens, or a chunk of what this round's budget has left (then it drafts
        nothing); a request the draft cache has no blocks for is left out. A self-draft takes
        a long gap's K/V from the target instead (`moves`, copied before the step runs)."""
        plans: list[_CatchUp] = []
        new_requests: list[NewRequestData] = []
        moves: list[tuple[str, list[int], int, int]] = []
        budget = self.max_catch_up_tokens
        for index, (request, k) in enumerate(zip(requests, num_drafts, strict=True)):
            known = request.all_token_ids
            # At the end of the round the cache holds len(known) + k - 1 tokens.
            k = min(k, self.max_len + 1 - len(known))
            if k <= 0 or budget <= 0:
                continue
            shadow = self._sync(request)
            start = copied = len(shadow.tokens)
            if self.target_kv is not None:
                copied = self.target_kv.copyable(
                    request.request_id, request.num_computed_tokens, start, len(known) - 1
                )
            num_new = min(len(known) - copied, budget)
            samples = copied + num_new == len(known)
            extra = copied - start + num_new + (k - 1 if samples else 0)
            if self.kv.allocate_slots(shadow, extra) is None:
                continue
            if copied > start:
                table = self.kv.block_ids(shadow.request_id)
                moves.append((request.request_id, table, start, copied))
                shadow.tokens.extend(known[start:copied])
            shadow.num_known = copied + num_new
            ends = request.eos_token_ids | request.stop_token_ids
            round_ = _Round(index, shadow, k, ends) if samples else None
            pending = known[copied : copied + num_new]
            plans.append(_CatchUp(shadow, pending, len(request.prompt_token_ids), round_))
            self._announce(shadow, request, new_requests)
            budget -= num_new
        return plans, new_requests, moves

    def _feed(self, rounds: list[_Round], drafts: list[list[int]]) -> None:
        """One single-token step: each request's last draft in, its next draft out."""
        scheduled = [self._schedule(r.shadow, [drafts[r.index][-1]], True) for r in rounds]
        sampled = self._execute(scheduled, [])
        for r in rounds:
            drafts[r.index].extend(sampled[r.shadow.request_id])

    @staticmethod
    def _wants_more(r: _Round, drafted: list[int]) -> bool:
        return len(drafted) < r.num_drafts and drafted[-1] not in r.ends

    # ---- shadows and the draft runner's step stream --------------------------------------

    def _sync(self, request: Request) -> _Shadow:
        """The request's shadow cut back to its common prefix with what the request knows (at
        least one known token is left to compute: its logits give the first draft)."""
        shadow = self._shadows.get(request.request_id)
        if shadow is None:
            shadow = self._shadows[request.request_id] = _Shadow(request.request_id)
        known = request.all_token_ids
        limit = min(len(shadow.tokens), len(known) - 1)
        valid = min(shadow.num_known, limit)  # the request's own tokens never change
        while valid < limit and shadow.tokens[valid] == known[valid]:
            valid += 1
        del shadow.tokens[valid:]  # rejected drafts: their slots are overwritten later
        shadow.num_known = valid
        return shadow

    def _schedule(
        self, shadow: _Shadow, token_ids: list[int], do_sample: bool, is_prompt: bool = False
    ) -> ScheduledRequest:
        """As the scheduler's _make_scheduled: the table travels as a diff; computed moves."""
        table = self.kv.block_ids(shadow.request_id)
        table_start = shadow.num_block_ids_sent
        shadow.num_block_ids_sent = len(table)
        scheduled = ScheduledRequest(
            req_id=shadow.request_id,
            token_ids=list(token_ids),
            num_computed_tokens=len(shadow.tokens),
            new_block_ids=table[table_start:],
            do_sample=do_sample,
            block_table_start=table_start,
            is_prompt_step=is_prompt,
        )
        shadow.tokens.extend(token_ids)
        return scheduled

    def _announce(self, shadow: _Shadow, request: Request, new: list[NewRequestData]) -> None:
        if not shadow.is_announced:
            shadow.is_announced = True
            new.append(NewRequestData(shadow.request_id, list(request.prompt_token_ids), GREEDY))

    def _execute(
        self, scheduled: list[ScheduledRequest], new_requests: list[NewRequestData]
    ) -> dict[str, list[int]]:
        num_prefill = sum(len(s.token_ids) for s in scheduled if s.is_prompt_step)
        num_total = sum(len(s.token_ids) for s in scheduled)
        step = SchedulerOutput(scheduled, new_requests, [], num_prefill, num_total - num_prefill)
        start = time.perf_counter()
        out = self.runner.execute(step)
        elapsed = time.perf_counter() - start
        if max(len(s.token_ids) for s in scheduled) <= MAX_TIMED_TOKENS:
            self.times.observe(len(scheduled), elapsed)
        if out.failed:
            raise RuntimeError(f"draft step failed: {out.failed}")
        return out.sampled
