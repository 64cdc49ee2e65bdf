"""The engine's SpecDecoder for a config: the proposer its method names, priced by the engine's
step-time predictor."""

from __future__ import annotations

import functools

from tokenmill.spec.config import SpeculativeConfig
from tokenmill.spec.cost import VerifyCost
from tokenmill.spec.decoder import SpecDecoder
from tokenmill.spec.ngram import NgramProposer
from tokenmill.spec.room import draft_room


def build_spec_decoder(config, runner, loaded, predictor, max_model_len: int, scheduler=None):
    """A SpecDecoder, or None when the engine config asks for no speculation. With `scheduler`,
    `auto` drafts only into the token budget its pending prompt work leaves (spec/room.py)."""
    spec: SpeculativeConfig | None = config.speculative_config
    if spec is None:
        return None
    if spec.method == "ngram":
        proposer = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    else:
        from tokenmill.spec.draft_model import build_draft_proposer

        proposer = build_draft_proposer(spec, config, runner, loaded)
    room = None if scheduler is None else functools.partial(draft_room, scheduler)
    return SpecDecoder(spec, proposer, VerifyCost(predictor), max_model_len, room)
