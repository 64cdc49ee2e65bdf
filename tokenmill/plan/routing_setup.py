"""What the routing paper model (plan/routing.py) runs: a replica built from the catalogue, as
the planner places one, and ShareGPT conversations as turn lengths in the model's tokens."""

from __future__ import annotations

from tokenmill.config import SchedulerConfig
from tokenmill.errors import ConfigError
from tokenmill.perf.dtypes import Precision
from tokenmill.perf.kv_memory import kv_bytes_per_token
from tokenmill.plan.hardware import THIS_MACHINE, get_hardware
from tokenmill.plan.models import get_model
from tokenmill.plan.placement import place
from tokenmill.plan.routing import ChatTurn, ReplicaSetup
from tokenmill.plan.sim_runner import CostModelStepTime, SimRunner
from tokenmill.plan.step_time import LayoutStepTime
from tokenmill.workload.sharegpt import load_conversations


def replica_setup(
    model_name: str,
    hardware_name: str,
    weights_dtype: str,
    kv_cache_bytes: float,
    block_size: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_imbalance: int,
    seed: int,
) -> tuple[ReplicaSetup, str]:
    """One replica on the fewest chips holding the weights and `kv_cache_bytes` of KV cache
    (what `--kv-cache-memory` gives a served replica), and a line saying what it is."""
    model, hw = get_model(model_name), get_hardware(hardware_name)
    precision = Precision(weights=weights_dtype)
    kv_tokens = int(kv_cache_bytes // kv_bytes_per_token(model.arch, precision.kv))
    if kv_tokens < block_size:
        raise ConfigError(f"a KV cache of {kv_cache_bytes:,.0f} bytes holds no block")
    placement = place(model.arch, hw, precision, kv_tokens, model_name=model.name)
    step_model = LayoutStepTime(model.arch, hw, precision, placement)
    jitter = hw.profile.step_jitter_cv

    def make_runner(index: int) -> SimRunner:
        return SimRunner(CostModelStepTime(step_model, None), jitter_cv=jitter, seed=seed + index)

    num_blocks = min(kv_tokens, placement.kv_capacity_tokens) // block_size
    setup = ReplicaSetup(
        make_runner=make_runner,
        num_blocks=num_blocks,
        block_size=block_size,
        max_model_len=model.arch.max_position_embeddings,
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
        ),
        max_imbalance=max_imbalance,
    )
    calibrated = ""
    if hw.name == THIS_MACHINE:
        calibrated = ", calibrated" if hw.calibrated else ", UNCALIBRATED default"
    label = (
        f"{model.name} on {hw.name}{calibrated} ({placement.chips_per_replica} chip(s) per "
        f"replica, {precision.weights} weights, {num_blocks * block_size:,} KV tokens)"
    )
    return setup, label


def sharegpt_chats(
    num: int, num_turns: int, max_chars: int, max_reply_tokens: int
) -> list[list[ChatTurn]]:
    """Turn lengths of the first `num` ShareGPT conversations with `num_turns` exchanges, in the
    bundled model's tokens (the planner's proxy tokenizer), chat template included: each user
    turn carries its wrapper (the first also the system prompt), each reply is the dataset's,
    capped at `max_reply_tokens` (a served model writes its own; the cap is what bounds it)."""
    from tokenmill.plan.proxy_tokenizer import load_proxy_tokenizer

    tokenizer = load_proxy_tokenizer()
    first_extra, next_extra = _template_overheads(tokenizer)
    chats = []
    for conv in load_conversations(num, num_turns, max_chars):
        turns = []
        for i, (user, reply) in enumerate(conv):
            extra = first_extra if i == 0 else next_extra
            reply_len = min(len(tokenizer.encode(reply)), max_reply_tokens)
            turns.append(ChatTurn(len(tokenizer.encode(user)) + extra, max(reply_len, 1)))
        chats.append(turns)
    return chats


def _template_overheads(tokenizer) -> tuple[int, int]:
    """Tokens the chat template adds around the first user turn (system prompt included) and
    around each later exchange (the reply's end, the next user turn's wrapper)."""

    def length(messages: list[dict]) -> int:
        return len(
            tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        )

    user, reply, again = "hello there", "hi you", "ok"
    one = [{"role": "user", "content": user}]
    two = one + [{"role": "assistant", "content": reply}, {"role": "user", "content": again}]
    first = length(one) - len(tokenizer.encode(user))
    later = length(two) - length(one) - len(tokenizer.encode(reply)) - len(tokenizer.encode(again))
    return first, later
