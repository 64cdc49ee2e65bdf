"""The verify-step price "auto" compares allocations with: a plain step's bias learned per batch
size from measured plain steps, the marginal cost of a draft taken against it, and few drafts
while the marginal is still a guess."""

from tokenmill.spec.cost import FALLBACK_DECODE_S, PROBE_SHARE, VerifyCost


def test_plain_steps_teach_the_bias_and_the_marginal_is_taken_against_it():
    cost = VerifyCost(None)  # predicts FALLBACK_DECODE_S for every plain step
    contexts = [100] * 64
    for _ in range(40):
        cost.observe(contexts, 0, FALLBACK_DECODE_S + 0.010)  # the machine runs 10 ms slower
    assert abs(cost.decode_seconds(contexts) - (FALLBACK_DECODE_S + 0.010)) < 1e-4
    assert cost.decode_seconds([100] * 2) == FALLBACK_DECODE_S  # another bucket: unbiased
    cost.observe(contexts, 8, FALLBACK_DECODE_S + 0.010 + 8 * 0.001)  # 8 drafts, 1 ms each
    assert abs(cost.marginal(contexts) - 0.001) < 1e-4
    # Without the bias the plain step's 10 ms error would read as 1.25 ms more per draft.
    assert abs(cost.pricer(contexts)(4) - (FALLBACK_DECODE_S + 0.014)) < 1e-4


def test_the_first_verify_step_of_a_bucket_carries_few_drafts():
    cost = VerifyCost(None)
    assert cost.probe_cap(64) == 64 // PROBE_SHARE and cost.probe_cap(1) == 1
    cost.observe([100] * 64, 16, FALLBACK_DECODE_S + 0.016)
    assert cost.probe_cap(64) is None and cost.probe_cap(127) is None  # same bucket
    assert cost.probe_cap(128) == 128 // PROBE_SHARE  # the next bucket is still a guess


def test_an_empty_batch_has_a_price():
    class FlatPredictor:  # every plain step 10 ms
        def predict_shapes(self, shapes):
            return 0.010

    cost = VerifyCost(FlatPredictor())
    assert cost.decode_seconds([]) == 0.010  # the memo's key divides by the batch size
    assert cost.decode_seconds([50, 70]) == 0.010
