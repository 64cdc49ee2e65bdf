from tokenmill.engine.interfaces import ScheduledRequest, SchedulerOutput
from tokenmill.perf.trace import StepRecord, first_schedule_mismatch, read_trace, write_trace


def _sched_out():
    return SchedulerOutput(
        scheduled=[
            ScheduledRequest("a", [1], 10, [0], do_sample=True),
            ScheduledRequest("b", [2] * 6, 0, [1], do_sample=False, is_prompt_step=True),
        ],
        new_requests=[],
        finished_req_ids=[],
        num_prefill_tokens=6,
        num_decode_tokens=1,
    )


def test_record_from_scheduler_output_and_round_trip(tmp_path):
    rec = StepRecord.from_scheduler_output(_sched_out(), 0.5)
    assert rec.scheduled == (("a", 1), ("b", 6))
    assert rec.shapes == ((1, 10, 1), (6, 0, 0))
    assert rec.num_context_tokens == 11 + 6
    shape = rec.batch_shape()
    assert (shape.num_tokens, shape.num_logits, shape.num_attn_pairs) == (7, 1, 11 + 21)
    path = tmp_path / "trace.jsonl"
    write_trace(path, [rec, rec])
    assert read_trace(path) == [rec, rec]


def test_prompt_steps_and_step_kinds():
    rec = StepRecord.from_scheduler_output(_sched_out(), 0.5)
    assert rec.has_prompt_tokens and rec.kind == "mixed"
    assert StepRecord(6, 0, 1, 6, 0.1).kind == "prefill"
    decode = StepRecord(0, 2, 2, 30, 0.1)
    assert not decode.has_prompt_tokens and decode.kind == "decode"


def test_batch_shape_without_per_request_shapes_spreads_context():
    rec = StepRecord(6, 2, 3, 2 + 6 + 100, 0.1)
    shape = rec.batch_shape()
    assert shape.num_tokens == 8
    assert shape.num_reqs == 3
    assert shape.num_kv_read_tokens == 108


def test_first_schedule_mismatch():
    a = [StepRecord(1, 0, 1, 1, 0.1, (("x", 1),)), StepRecord(0, 1, 1, 2, 0.1, (("x", 1),))]
    assert first_schedule_mismatch(a, list(a)) is None
    b = [a[0], StepRecord(0, 1, 1, 2, 0.1, (("y", 1),))]
    mismatch = first_schedule_mismatch(a, b)
    assert mismatch.step_idx == 1
    assert first_schedule_mismatch(a, a[:1]).actual is None
