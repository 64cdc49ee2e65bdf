"""The costliest future decode batch admission checks against (engine/slo_horizon.py), against
stepping every future step by brute force."""

from __future__ import annotations

import random

from tests.slo_step_model import MS, ContextStepModel, add, make, req, run_step
from tokenmill.engine.slo_horizon import final_decode_shapes, worst_decode_batch
from tokenmill.perf.step_cost import BatchShape, RequestShape


def predict(shapes) -> float:
    return ContextStepModel().seconds(BatchShape.from_requests(shapes))


def decoding(name, prompt_len, max_tokens, num_out):
    """A request whose prompt is computed and that has produced `num_out` tokens."""
    r = req(name, prompt_len, max_tokens=max_tokens)
    for _ in range(num_out):
        r.append_output_token(7)
    r.num_computed_tokens = r.num_tokens - 1
    return r


def brute_force_worst(requests) -> float:
    """Every step from now until the last request's last token, each request one token a step,
    a pending prompt decoding from now on (the module's rule, stepped instead of reasoned)."""
    worst = 0.0
    for step in range(max(r.sampling_params.max_tokens for r in requests) + 1):
        shapes = []
        for r in requests:
            left = r.sampling_params.max_tokens - r.num_output_tokens - 1
            pending = r.num_tokens - r.num_computed_tokens > 1
            if pending or step <= left:
                shapes.append(RequestShape(1, r.num_tokens - 1 + min(step, left)))
        worst = max(worst, predict(shapes))
    return worst


def test_replies_of_different_lengths_are_not_all_at_their_end_together():
    short, long = decoding("s", 100, 11, 1), decoding("l", 100, 401, 1)
    worst = worst_decode_batch([short, long], predict)
    # Both at their last token: 109 + 499 context; the real worst: both alive at step 9 (109 +
    # 109), or the long one alone at its end (499): the latter, cheaper than both at the end.
    assert worst == [RequestShape(1, 499)]
    assert predict(worst) < predict(final_decode_shapes([short, long]))


def test_the_worst_batch_is_the_brute_force_worst_step():
    rng = random.Random(0)
    for trial in range(40):
        requests = []
        for i in range(rng.randint(1, 8)):
            prompt, max_tokens = rng.randint(4, 300), rng.randint(2, 200)
            if rng.random() < 0.3:
                requests.append(req(f"p{trial}-{i}", prompt, max_tokens=max_tokens))  # pending
            else:
                num_out = rng.randint(1, max_tokens - 1)  # not finished yet
                requests.append(decoding(f"d{trial}-{i}", prompt, max_tokens, num_out))
        worst = predict(worst_decode_batch(requests, predict))
        assert worst == brute_force_worst(requests)
        assert worst <= predict(final_decode_shapes(requests))  # never looser than before


def test_admission_promises_what_only_the_all_at_their_end_bound_refuses():
    sched, clock = make(model=ContextStepModel(), budget=512)
    a = add(sched, req("a", 8, tpot=40 * MS, max_tokens=500))  # a long reply
    c = add(sched, req("c", 470, tpot=40 * MS, max_tokens=30))  # a long prompt, a short reply
    while any(r.num_output_tokens < 3 for r in (a, c)):
        run_step(sched, clock, model=ContextStepModel())
    b = req("b", 8, tpot=26 * MS, max_tokens=4)
    # a, c and b at their last tokens together: 26.9 MS of decodes alone (MS: 1/1024 s), over
    # b's 26. c is gone long before a's context grows: the costliest step they can form is 23.3.
    assert predict(final_decode_shapes([a, c, b])) > 26 * MS
    assert predict(worst_decode_batch([a, c, b], predict)) < 24 * MS
    assert sched.slo.check(sched, [b]).is_admissible
