"""The routing paper model (plan/routing.py): the engine's own scheduler and prefix cache on N
replicas behind serve_ray's router, on a virtual clock."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenmill.config import SchedulerConfig
from tokenmill.engine.interfaces import SchedulerOutput
from tokenmill.plan.routing import ChatTurn, ReplicaSetup, simulate_routing
from tokenmill.plan.sim_runner import ConstantStepTime, SimRunner, StepTiming

BLOCK = 16
USER, REPLY, TURNS = 40, 10, 4


class TokenCost:
    """A step costs a fixed part plus a part per scheduled token: prefill shows in TTFT."""

    def step_time(self, sched_out: SchedulerOutput) -> StepTiming:
        tokens = sum(len(s.token_ids) for s in sched_out.scheduled)
        return StepTiming(0.01 + 1e-3 * tokens, 0.0)


def setup(timer=None) -> ReplicaSetup:
    return ReplicaSetup(
        make_runner=lambda i: SimRunner(timer or ConstantStepTime(0.01)),
        num_blocks=512,
        block_size=BLOCK,
        max_model_len=4096,
        scheduler=SchedulerConfig(max_num_batched_tokens=512),
    )


def chats(num: int) -> list[list[ChatTurn]]:
    return [[ChatTurn(USER, REPLY)] * TURNS for _ in range(num)]


def cached(computed: int) -> int:
    """Tokens of whole blocks a finished turn leaves cached: its prompt and every reply token
    but the last (sampled, never computed)."""
    return computed // BLOCK * BLOCK


PROMPTS = [USER + t * (USER + REPLY) for t in range(TURNS)]  # 40, 90, 140, 190


def test_one_replica_finds_every_earlier_turn_in_its_cache():
    run = simulate_routing(chats(1), setup(), 1, "prefix-aware", 1)
    hits = sum(cached(p + REPLY - 1) for p in PROMPTS[:-1])  # turn t hits turn t-1's blocks
    assert run.num_requests == TURNS
    assert run.hit_rate == pytest.approx(hits / sum(PROMPTS))
    assert run.output_tok_s > 0 and run.requests_per_replica == (TURNS,)


def test_prefix_aware_keeps_a_conversation_on_its_replica_where_round_robin_alternates():
    one = simulate_routing(chats(6), setup(), 1, "prefix-aware", 1)
    aware = simulate_routing(chats(6), setup(), 2, "prefix-aware", 1)
    rr = simulate_routing(chats(6), setup(), 2, "round-robin", 1)
    assert aware.hit_rate == pytest.approx(one.hit_rate)
    # One conversation at a time, round robin: turn t lands where turn t-2 ran, never t-1.
    rr_hits = sum(cached(p + REPLY - 1) for p in PROMPTS[: TURNS - 2])
    assert rr.hit_rate == pytest.approx(rr_hits / sum(PROMPTS))
    assert rr.requests_per_replica == (12, 12)
    assert sum(aware.requests_per_replica) == 24 and min(aware.requests_per_replica) > 0


def test_a_cache_miss_costs_time_to_first_token_when_prefill_is_priced():
    aware = simulate_routing(chats(6), setup(TokenCost()), 2, "prefix-aware", 1)
    rr = simulate_routing(chats(6), setup(TokenCost()), 2, "round-robin", 1)
    assert aware.hit_rate > rr.hit_rate
    assert aware.ttft_p90_s < rr.ttft_p90_s
    assert aware.duration_s < rr.duration_s


def test_replicas_spread_new_conversations_by_load():
    run = simulate_routing(chats(8), setup(), 4, "prefix-aware", 8)
    assert run.requests_per_replica == (8, 8, 8, 8)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="routing policy"):
        simulate_routing(chats(1), setup(), 2, "random", 1)
    with pytest.raises(ValueError, match="replicas and concurrency"):
        simulate_routing(chats(1), setup(), 0, "round-robin", 1)


def test_cli_prints_a_row_per_replica_count_and_policy():
    out = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli.main", "plan", "routing", "--replicas", "1,2",
         "--conversations", "2", "--concurrency", "1", "--turns", "2"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    rows = [
        line for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")
    ]
    assert [row.split(" | ")[1] for row in rows] == ["prefix-aware", "round-robin"] * 2
    assert "smollm2-135m on this-machine" in out
