"""Before a promising engine serves: a few real steps of its own to correct its step-time
predictor.

The predictor's base is the planner's profile of this machine; where `tokenmill plan calibrate`
has not run, that is a bundled default that can be several times off (on the 2-core CPU of
BENCHMARKS.md its 50 GFLOP/s priced a 512-token prompt step at 2.4 s; the step takes ~0.26 s
under GGUF weights). The online correction learns from measured steps, but only from steps that
run: with a TTFT below that price and no TPOT to cut the chunk, admission refused every request,
even on an idle engine (its fallback asks the same base model), so no step ever ran to correct
it. An engine with a latency policy therefore first computes one prompt of a full token budget
and a few decodes, unpromised, and the predictor learns their measured times as it learns any
step's.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from tokenmill.sampling_params import SamplingParams
from tokenmill.workload.slo import SLO

if TYPE_CHECKING:
    from tokenmill.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

CALIBRATION_ID = "slo-calibration"
NUM_DECODES = 3


def calibrate_predictor(engine: LLMEngine) -> None:
    """Run one full-budget prompt and NUM_DECODES decodes through `engine` when it has a latency
    policy and a predictor; nothing otherwise."""
    if engine.scheduler.slo is None or engine.predictor is None or engine.arch is None:
        return
    block_size = engine.config.cache.block_size
    room = (engine.kv_manager.num_free_blocks - 1) * block_size - NUM_DECODES
    num_tokens = min(
        engine.config.scheduler.max_num_batched_tokens,
        engine.max_model_len - NUM_DECODES - 1,
        room,
    )
    if num_tokens < 1:
        return
    vocab = engine.arch.vocab_size
    prompt = [(7919 * i + 13) % vocab for i in range(num_tokens)]  # no client's prompt prefix
    params = SamplingParams(max_tokens=NUM_DECODES + 1, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request(CALIBRATION_ID, prompt, params, slo=SLO())  # no targets: best effort
    while engine.has_unfinished_requests():
        engine.step()
    logger.info(
        "step-time predictor calibrated on a %d-token prompt and %d decodes in %.2f s",
        num_tokens, NUM_DECODES, time.perf_counter() - start,
    )  # fmt: skip
