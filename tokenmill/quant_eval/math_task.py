"""math: arithmetic questions from a fixed seed, with exact integer answers.

Each question is one of a + b, a - b, a * b, a + b * c over small integers; the prompt is a
few-shot block of worked examples (drawn from another seed), then `Q: What is ...?\\nA:`. The
teacher-forced target is the answer itself; the greedy answer is right when its first integer
equals the exact answer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from tokenmill.quant_eval.tasks import AnswerItem, Task, TaskSize, encode_pair

NUM_SHOTS = 4
_SHOT_SEED_OFFSET = 1_000_003
_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class MathProblem:
    expression: str  # e.g. "48 + 275"
    answer: int

    @property
    def question(self) -> str:
        return f"Q: What is {self.expression}?\nA:"


def generate_problems(num: int, seed: int) -> list[MathProblem]:
    """`num` problems, the same for the same seed on every machine (random.Random is stable)."""
    rng = random.Random(seed)
    problems = []
    for _ in range(num):
        kind = rng.randrange(4)
        if kind == 0:
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            problems.append(MathProblem(f"{a} + {b}", a + b))
        elif kind == 1:
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            problems.append(MathProblem(f"{a} - {b}", a - b))
        elif kind == 2:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            problems.append(MathProblem(f"{a} * {b}", a * b))
        else:
            a, b, c = rng.randint(1, 99), rng.randint(2, 20), rng.randint(2, 20)
            problems.append(MathProblem(f"{a} + {b} * {c}", a + b * c))
    return problems


def few_shot_prefix(seed: int) -> str:
    shots = generate_problems(NUM_SHOTS, seed + _SHOT_SEED_OFFSET)
    return "".join(f"{p.question} {p.answer}\n\n" for p in shots)


def is_correct(text: str, answer: int) -> bool:
    """The first integer of the reply is the answer (`A: 323` style replies)."""
    match = _INTEGER.search(text)
    return match is not None and int(match.group()) == answer


def build_math_task(tokenizer, size: TaskSize) -> Task:
    prefix = few_shot_prefix(size.seed)
    problems = generate_problems(size.num_samples, size.seed)
    teacher = [
        encode_pair(tokenizer, prefix + p.question, f" {p.answer}", size.max_tokens)
        for p in problems
    ]
    answers = [
        AnswerItem(
            prompt_ids=tokenizer.encode(prefix + p.question),
            check=_checker(p.answer),
            max_tokens=min(size.max_tokens, 12),
            stop=("\n",),
        )
        for p in problems
    ]
    return Task("math", teacher, answers, accuracy_name="exact match")


def _checker(answer: int):
    return lambda text: is_correct(text, answer)
