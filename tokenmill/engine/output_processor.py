"""From sampled token ids to user-facing outputs: detokenize, match stop strings, gather logprobs,
and fold the n samples of a request into one RequestOutput.

Streaming and non-streaming see the same text: when stop strings are set, the last
(longest stop string - 1) characters are held back from deltas until the request ends, since
they may turn out to be the start of a stop string that is cut from the output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tokenmill.engine.interfaces import TokenLogprobs
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tokenmill.sampling_params import SamplingParams


@dataclass
class _SampleState:
    """One of the n samples of a request (one scheduler Request)."""

    index: int
    params: SamplingParams
    detokenizer: object | None  # IncrementalDetokenizer; None for token-only models
    text: str = ""
    num_text_emitted: int = 0
    token_ids: list[int] = field(default_factory=list)
    num_tokens_emitted: int = 0
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_SampleState]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    final_only: bool = False  # report only the finished request, not every step's progress

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._parents: dict[str, _ParentState] = {}
        self._child_of: dict[str, tuple[str, int]] = {}  # scheduler request id -> (parent, index)
        self.num_prompt_tokens_total = 0

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        children: list[tuple[str, SamplingParams]],
        arrival_time: float,
        final_only: bool = False,
    ) -> None:
        samples = []
        for index, (child_id, params) in enumerate(children):
            detok = None
            if self.tokenizer is not None:
                from tokenmill.tokenizer.detokenizer import IncrementalDetokenizer

                detok = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, params.skip_special_tokens
                )
            samples.append(
                _SampleState(
                    index, params, detok, logprobs=[] if params.logprobs is not None else None
                )
            )
            self._child_of[child_id] = (request_id, index)
        want_prompt_lp = children[0][1].prompt_logprobs is not None
        self._parents[request_id] = _ParentState(
            request_id, prompt, prompt_token_ids, samples, RequestMetrics(arrival_time),
            prompt_logprobs=[None] if want_prompt_lp else None, final_only=final_only,
        )  # fmt: skip

    def has_request(self, request_id: str) -> bool:
        return request_id in self._parents

    def remove(self, request_id: str) -> list[str]:
        """Forget a parent request; returns its children's scheduler ids."""
        self._parents.pop(request_id, None)
        children = [c for c, (p, _) in self._child_of.items() if p == request_id]
        for child in children:
            del self._child_of[child]
        return children

    def add_prompt_logprobs(self, child_id: str, entries: list[TokenLogprobs | None]) -> None:
        parent_id, index = self._child_of.get(child_id, (None, 0))
        parent = self._parents.get(parent_id)
        if parent is None or index != 0 or parent.prompt_logprobs is None:
            return
        parent.prompt_logprobs.extend(self._to_logprob_dict(e) if e else None for e in entries)

    def process(
        self,
        requests: list[Request],
        logprobs: dict[str, list[TokenLogprobs]],
    ) -> tuple[list[RequestOutput], list[str]]:
        """Returns the outputs of the parents that changed, and child ids that hit a stop string
        (the engine ends those in the scheduler)."""
        now = time.time()
        changed: dict[str, _ParentState] = {}
        stopped: list[str] = []
        for request in requests:
            parent_id, index = self._child_of.get(request.request_id, (None, 0))
            parent = self._parents.get(parent_id)
            if parent is None:
                continue
            sample = parent.samples[index]
            new_ids = request.output_token_ids[len(sample.token_ids) :]
            if self._update_sample(sample, request, new_ids, logprobs.get(request.request_id)):
                stopped.append(request.request_id)
            m = parent.metrics
            if new_ids:
                if m.first_token_time is None:
                    self.num_prompt_tokens_total += len(parent.prompt_token_ids)
                m.first_token_time = m.first_token_time or now
                m.last_token_time = now
            m.num_preemptions = max(m.num_preemptions, request.num_preemptions)
            parent.num_cached_tokens = max(parent.num_cached_tokens, request.num_cached_tokens)
            changed[parent.request_id] = parent
        outputs = []
        for parent in changed.values():
            finished = parent.finished
            if finished:
                parent.metrics.finished_time = now
            elif parent.final_only:
                continue
            outputs.append(self._make_output(parent))
            if finished:
                self.remove(parent.request_id)
        return outputs, stopped

    def _update_sample(self, sample: _SampleState, request: Request, new_ids, new_logprobs) -> bool:
        """Fold new tokens into a sample; True when a stop string ended it."""
        params = sample.params
        status = request.status
        stop_token_ended = status == RequestStatus.FINISHED_STOPPED
        for i, token in enumerate(new_ids):
            sample.token_ids.append(token)
            if new_logprobs and i < len(new_logprobs):
                lp = new_logprobs[i]
                sample.cumulative_logprob += lp.logprob
                if sample.logprobs is not None:
                    sample.logprobs.append(self._to_logprob_dict(lp))
            is_last = i == len(new_ids) - 1
            if sample.detokenizer is None or (
                is_last and stop_token_ended and not params.include_stop_str_in_output
            ):
                continue
            prev_len = len(sample.text)
            sample.text += sample.detokenizer.add_tokens([token])
            can_stop = params.stop and len(sample.token_ids) >= params.min_tokens
            if can_stop and self._match_stop(sample, prev_len):
                return True
        if status.is_finished and sample.finish_reason is None:
            sample.finish_reason = status.finish_reason
            if stop_token_ended:
                sample.stop_reason = request.stop_reason
        return False

    def _match_stop(self, sample: _SampleState, prev_len: int) -> bool:
        longest = max(len(s) for s in sample.params.stop)
        search_from = max(0, prev_len - longest + 1)
        hits = [(sample.text.find(s, search_from), s) for s in sample.params.stop]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            return False
        pos, stop = min(hits)
        end = pos + len(stop) if sample.params.include_stop_str_in_output else pos
        sample.text = sample.text[:end]
        sample.finish_reason, sample.stop_reason = "stop", stop
        return True

    def _make_output(self, parent: _ParentState) -> RequestOutput:
        outputs = []
        for s in parent.samples:
            done = s.finish_reason is not None
            holdback = 0 if done or not s.params.stop else max(len(x) for x in s.params.stop) - 1
            visible = max(s.num_text_emitted, len(s.text) - holdback)
            text_delta = s.text[s.num_text_emitted : visible]
            s.num_text_emitted = visible
            ids_delta = s.token_ids[s.num_tokens_emitted :]
            lp_delta = s.logprobs[s.num_tokens_emitted :] if s.logprobs is not None else None
            s.num_tokens_emitted = len(s.token_ids)
            outputs.append(
                CompletionOutput(
                    index=s.index,
                    text=s.text,
                    token_ids=list(s.token_ids),
                    logprobs=list(s.logprobs) if s.logprobs is not None else None,
                    cumulative_logprob=s.cumulative_logprob,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                    text_delta=text_delta,
                    token_ids_delta=ids_delta,
                    logprobs_delta=lp_delta,
                )
            )
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outputs,
            finished=parent.finished,
            metrics=parent.metrics,
            prompt_logprobs=parent.prompt_logprobs,
            num_cached_tokens=parent.num_cached_tokens,
        )

    def _to_logprob_dict(self, lp: TokenLogprobs) -> dict[int, Logprob]:
        ids = [lp.token_id, *lp.top_ids]
        pieces = self._decode_pieces(ids)
        out = {lp.token_id: Logprob(lp.logprob, lp.rank, pieces[0])}
        for rank, (tid, value, piece) in enumerate(
            zip(lp.top_ids, lp.top_logprobs, pieces[1:], strict=True), start=1
        ):
            out.setdefault(tid, Logprob(value, rank, piece))
        return out

    def _decode_pieces(self, ids: list[int]) -> list[str | None]:
        if self.tokenizer is None:
            return [None] * len(ids)
        return [self.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
