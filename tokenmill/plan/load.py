"""What one replica serves: its share of the traffic, how many requests it simulates, and which
of them are measured.

Open loop (`--rate R` over r replicas): a load balancer deals requests round robin, so a replica
sees every r-th request of a stream at rate R. Its gaps are sums of r gamma(b) gaps, i.e.
gamma(r * b) (more even than Poisson once r > 1). Every replica is statistically the same, so
one is simulated, with a full sample of its own (never the total divided by r):

    sent:  [ warm-up: n_warm | measured: n_meas | tail: n_warm ]
             queue fills       latency and        keeps the load on while the
                               throughput here    last measured requests finish

Latencies are those of the measured requests; throughput is the output tokens produced while
they were being sent, per second. The run stops when the last measured request finishes.

Closed loop (`--concurrency C`): replicas get ceil(C / r) or floor(C / r) users; the busier one
is simulated (its latencies are reported) and the total throughput is scaled by C / ceil(C / r),
which cannot overstate the lighter replicas (throughput per user falls as the batch grows).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from tokenmill.perf.step_cost import BatchShape
from tokenmill.plan.step_time import LayoutStepTime
from tokenmill.workload.arrivals import ArrivalSpec
from tokenmill.workload.sharegpt import TextEncoder
from tokenmill.workload.spec import LengthSpec, build_workload
from tokenmill.workload.types import Workload

# Open loop, measured requests per replica: enough to span PERIODS_MEASURED times the time a
# request spends in the system (= PERIODS_MEASURED x the requests in flight, by Little's law),
# within [DEFAULT_OPEN_SAMPLE, MAX_OPEN_SAMPLE]. Requests that overlap in time are correlated
# through the queue; it is the number of such periods that makes the metrics settle.
DEFAULT_OPEN_SAMPLE = 256
MAX_OPEN_SAMPLE = 4096
PERIODS_MEASURED = 40
# Whatever was asked, a window shorter than this many measured lifetimes is run again longer.
MIN_PERIODS = 8
MIN_CLOSED_PROMPTS = 64


@dataclass(frozen=True)
class ReplicaLoad:
    workload: Workload
    scale: float  # the whole deployment's traffic / this replica's
    num_measured: int  # requests [num_warmup, num_warmup + num_measured) are measured
    num_warmup: int = 0
    window_s: tuple[float, float] | None = None  # open loop: when the measured ones were sent

    @property
    def measured_end(self) -> int:
        return self.num_warmup + self.num_measured


def replica_users(concurrency: int | None, replicas: int) -> int | None:
    return None if concurrency is None else math.ceil(concurrency / replicas)


def length_sample(spec: LengthSpec, num: int, tokenizer: TextEncoder | None, seed: int) -> Workload:
    """`num` requests' lengths (all sent at 0); a prefix of it is still a random sample."""
    return build_workload(spec, num, ArrivalSpec(), tokenizer, seed)


def num_open_measured(asked: int | None, inflight: int) -> int:
    if asked:
        return min(asked, MAX_OPEN_SAMPLE)
    return min(MAX_OPEN_SAMPLE, max(DEFAULT_OPEN_SAMPLE, PERIODS_MEASURED * inflight))


def max_open_requests(asked: int | None, max_inflight: int) -> int:
    num_measured = num_open_measured(asked, max_inflight)
    return num_measured + 2 * max(num_measured // 4, max_inflight)


def closed_loop(
    sample: Workload, spec: LengthSpec, concurrency: int, replicas: int, num: int | None
) -> ReplicaLoad:
    users = replica_users(concurrency, replicas)
    n = num or max(4 * users, MIN_CLOSED_PROMPTS)
    workload = Workload(
        sample.requests[:n],
        users,
        f"{spec.describe()}; {n} requests per replica, at most {users} in flight",
    )
    return ReplicaLoad(workload, concurrency / users, n)


def open_loop(
    sample: Workload,
    spec: LengthSpec,
    arrivals: ArrivalSpec,
    replicas: int,
    num_measured: int,
    inflight: int,
    seed: int,
) -> ReplicaLoad:
    """The requests one replica receives of a stream at `arrivals.rate` dealt round robin."""
    warm = max(num_measured // 4, inflight)
    n = num_measured + 2 * warm
    b, r = arrivals.burstiness, replicas
    gaps = np.random.default_rng(seed).gamma(r * b, 1.0 / (arrivals.rate * b), size=n - 1)
    sent = [0.0, *np.cumsum(gaps).tolist()]
    requests = tuple(
        dataclasses.replace(w, arrival_s=t) for w, t in zip(sample.requests[:n], sent, strict=True)
    )
    users = replica_users(arrivals.max_concurrency, r)
    share = f"every {r}th request of " if r > 1 else ""
    description = (
        f"{spec.describe()}; {share}{arrivals.describe()}: {num_measured} measured per replica "
        f"after {warm} warm-up, {warm} more keep the load on"
    )
    return ReplicaLoad(
        Workload(requests, users, description), r, num_measured, warm,
        (sent[warm], sent[warm + num_measured]),
    )  # fmt: skip


def estimate_inflight(
    step: LayoutStepTime, rate: float, mean_in: float, mean_out: float, cap: int
) -> int:
    """Requests in flight at `rate` by Little's law: rate x (prefill + out x decode step at that
    batch), iterated to a fixed point, at most `cap` (the engine runs no more at once)."""
    prefill = step.seconds(
        BatchShape(math.ceil(mean_in), 1, int(mean_in * (mean_in + 1) / 2), int(mean_in), 1,
                   math.ceil(mean_in), 1)
    )  # fmt: skip
    ctx = int(mean_in + mean_out / 2)
    batch = 1
    for _ in range(12):
        decode = step.seconds(BatchShape(batch, batch, batch * (ctx + 1), batch * (ctx + 1), batch))
        want = min(cap, max(1, math.ceil(rate * (prefill + mean_out * decode))))
        if want == batch:
            break
        batch = want
    return batch
