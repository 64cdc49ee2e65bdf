"""Float weights -> QuantTensor: int8 per output channel and int4 per group (symmetric or
asymmetric), rounding to nearest against the scale as it will be stored (fp16), so the
stored integers and scales reproduce the weight as closely as that format can."""

from __future__ import annotations

import torch

from tokenmill.quant.packing import QuantTensor


def _as_fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    n, k = w.shape
    pad = -(-k // group) * group - k
    return torch.nn.functional.pad(w.float(), (0, pad)).reshape(n, -1, group)


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))[..., None]


def quantize_int8(w: torch.Tensor, group: int | None = None) -> QuantTensor:
    """Symmetric 8-bit: scale = amax / 127 per output row (or per group of k)."""
    n, k = w.shape
    group = group or -(-k // 32) * 32
    g = _grouped(w, group)
    scale = _as_fp16(g.abs().amax(dim=2) / 127.0)  # [N, groups]
    q = torch.round(g * _inverse(scale)).clamp(-127, 127).to(torch.int16)
    return QuantTensor(q.reshape(n, -1)[:, :k].contiguous(), scale, None, 8, group)


def quantize_int4(w: torch.Tensor, group: int, symmetric: bool = False) -> QuantTensor:
    """4-bit per group of k. Asymmetric: w ~= scale * q + min, q in 0..15, spanning the group's
    [min, max]. Symmetric: w ~= scale * (q - 8), the largest-magnitude value at q = 0 (as GGUF's
    Q4_0; the scale takes its sign)."""
    n, k = w.shape
    g = _grouped(w, group)
    if symmetric:
        extreme = g.gather(2, g.abs().argmax(dim=2, keepdim=True)).squeeze(2)
        scale = _as_fp16(extreme / -8.0)
        low = -8.0 * scale
    else:
        lo, hi = g.amin(dim=2).clamp(max=0), g.amax(dim=2).clamp(min=0)
        scale = _as_fp16((hi - lo) / 15.0)
        low = _as_fp16(lo)
    q = torch.round((g - low[..., None]) * _inverse(scale)).clamp(0, 15).to(torch.int16)
    return QuantTensor(q.reshape(n, -1)[:, :k].contiguous(), scale, low, 4, group)
