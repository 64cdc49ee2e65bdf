"""The quantized matmul in PyTorch, step for step as tokenmill/native/csrc/quant_gemm_cpu.cpp
computes it: activations quantized to int8 per block of 32 (quant_act.h), integer dot products
per block, then each block's sum scaled by the weight's and the activation's scales, plus the
weight group's min times the sum of the rounded activations over the group. The kernels are
tested against it, and it is the path wherever the native kernel is not (other devices, no
compiler)."""

from __future__ import annotations

import torch

from tokenmill.quant.packing import BLOCK, QuantizedWeight, QuantTensor, unpack


def quantize_activations(x: torch.Tensor, k_pad: int):
    """x [M, K] -> (q int8-valued float [M, k_pad], d [M, blocks]); a block with a non-finite
    value gets d = NaN and q = 0."""
    xf = torch.nn.functional.pad(x.float(), (0, k_pad - x.shape[1]))
    blocks = xf.reshape(x.shape[0], -1, BLOCK)
    amax = blocks.abs().amax(dim=2, keepdim=True)
    finite = torch.isfinite(blocks).all(dim=2, keepdim=True)
    # Divisions in float64 rounded once to float32: the correctly rounded quotients C++ gets
    # (torch's float32 division by a tensor may go through a reciprocal, and an exact tie such
    # as 63.5 then rounds the other way).
    wide = amax.double()
    inv = torch.where(amax > 0, (127.0 / wide).float(), torch.zeros_like(amax))
    q = torch.where(finite, torch.round(blocks * inv), torch.zeros_like(blocks))
    d = torch.where(finite, (wide / 127.0).float(), torch.full_like(amax, float("nan")))
    return q.reshape(x.shape[0], k_pad), d.squeeze(2)


def reference_matmul(
    x: torch.Tensor, w: QuantizedWeight | QuantTensor, act_bits: int | None = None
) -> torch.Tensor:
    """x [M, K] @ W^T as the kernel computes it, in float64 sums, returned in x's dtype.
    act_bits 16 (default: the weight's own) adds the product of what x's rounding left, itself
    rounded the same way (quant_act.h's second pass)."""
    t = unpack(w) if isinstance(w, QuantizedWeight) else w
    if act_bits is None:
        act_bits = w.act_bits if isinstance(w, QuantizedWeight) else 8
    n, k = t.q.shape
    k_pad = -(-k // t.group) * t.group
    qx, dx = quantize_activations(x, k_pad)
    y = _rounded_product(qx, dx, t, k_pad)
    if act_bits == 16:
        kept = (qx.reshape(len(x), -1, BLOCK) * dx[:, :, None]).reshape(len(x), k_pad)[:, :k]
        rest = x.float() - kept  # float32, as the kernel forms it
        y = y + _rounded_product(*quantize_activations(rest, k_pad), t, k_pad)
    return y.to(x.dtype)


def _rounded_product(qx: torch.Tensor, dx: torch.Tensor, t: QuantTensor, k_pad: int):
    """The rounded activations (qx * dx per block) times the weight, in float64."""
    n, k = t.q.shape
    rows = len(qx)
    qw = torch.nn.functional.pad(t.q.double(), (0, k_pad - k))
    per_group = t.group // BLOCK
    # Integer block sums [M, N, blocks], exact in float64.
    isum = torch.einsum("mbk,nbk->mnb", qx.double().reshape(rows, -1, BLOCK),
                        qw.reshape(n, -1, BLOCK))  # fmt: skip
    scale = t.scale.double().repeat_interleave(per_group, dim=1)  # [N, blocks]
    y = (isum * scale[None] * dx.double()[:, None, :]).sum(dim=2)
    if t.min is not None:
        # The min multiplies the rounded activations, as the integer part does: per block
        # d * (sum of q), as quant_act.h forms it.
        rounded = qx.double().reshape(rows, -1, BLOCK).sum(dim=2) * dx.double()
        gsum = rounded.reshape(rows, -1, per_group).sum(dim=2)  # [M, groups]
        y = y + gsum @ t.min.double().T
    return y


def dequantize_rows(w: QuantizedWeight, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows of the weight as floats (an embedding lookup on a quantized table)."""
    return unpack(w, rows.reshape(-1)).dequantize().to(dtype).reshape(*rows.shape, -1)
