"""The acceptance model `auto` allocates drafts by: per request, per proposer state (prompt
lookup: the length of the suffix it matched), per position, untried positions read as the
deepest tried one."""

from __future__ import annotations

from tokenmill.engine.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec.acceptance import AcceptanceModel
from tokenmill.spec.controller import choose_drafts, draft_gains
from tokenmill.spec.ngram import NgramProposer


def test_rates_are_learned_apart_per_state():
    model = AcceptanceModel(4, 0.6)
    for _ in range(20):  # long matches stand, short ones do not
        model.observe("r", 4, 4, state=5)
        model.observe("r", 4, 0, state=2)
    assert all(rate > 0.9 for rate in model.rates("r", 5))
    assert model.rates("r", 2)[0] < 0.1
    # A request never seen starts from every request's average in that state.
    assert model.rates("new", 5) == model.global_rate[5].view()
    assert model.rates("new", 3) == [0.6] * 4  # a state nobody has measured: the prior


def test_untried_positions_read_as_the_deepest_tried_one():
    model = AcceptanceModel(8, 0.6)
    for _ in range(10):
        model.observe("r", 4, 4)
    rates = model.rates("r")
    assert rates[4:] == [rates[3]] * 4 and rates[3] > 0.95
    # So `auto` offers drafts beyond those it tried, at a cost it takes to be worth them.
    gains = [draft_gains(rates, 8)]
    assert choose_drafts(gains, lambda counts: 1.0 + 0.05 * sum(counts)) == [8]
    model.observe("r", 6, 2)  # a miss at position 2 says nothing of position 3
    rates = model.rates("r")
    assert rates[2] < rates[3] == rates[7]


def test_released_requests_leave_no_state():
    model = AcceptanceModel(4, 0.6)
    model.observe("r", 2, 1)
    model.release(["r"])
    assert not model._per_request


def test_prompt_lookup_reports_the_length_it_matched():
    proposer = NgramProposer(2, 4)
    request = Request("a", [7, 1, 2, 3, 8, 5, 2, 3], SamplingParams(max_tokens=8))
    assert proposer.propose([request], [2]) == [[8, 5]]
    assert proposer.state("a") == 2  # "2 3" matched; "5 2 3" did not
    request.all_token_ids += [8, 5, 2, 3]
    proposer.propose([request], [2])
    assert proposer.state("a") == 4  # "8 5 2 3" did
    request.all_token_ids += [9]
    assert proposer.propose([request], [2]) == [[]] and proposer.state("a") == 0
