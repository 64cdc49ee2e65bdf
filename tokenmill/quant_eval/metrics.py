"""Per-token quality of a scheme against the reference, from the two logits of the same tokens.

For each scored token (reference logits r, scheme logits s, the true next token t):

    nll       = -log softmax(s)[t]                       (perplexity = exp(mean nll))
    KL        = sum_v p_r(v) * (log p_r(v) - log p_s(v))  (KL(reference || scheme), nats)
    top-1     = argmax r == argmax s

Equal logits give KL exactly 0 and top-1 1. Sums are kept in float64 over all tokens of a task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

_ROWS = 64  # rows per block: bounds the temporaries at (64, V) floats


@dataclass
class TokenStats:
    num_tokens: int = 0
    nll_sum: float = 0.0
    kl_sum: float = 0.0
    num_top1_agree: int = 0
    kl_values: list[float] = field(default_factory=list)

    def add(self, ref: torch.Tensor, scheme: torch.Tensor, targets: torch.Tensor) -> None:
        """ref, scheme: logits (N, V); targets: the true next tokens (N,)."""
        if ref.shape != scheme.shape or ref.shape[0] != targets.shape[0]:
            raise ValueError(f"shapes differ: {tuple(ref.shape)}, {tuple(scheme.shape)}")
        for start in range(0, ref.shape[0], _ROWS):
            r = ref[start : start + _ROWS].float()  # (n, V)
            s = scheme[start : start + _ROWS].float()
            t = targets[start : start + _ROWS].to(r.device)
            lp_r, lp_s = torch.log_softmax(r, dim=-1), torch.log_softmax(s, dim=-1)
            kl = (lp_r.exp() * (lp_r - lp_s)).sum(dim=-1)  # (n,)
            self.nll_sum += float(-lp_s.gather(1, t[:, None]).double().sum())
            self.kl_sum += float(kl.double().sum())
            self.kl_values.extend(kl.tolist())
            self.num_top1_agree += int((r.argmax(dim=-1) == s.argmax(dim=-1)).sum())
            self.num_tokens += r.shape[0]

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.num_tokens) if self.num_tokens else math.nan

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / self.num_tokens if self.num_tokens else math.nan

    @property
    def top1_agreement(self) -> float:
        return self.num_top1_agree / self.num_tokens if self.num_tokens else math.nan

    def kl_quantile(self, q: float) -> float:
        if not self.kl_values:
            return math.nan
        values = sorted(self.kl_values)
        return values[min(len(values) - 1, int(q * len(values)))]
