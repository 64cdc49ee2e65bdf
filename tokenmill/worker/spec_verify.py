"""Verifying drafts in a step: the target's logits at every draft position decide which drafts
stand (spec/rejection.py), and the tokens emitted per request are the accepted drafts plus one.

Plain greedy rows compare drafts with the argmax of each position (the fused lm_head + argmax
where the model has it: no logits are materialised). Every other row is walked position by
position: stop ids before min_tokens, grammar masks and penalties see the drafts accepted before
it, exactly as if the tokens had been sampled one step at a time; logprobs are those of the
target at each emitted position.
"""

from __future__ import annotations

import torch

from tokenmill.engine.interfaces import RunnerOutput, SchedulerOutput, TokenLogprobs
from tokenmill.spec.rejection import accept_draft, draw, greedy_accept
from tokenmill.worker.input_batch import StepInputs
from tokenmill.worker.sampler import (
    SamplingRow,
    constrained_logits,
    greedy_tokens,
    sampling_probs,
    token_logprobs,
)


def verify(runner, sched_out: SchedulerOutput, inputs: StepInputs, rows: torch.Tensor):
    """hidden rows [N, E] of a step in which some requests verify drafts -> RunnerOutput."""
    model = runner.model
    plain = not inputs.prompt_logprob_rows and all(
        _is_plain(runner._states[sched_out.scheduled[b].req_id]) for b, _ in inputs.sample_rows
    )
    out = RunnerOutput(sampled={})
    if plain:
        fused = getattr(model, "greedy_tokens", None)
        targets = fused(rows) if fused is not None else None
        if targets is None:
            targets = greedy_tokens(model.compute_logits(rows))
        targets = targets.tolist()
        for b, last in inputs.sample_rows:
            sched = sched_out.scheduled[b]
            first = inputs.draft_rows.get(b, last)
            tokens = greedy_accept(sched.spec_token_ids, targets[first : last + 1])
            out.sampled[sched.req_id] = _cut_at_stop(runner, sched.req_id, tokens)
        return out
    logits = model.compute_logits(rows)  # (N, V)
    for b, (start, end) in inputs.prompt_logprob_rows.items():
        sched = sched_out.scheduled[b]
        out.prompt_logprobs[sched.req_id] = runner._prompt_logprobs(sched, logits[start:end])
    for b, last in inputs.sample_rows:
        sched = sched_out.scheduled[b]
        first = inputs.draft_rows.get(b, last)
        tokens, logprobs = _walk(
            runner, sched.req_id, sched.spec_token_ids, logits[first : last + 1]
        )
        out.sampled[sched.req_id] = tokens
        if logprobs:
            out.logprobs[sched.req_id] = logprobs
    return out


def _is_plain(state) -> bool:
    return (
        state.params.is_plain_greedy
        and state.matcher is None
        and state.params.can_stop(len(state.output_token_ids))
    )


def _ending_ids(runner, state) -> set[int]:
    """Tokens that end the request when sampled (EOS unless ignore_eos, and stop ids)."""
    ends = set(state.params.stop_token_ids)
    if not state.params.ignore_eos:
        ends.update(runner.eos_token_ids)
    return ends


def _cut_at_stop(runner, req_id: str, tokens: list[int]) -> list[int]:
    """Nothing after a token that ends the request is emitted."""
    ends = _ending_ids(runner, runner._states[req_id])
    for i, token in enumerate(tokens):
        if token in ends:
            return tokens[: i + 1]
    return tokens


def _walk(runner, req_id: str, drafts: list[int], logits: torch.Tensor):
    """logits [k+1, V] of one request: position by position, accept or correct."""
    state = runner._states[req_id]
    params = state.params
    banned_ids = [*runner.eos_token_ids, *params.stop_token_ids]  # before min_tokens
    ends = _ending_ids(runner, state)
    tokens: list[int] = []
    logprobs: list[TokenLogprobs] = []
    for i in range(len(drafts) + 1):
        row = SamplingRow(
            params, state.generator, state.prompt_token_ids,
            state.output_token_ids + tokens, state.matcher,
        )  # fmt: skip
        raw = logits[i : i + 1].float()
        if params.logprobs is not None:
            lp_row = torch.log_softmax(raw[0], dim=-1)
        can_stop = params.can_stop(len(row.output_token_ids))
        banned = [] if can_stop else [t for t in banned_ids if t < raw.shape[1]]
        constrained = constrained_logits(raw.clone(), [row], [banned])[0]
        draft = drafts[i] if i < len(drafts) else None
        token, accepted = _decide(constrained, row, draft)
        tokens.append(token)
        if params.logprobs is not None:
            logprobs.append(token_logprobs(lp_row, token, params.logprobs))
        if state.matcher is not None and token not in params.stop_token_ids:
            state.matcher.accept(token)
        if not accepted or token in ends:
            break
    return tokens, logprobs


def _decide(logits: torch.Tensor, row: SamplingRow, draft: int | None) -> tuple[int, bool]:
    """One position: (token, whether the draft was accepted). draft None: the bonus draw."""
    if row.params.is_greedy:
        token = int(logits.argmax())
        return token, draft is not None and token == draft
    probs = sampling_probs(logits, row)
    if draft is None:
        return draw(probs, row.generator), False
    accepted, token = accept_draft(probs, draft, row.generator)
    return token, accepted
