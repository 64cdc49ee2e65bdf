"""How many draft tokens the next step can carry without displacing prompt work.

The scheduler serves the running requests first (each decode with its drafts), then gives what
is left of the step's token budget to prompts. A prompt token is always needed; a draft token
only if it is accepted. So while prompt work waits for the budget, a draft in its place emits
fewer tokens for the same compute: `auto` drafts only into the budget that the decodes and the
pending prompt tokens leave. Under load that room is 0 and speculation stops by the budget's
arithmetic, with no threshold to tune.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenmill.engine.scheduler import Scheduler


def draft_room(scheduler: Scheduler) -> int:
    """The next step's token budget less one token per decode and every prompt token pending:
    the rest of the running prompts and the waiting prompts a free sequence slot could take."""
    config = scheduler.config
    room = config.max_num_batched_tokens
    for request in scheduler.running:
        room -= request.num_tokens - request.num_computed_tokens
    slots = config.max_num_seqs - len(scheduler.running)
    if room <= 0 or slots <= 0:
        return max(room, 0)  # without iterating the queue (a sort, under priority or SLOs)
    for request in scheduler.waiting:
        if room <= 0 or slots <= 0:
            break
        room -= request.num_tokens - request.num_computed_tokens
        slots -= 1
    return max(room, 0)
