"""The paper model of N replicas behind one router: multi-turn chats, prefix-aware or round robin.

    chats (turn lengths) -> conversation c sends turn t+1 when turn t has ended
        -> router: serve_ray's rank_by_prefix over every replica's cache and load | round robin
        -> replica: the engine's step (engine/step_core.py) over its Scheduler and KVCacheManager
           (prefix caching on) on a SimRunner with the planner's step model of the hardware

A conversation's prompt at turn t is its whole history (the earlier user turns and replies, then
the new user turn) as synthetic token ids fixed per conversation, so the replica that served an
earlier turn finds that prefix in its cache exactly as the engine would: a reply's tokens are the
runner's placeholder tokens, which is what that replica computed and cached. The router sees each
replica's cache as it is (as if a report came every step: no staleness) plus the prompts routed
to it and not yet ended, and its load (requests in flight). Replicas share one virtual timeline:
the earliest event runs next (a send, or the step of the busy replica whose clock is behind).
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenmill.config import SchedulerConfig
from tokenmill.engine.interfaces import RunnerOutput, SchedulerOutput
from tokenmill.engine.kv_cache_manager import KVCacheManager, prefix_block_hashes
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.step_core import StepCore
from tokenmill.plan.sim_runner import PLACEHOLDER_TOKEN, SimRunner
from tokenmill.plan.simulate import SimulationError
from tokenmill.sampling_params import SamplingParams
from tokenmill.serve_ray.prefix_index import Candidate, rank_by_prefix
from tokenmill.serve_ray.routing_table import POLICIES, ROUND_ROBIN

_ID_STRIDE = 1 << 24  # conversation c's user tokens are ids [c * stride, (c + 1) * stride)


@dataclass(frozen=True)
class ChatTurn:
    user_len: int  # the new user message in tokens, chat template included
    reply_len: int  # tokens the replica generates


@dataclass(frozen=True)
class ReplicaSetup:
    """What every replica is: its step model (a fresh SimRunner per replica) and engine limits."""

    make_runner: Callable[[int], SimRunner]  # replica index -> its runner (own jitter seed)
    num_blocks: int  # KV blocks of one replica
    block_size: int
    max_model_len: int
    scheduler: SchedulerConfig
    max_imbalance: int = 4  # as the Serve router's: requests in flight beyond the least loaded


@dataclass(frozen=True)
class RoutingRun:
    policy: str
    num_replicas: int
    num_requests: int
    duration_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    output_tok_s: float
    hit_rate: float  # prompt tokens found in a prefix cache / prompt tokens
    requests_per_replica: tuple[int, ...]


class _Replica:
    def __init__(self, setup: ReplicaSetup, index: int) -> None:
        self.runner = setup.make_runner(index)
        self.kv = KVCacheManager(setup.num_blocks, setup.block_size, enable_prefix_caching=True)
        self.scheduler = Scheduler(
            setup.scheduler, self.kv, setup.max_model_len, clock=lambda: self.runner.now
        )
        self.core = StepCore(self.scheduler, self.runner, self, clock=lambda: self.runner.now)
        self.routed: Counter[bytes] = Counter()  # block hashes of prompts in flight here
        self.num_routed = 0

    # The StepCore's host: the requests a step gave tokens to (None: nothing was scheduled).
    def finish_step(
        self,
        sched_out: SchedulerOutput,
        runner_out: RunnerOutput | None,
        expired: list[Request],
        updated: list[Request],
    ) -> list[Request] | None:
        return None if runner_out is None else updated

    def account_step(self, sched_out, runner_out, seconds: float) -> None:
        pass

    def num_matched(self, hashes: Sequence[bytes], cached: set[bytes]) -> int:
        num = 0
        for h in hashes:
            if h not in cached and h not in self.routed:
                break
            num += 1
        return num


@dataclass
class _Sent:
    conv: int
    replica: _Replica
    hashes: list[bytes]
    sent_s: float
    first_token_s: float | None = None


class _Routing:
    """One run: every conversation to its end, `concurrency` conversations at a time."""

    def __init__(
        self, chats: Sequence[Sequence[ChatTurn]], setup: ReplicaSetup, num_replicas: int,
        policy: str, concurrency: int,
    ) -> None:  # fmt: skip
        self.chats, self.setup, self.policy = chats, setup, policy
        self.replicas = [_Replica(setup, i) for i in range(num_replicas)]
        self.history: list[list[int]] = [[] for _ in chats]
        self.next_turn = [0] * len(chats)
        self.ready: list[tuple[float, int]] = [
            (0.0, c) for c in range(min(concurrency, len(chats)))
        ]
        self.next_conv = len(self.ready)
        self.sent: dict[str, _Sent] = {}
        self.ttfts: list[float] = []
        self.num_rr = self.prompt_tokens = self.hit_tokens = self.output_tokens = 0

    def run(self) -> float:
        while True:
            busy = [r for r in self.replicas if r.scheduler.has_unfinished()]
            step_at = min((r.runner.now for r in busy), default=math.inf)
            if self.ready and self.ready[0][0] <= step_at:
                self._send(*heapq.heappop(self.ready))
            elif busy:
                self._step(min(busy, key=lambda r: r.runner.now))
            else:
                return max(r.runner.now for r in self.replicas)

    def _send(self, now: float, conv: int) -> None:
        turn = self.chats[conv][self.next_turn[conv]]
        history = self.history[conv]
        start = conv * _ID_STRIDE + len(history)
        history.extend(range(start, start + turn.user_len))
        hashes = prefix_block_hashes(history, self.setup.block_size)
        replica = self._choose(hashes)
        replica.runner.now = max(replica.runner.now, now)  # an idle replica's clock catches up
        req_id = f"{conv}-{self.next_turn[conv]}"
        params = SamplingParams(max_tokens=turn.reply_len, ignore_eos=True)
        replica.scheduler.add_request(Request(req_id, list(history), params, arrival_time=now))
        replica.routed.update(hashes)
        replica.num_routed += 1
        self.sent[req_id] = _Sent(conv, replica, hashes, now)
        self.prompt_tokens += len(history)

    def _choose(self, hashes: list[bytes]) -> _Replica:
        if self.policy == ROUND_ROBIN:
            self.num_rr += 1
            return self.replicas[(self.num_rr - 1) % len(self.replicas)]
        candidates = []
        for i, r in enumerate(self.replicas):
            cached = set(r.kv.cached_block_hashes())
            in_flight = r.scheduler.num_running + r.scheduler.num_waiting
            matched = r.num_matched(hashes, cached)
            candidates.append(Candidate(str(i), matched, in_flight, len(cached) + len(r.routed)))
        ranked, _ = rank_by_prefix(candidates, self.setup.max_imbalance)
        return self.replicas[int(ranked[0])]

    def _step(self, replica: _Replica) -> None:
        updated = replica.core.step()  # the engine's own step, on the replica's clock
        if updated is None:
            raise SimulationError(
                f"a replica made no progress: its KV cache ({self.setup.num_blocks} blocks of "
                f"{self.setup.block_size}) is too small for the conversations in flight"
            )
        now = replica.runner.now
        for request in updated:
            sent = self.sent[request.request_id]
            if sent.first_token_s is None:
                sent.first_token_s = now
                self.ttfts.append(now - sent.sent_s)
            if request.is_finished:
                self._end(request, sent, now)

    def _end(self, request: Request, sent: _Sent, now: float) -> None:
        self.hit_tokens += max(request.num_cached_tokens, 0)
        self.output_tokens += request.num_output_tokens
        sent.replica.routed.subtract(sent.hashes)
        sent.replica.routed += Counter()  # drop the keys that reached zero
        conv = sent.conv
        self.history[conv].extend([PLACEHOLDER_TOKEN] * request.num_output_tokens)
        self.next_turn[conv] += 1
        if self.next_turn[conv] < len(self.chats[conv]):
            heapq.heappush(self.ready, (now, conv))
        elif self.next_conv < len(self.chats):
            heapq.heappush(self.ready, (now, self.next_conv))
            self.next_conv += 1


def simulate_routing(
    chats: Sequence[Sequence[ChatTurn]],
    setup: ReplicaSetup,
    num_replicas: int,
    policy: str,
    concurrency: int,
) -> RoutingRun:
    """Replay `chats` turn by turn on `num_replicas` replicas routed by `policy`."""
    if policy not in POLICIES:
        raise ValueError(f"routing policy must be one of {POLICIES}, got {policy!r}")
    if num_replicas < 1 or concurrency < 1:
        raise ValueError("replicas and concurrency must be >= 1")
    sim = _Routing(chats, setup, num_replicas, policy, concurrency)
    duration = sim.run()
    deciles = statistics.quantiles(sim.ttfts, n=10) if len(sim.ttfts) > 1 else sim.ttfts * 9
    return RoutingRun(
        policy=policy,
        num_replicas=num_replicas,
        num_requests=len(sim.ttfts),
        duration_s=duration,
        ttft_p50_s=statistics.median(sim.ttfts),
        ttft_p90_s=deciles[8],
        output_tok_s=sim.output_tokens / duration if duration else 0.0,
        hit_rate=sim.hit_tokens / sim.prompt_tokens if sim.prompt_tokens else 0.0,
        requests_per_replica=tuple(r.num_routed for r in sim.replicas),
    )
