"""The reference's logits of each text, computed once and kept while they fit a memory budget.

Texts past the budget are teacher-forced by the reference engine again whenever a scheme needs
them: the same engine, configuration and chunks, so the same logits.
"""

from __future__ import annotations

import torch

from tokenmill.quant_eval.tasks import TeacherItem
from tokenmill.quant_eval.teacher_forcing import TeacherForcer


class ReferenceLogits:
    def __init__(self, forcer: TeacherForcer, budget_bytes: int) -> None:
        self.forcer = forcer
        self.budget_bytes = budget_bytes
        self._kept: dict[tuple[str, int], torch.Tensor] = {}
        self._kept_bytes = 0

    def get(self, task: str, index: int, item: TeacherItem) -> torch.Tensor:
        """Logits (len(item.target_ids), V) of text `index` of `task`."""
        key = (task, index)
        if key in self._kept:
            return self._kept[key]
        logits = self.forcer.logits(item)
        if self._kept_bytes + logits.nbytes <= self.budget_bytes:
            self._kept[key] = logits
            self._kept_bytes += logits.nbytes
        return logits
