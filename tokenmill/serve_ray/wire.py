"""What crosses between the ingress and a replica: plain, picklable data only.

    ingress --ReplicaRequest--> replica.generate()
            <--Accepted | Refused--       the engine's verdict on the add (first item)
            <--RequestOutput ... | Failed--  the outputs, or the error that ended them

Exceptions travel as (type, args, attributes) and are rebuilt on the other side, so a refusal
raises the engine's own error type (a 400, a 429 with Retry-After) with its own message rather
than Ray's wrapper and its remote traceback.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tokenmill.outputs import OutputKind
from tokenmill.sampling_params import SamplingParams
from tokenmill.workload.slo import SLO


@dataclass(frozen=True)
class ReplicaRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # a grammar travels uncompiled: the replica compiles its own
    priority: int = 0
    output_kind: OutputKind = OutputKind.DELTA
    slo: SLO | None = None
    block_keys: tuple[int, ...] = ()  # the prompt's prefix-cache keys, for the router
    # time.time() when the ingress had it (TTFT promises count from it; across machines this
    # trusts their clocks to agree, as NTP keeps them to a few ms). None: when a replica takes it.
    arrival_time: float | None = None


@dataclass(frozen=True)
class Accepted:
    replica_id: str


@dataclass(frozen=True)
class WireError:
    """An exception as data."""

    type: type
    args: tuple
    attributes: dict

    @classmethod
    def of(cls, exc: BaseException) -> WireError:
        return cls(type(exc), tuple(exc.args), dict(vars(exc)))

    def rebuild(self) -> BaseException:
        exc = self.type.__new__(self.type)
        exc.args = self.args
        vars(exc).update(self.attributes)
        return exc


@dataclass(frozen=True)
class Refused:
    """The replica's engine did not take the request (invalid, queue full, SLO refused)."""

    error: WireError


@dataclass(frozen=True)
class Failed:
    """The request ended with an engine error after it was accepted."""

    error: WireError


def wire_params(params: SamplingParams) -> SamplingParams:
    """`params` without a compiled grammar (a native object that does not pickle)."""
    if params.grammar is None or params.grammar.compiled is None:
        return params
    return dataclasses.replace(params, grammar=dataclasses.replace(params.grammar, compiled=None))
