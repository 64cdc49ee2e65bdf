"""What a task is: texts to teacher-force and, where the task has answers, prompts to answer.

A task builder takes (tokenizer, TaskSize) and returns a Task; the registry maps the names
`--tasks` accepts to builders (chat: ShareGPT replies, code: HumanEval, math: generated
arithmetic). All data ships in Python packages; nothing is downloaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenmill.errors import ConfigError


@dataclass(frozen=True)
class TaskSize:
    num_samples: int  # texts to teacher-force and questions to answer (at most), per task
    max_tokens: int  # target tokens per text; generated tokens per answer
    seed: int = 0


@dataclass(frozen=True)
class TeacherItem:
    """Scored tokens `target_ids` after `context_ids` (which are not scored)."""

    context_ids: list[int]
    target_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.context_ids) + len(self.target_ids)


@dataclass(frozen=True)
class AnswerItem:
    """A prompt answered greedily; `check(text)` says whether the answer is right."""

    prompt_ids: list[int]
    check: Callable[[str], bool]
    max_tokens: int
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    name: str
    teacher_items: list[TeacherItem]
    answer_items: list[AnswerItem] = field(default_factory=list)
    # How an answer is scored, for the table ("pass@1", "exact match"); "" when no answers.
    accuracy_name: str = ""

    @property
    def max_context_len(self) -> int:
        lens = [i.num_tokens for i in self.teacher_items]
        lens += [len(a.prompt_ids) + a.max_tokens for a in self.answer_items]
        return max(lens, default=1)


# name -> "module:function" of its builder, imported only when the task runs.
TASK_BUILDERS = {
    "chat": "tokenmill.quant_eval.chat_task:build_chat_task",
    "code": "tokenmill.quant_eval.code_task:build_code_task",
    "math": "tokenmill.quant_eval.math_task:build_math_task",
}


def build_task(name: str, tokenizer, size: TaskSize) -> Task:
    if name not in TASK_BUILDERS:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(TASK_BUILDERS)}")
    if tokenizer is None:
        raise ConfigError("quant-eval tasks are text: this model has no tokenizer")
    module, func = TASK_BUILDERS[name].split(":")
    task = getattr(importlib.import_module(module), func)(tokenizer, size)
    if not task.teacher_items:
        raise ConfigError(f"task {name!r} produced no texts")
    return task


def parse_tasks(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in TASK_BUILDERS]
    if not names or unknown:
        raise ConfigError(f"tasks must be some of {', '.join(TASK_BUILDERS)}; got {text!r}")
    return names


def encode_pair(tokenizer, context: str, target: str, max_target: int) -> TeacherItem:
    """Context (with the model's BOS) and target tokenized apart, the target cut to max_target:
    the scored tokens are the target's own, whatever the boundary would merge."""
    context_ids = tokenizer.encode(context)
    target_ids = tokenizer.encode(target, add_special_tokens=False)[:max_target]
    return TeacherItem(context_ids, target_ids)
