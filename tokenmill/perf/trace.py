"""The step trace: per engine step, its shape, what was scheduled, and how long it took.

The engine records one StepRecord per step (EngineConfig.record_step_trace); the simulator
records the same. Calibration fits a hardware profile to a trace's shapes and wall times, and the
scheduling-equivalence check compares two traces' (req_id, num_tokens) lists step by step.
Stored as JSON lines, one record per line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokenmill.perf.step_cost import BatchShape, RequestShape, request_shapes

if TYPE_CHECKING:
    from tokenmill.engine.interfaces import SchedulerOutput


@dataclass(frozen=True)
class StepRecord:
    num_prefill_tokens: int
    num_decode_tokens: int
    num_reqs: int
    # Sum over scheduled requests of the K/V tokens attention reads: context before + new tokens.
    num_context_tokens: int
    wall_time_s: float
    # (req_id, num_scheduled_tokens) in scheduling order; empty when not recorded.
    scheduled: tuple[tuple[str, int], ...] = ()
    # One per request, same order; optional, makes calibration exact instead of spreading the
    # context evenly over requests.
    shapes: tuple[RequestShape, ...] = ()

    @classmethod
    def from_scheduler_output(cls, sched_out: SchedulerOutput, wall_time_s: float) -> StepRecord:
        shapes = request_shapes(sched_out)
        return cls(
            num_prefill_tokens=sched_out.num_prefill_tokens,
            num_decode_tokens=sched_out.num_decode_tokens,
            num_reqs=len(shapes),
            num_context_tokens=sum(r.num_new_tokens + r.num_context_tokens for r in shapes),
            wall_time_s=wall_time_s,
            scheduled=tuple((s.req_id, len(s.token_ids)) for s in sched_out.scheduled),
            shapes=tuple(shapes),
        )

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def has_prompt_tokens(self) -> bool:
        """A prompt step: some request computed prompt tokens in it (the rest, if any, decoded)."""
        return self.num_prefill_tokens > 0

    @property
    def kind(self) -> str:
        """prefill (prompt tokens only), decode (none) or mixed (both)."""
        if not self.has_prompt_tokens:
            return "decode"
        return "mixed" if self.num_decode_tokens else "prefill"

    def batch_shape(self) -> BatchShape:
        """The step's BatchShape; without per-request shapes, decodes are taken as one token
        each and the context is spread evenly over the requests."""
        if self.shapes:
            return BatchShape.from_requests(self.shapes)
        num_decode_reqs = min(self.num_decode_tokens, self.num_reqs)
        num_prefill_reqs = max(self.num_reqs - num_decode_reqs, 0)
        new_tokens = [1] * num_decode_reqs
        if num_prefill_reqs:
            chunk, extra = divmod(self.num_prefill_tokens, num_prefill_reqs)
            new_tokens += [chunk + (i < extra) for i in range(num_prefill_reqs)]
        context_total = max(self.num_context_tokens - sum(new_tokens), 0)
        per_req, extra = divmod(context_total, max(len(new_tokens), 1))
        return BatchShape.from_requests(
            RequestShape(n, per_req + (i < extra)) for i, n in enumerate(new_tokens)
        )


def write_trace(path: str | Path, records: Iterable[StepRecord], mode: str = "w") -> None:
    """One JSON line per record; mode "a" appends (in one write, so a reader sees whole lines
    or none of them, but for the last line of a write it is still reading)."""
    text = "".join(json.dumps(asdict(rec)) + "\n" for rec in records)
    with open(path, mode, encoding="utf-8") as f:
        f.write(text)


def read_trace(path: str | Path) -> list[StepRecord]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                raw = json.loads(line)
                raw["scheduled"] = tuple(tuple(x) for x in raw.get("scheduled", ()))
                raw["shapes"] = tuple(RequestShape(*x) for x in raw.get("shapes", ()))
                records.append(StepRecord(**raw))
    return records


@dataclass(frozen=True)
class ScheduleMismatch:
    step_idx: int
    expected: tuple[tuple[str, int], ...] | None  # None: that trace had ended
    actual: tuple[tuple[str, int], ...] | None

    def __str__(self) -> str:
        return f"step {self.step_idx}: expected {self.expected}, got {self.actual}"


def _by_first_appearance(records: Sequence[StepRecord]) -> list[tuple[tuple[str, int], ...]]:
    """Each step's list with request ids renamed "0", "1", ... in order of first appearance, so
    traces whose engines name requests differently compare."""
    names: dict[str, str] = {}
    return [
        tuple((names.setdefault(rid, str(len(names))), n) for rid, n in rec.scheduled)
        for rec in records
    ]


def first_schedule_mismatch(
    expected: Sequence[StepRecord], actual: Sequence[StepRecord], rename_ids: bool = False
) -> ScheduleMismatch | None:
    """The first step where the two traces scheduled different (req_id, num_tokens) lists, or
    None when they made exactly the same decisions for the same number of steps. With
    `rename_ids`, ids are compared by order of first appearance instead of by name."""
    if rename_ids:
        exp_steps, act_steps = _by_first_appearance(expected), _by_first_appearance(actual)
    else:
        exp_steps = [r.scheduled for r in expected]
        act_steps = [r.scheduled for r in actual]
    for idx in range(max(len(exp_steps), len(act_steps))):
        exp = exp_steps[idx] if idx < len(exp_steps) else None
        act = act_steps[idx] if idx < len(act_steps) else None
        if exp != act:
            return ScheduleMismatch(idx, exp, act)
    return None
