"""From sampled token ids to user-facing outputs: detokenize, match stop strings, gather logprobs,
and fold the n samples of a request into one RequestOutput of the request's OutputKind.

Streaming and non-streaming see the same text: when stop strings are set, the last
(longest stop string - 1) characters are held back from every output until the request ends,
since they may turn out to be the start of a stop string that is cut from the output
(sample_text.py). Each token is detokenized and searched once, so a DELTA stream of n tokens
costs O(n) in all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tokenmill.engine.interfaces import TokenLogprobs
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.sample_text import SampleText
from tokenmill.outputs import Logprob, OutputKind, RequestMetrics, RequestOutput
from tokenmill.sampling_params import SamplingParams


@dataclass
class _ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[SampleText]
    metrics: RequestMetrics
    kind: OutputKind
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    num_outputs: int = 0

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.samples)


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
        output_kind: OutputKind = OutputKind.CUMULATIVE,
    ) -> None:
        samples = []
        for index, (child_id, params) in enumerate(children):
            detok = None
            if self.tokenizer is not None:
                from tokenmill.tokenizer.detokenizer import IncrementalDetokenizer

                detok = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, params.skip_special_tokens
                )
            samples.append(SampleText(index, params, detok, output_kind))
            self._child_of[child_id] = (request_id, index)
        want_prompt_lp = children[0][1].prompt_logprobs is not None
        self._parents[request_id] = _ParentState(
            request_id, prompt, prompt_token_ids, samples, RequestMetrics(arrival_time),
            output_kind, prompt_logprobs=[None] if want_prompt_lp else None,
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
            new_ids = request.output_token_ids[sample.num_output_tokens :]
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
                self.remove(parent.request_id)
            elif parent.kind == OutputKind.FINAL_ONLY:
                continue
            output = self._make_output(parent)
            if output is not None:
                outputs.append(output)
        return outputs, stopped

    def _update_sample(
        self,
        sample: SampleText,
        request: Request,
        new_ids: list[int],
        new_logprobs: list[TokenLogprobs] | None,
    ) -> bool:
        """Fold new tokens into a sample; True when a stop string ended it."""
        params = sample.params
        status = request.status
        stop_token_ended = status == RequestStatus.FINISHED_STOPPED
        for i, token in enumerate(new_ids):
            lp = new_logprobs[i] if new_logprobs and i < len(new_logprobs) else None
            has_lp = lp is not None and sample.logprobs is not None
            lp_dict = self._to_logprob_dict(lp) if has_lp else None
            sample.add_token(token, lp_dict, lp.logprob if lp is not None else 0.0)
            is_last = i == len(new_ids) - 1
            if sample.detokenizer is None or (
                is_last and stop_token_ended and not params.include_stop_str_in_output
            ):
                continue
            piece = sample.detokenizer.add_tokens([token])
            if sample.add_text(piece, params.can_stop(sample.num_output_tokens)):
                return True
        if status.is_finished and not sample.is_finished:
            # A stop token's id or string; an abort's cause (an expired promise) when it has one.
            has_reason = stop_token_ended or status == RequestStatus.FINISHED_ABORTED
            stop_reason = request.stop_reason if has_reason else None
            sample.finish(status.finish_reason, stop_reason, flush=True)
        return False

    def _make_output(self, parent: _ParentState) -> RequestOutput | None:
        """The parent's next output; None in DELTA mode when no sample has news."""
        samples = parent.samples
        if parent.kind == OutputKind.DELTA:
            samples = [s for s in samples if s.has_news]
            if not samples:
                return None
        prompt_logprobs = parent.prompt_logprobs
        if parent.kind == OutputKind.DELTA and parent.num_outputs:
            prompt_logprobs = None  # sent with the first output
        parent.num_outputs += 1
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=[s.take_output() for s in samples],
            finished=parent.finished,
            metrics=parent.metrics,
            prompt_logprobs=prompt_logprobs,
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
