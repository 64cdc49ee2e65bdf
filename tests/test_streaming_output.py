"""Output kinds on the real model and the stop-string tail search in isolation: DELTA streams
carry each token once and add up to the FINAL_ONLY result; a reply cut inside a multi-byte
character keeps the character's bytes; stop strings are found across pieces without rescanning
the text."""

from __future__ import annotations

from tokenmill import SamplingParams
from tokenmill.engine.sample_text import SampleText
from tokenmill.outputs import OutputKind

REPLACEMENT = "\ufffd"


def run(engine, requests: dict[str, tuple[list[int], SamplingParams, OutputKind]]) -> dict:
    for request_id, (ids, params, kind) in requests.items():
        engine.add_request(request_id, ids, params, output_kind=kind)
    seen: dict[str, list] = {request_id: [] for request_id in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    return seen


def chat_ids(llm, text: str) -> list[int]:
    return llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": text}], tokenize=True
    )


def test_reply_cut_inside_a_character_keeps_its_bytes(llm_fp32):
    # The greedy reply is a row of emoji of 3 byte-level tokens each: 4 tokens end inside the
    # second one. The detokenizer holds those bytes back; the finished reply must flush them.
    tokenizer = llm_fp32.get_tokenizer()
    ids = chat_ids(llm_fp32, "Reply with only emoji: a party.")
    params = SamplingParams(max_tokens=4, temperature=0)
    whole = llm_fp32.generate([ids], params, use_tqdm=False)[0].outputs[0]
    assert whole.finish_reason == "length"
    full = tokenizer.decode(whole.token_ids)
    assert full.endswith(REPLACEMENT) and len(full) > 1  # the cut is inside a character
    assert whole.text == full
    seen = run(llm_fp32.engine, {"delta": (ids, params, OutputKind.DELTA)})
    assert "".join(o.outputs[0].text for o in seen["delta"]) == whole.text


def test_delta_stream_carries_each_token_once(llm_fp32):
    ids = chat_ids(llm_fp32, "Write a short poem about the sea.")
    # Three samples that end at different steps (a stop string), with logprobs.
    params = SamplingParams(
        n=3, max_tokens=40, temperature=1.0, seed=11, stop=[" the ", ","], logprobs=2
    )
    seen = run(
        llm_fp32.engine,
        {"d": (ids, params, OutputKind.DELTA), "f": (ids, params, OutputKind.FINAL_ONLY)},
    )
    (final,) = seen["f"]
    assert final.finished and len(final.outputs) == 3
    for sample in final.outputs:
        deltas = [o for out in seen["d"] for o in out.outputs if o.index == sample.index]
        # Each token, logprob and character is reported exactly once, in order.
        assert sum((d.token_ids for d in deltas), []) == sample.token_ids
        assert sum((d.logprobs for d in deltas), []) == sample.logprobs
        assert "".join(d.text for d in deltas) == sample.text
        assert [d.finish_reason for d in deltas if d.finished] == [sample.finish_reason]
        assert deltas[-1].cumulative_logprob == sample.cumulative_logprob
        assert all(d.token_ids or d.finished for d in deltas)  # no empty reports
    finish_step = {o.index: i for i, out in enumerate(seen["d"]) for o in out.outputs if o.finished}
    assert len(set(finish_step.values())) > 1, "the samples should finish at different steps"
    assert seen["d"][-1].finished


# ---- the tail search, without a model ------------------------------------------------------


def sample(kind=OutputKind.DELTA, **params) -> SampleText:
    return SampleText(0, SamplingParams(**params), None, kind)


def feed(s: SampleText, pieces: list[str], can_stop=True) -> list[str]:
    """Add one token per piece; the text each step's DELTA output reports."""
    reported = []
    for piece in pieces:
        s.add_token(1, None, 0.0)
        if s.add_text(piece, can_stop):
            break
        reported.append(s.take_output().text)
    return reported


def test_stop_string_across_pieces_is_cut():
    s = sample(stop=["o w"])
    assert feed(s, ["Hel", "lo", " wo", "rld"]) == ["H", "el"]
    assert (s.finish_reason, s.stop_reason) == ("stop", "o w")
    assert s.take_output().text == "l"  # "Hel" + "l", then the stop string is cut


def test_held_back_text_is_released_when_it_cannot_start_a_stop_string():
    s = sample(stop=["STOP", "xy"])
    assert feed(s, ["abcS", "T", "Oq", "rest"]) == ["a", "b", "cS", "TOqr"]
    assert len(s.tail) == 3  # longest stop - 1: never more is searched again
    s.finish("length", None, flush=False)
    out = s.take_output()
    assert (out.text, out.finish_reason) == ("est", "length")


def test_include_stop_str_and_earliest_match_win():
    s = sample(stop=["cd", "b"], include_stop_str_in_output=True)
    feed(s, ["a", "bcd"])
    assert s.take_output().text == "ab" and s.stop_reason == "b"


def test_min_tokens_defers_stop_strings():
    # Before can_stop, a stop string stays in the text; after it, a match that ends in new
    # text counts even when it began in the held-back tail.
    s = sample(stop=["END"])
    assert feed(s, ["xEND", "E"], can_stop=False) == ["xE", "N"]
    assert feed(s, ["ND"]) == []
    assert s.stop_reason == "END" and s.take_output().text == "D"  # "xEND" + "END", cut


def test_long_text_is_searched_only_at_its_tail():
    s = sample(kind=OutputKind.CUMULATIVE, stop=["needle"])
    for piece in ["hay "] * 2000 + ["nee", "dle", "more"]:
        assert len(s.tail) <= len("needle") - 1  # what is searched: the tail and the piece
        s.add_token(1, None, 0.0)
        if s.add_text(piece, can_stop=True):
            break
    out = s.take_output()
    assert out.text == "hay " * 2000 and out.finish_reason == "stop"
    assert out.token_ids == [1] * 2002


def test_cumulative_outputs_are_snapshots():
    s = sample(kind=OutputKind.CUMULATIVE, logprobs=0)
    for piece in ["a", "b"]:
        s.add_token(7, {7: None}, -1.0)
        s.add_text(piece, True)
    first = s.take_output()
    s.add_token(8, {8: None}, -1.0)
    s.add_text("c", True)
    second = s.take_output()
    assert (first.text, first.token_ids, len(first.logprobs)) == ("ab", [7, 7], 2)
    assert (second.text, second.token_ids, len(second.logprobs)) == ("abc", [7, 7, 8], 3)
    assert second.cumulative_logprob == -3.0
