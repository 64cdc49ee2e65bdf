"""Integer weights with a scale (and optionally a min) per group of k, and the packed layout the
native kernel streams (tokenmill/native/csrc/quant_gemm_cpu.cpp describes it byte by byte).

A `QuantTensor` is the plain form, w[n, k] = scale[n, k // group] * q[n, k] + min[n, k // group];
a `QuantizedWeight` is the packed form a layer holds (the only copy of its weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PANEL = 16  # output columns per panel
BLOCK = 32  # k per activation block


@dataclass
class QuantTensor:
    """w = scale * q + min per group of `group` consecutive k; q as int16 (4-bit: 0..15,
    8-bit: -128..127); scale and min float32 [N, ceil(K / group)]; min None for symmetric."""

    q: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor | None
    bits: int
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] these integers stand for."""
        n, k = self.q.shape
        expand = lambda t: t.repeat_interleave(self.group, dim=1)[:, :k]  # noqa: E731
        w = expand(self.scale) * self.q.float()
        return w if self.min is None else w + expand(self.min)


@dataclass
class QuantizedWeight:
    """A weight packed for quant_gemm: uint8 [panels, K_pad / group, group_bytes]."""

    packed: torch.Tensor
    bits: int
    has_min: bool
    group: int
    out_features: int
    in_features: int
    act_bits: int = 8  # 16: activations in two int8 passes (quant_gemm's act_bits)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        return self.packed.numel()

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.out_features * self.in_features)

    def describe(self) -> str:
        kind = f"int{self.bits}" + ("" if self.has_min else "-sym")
        return f"{kind}-g{self.group}"


def group_bytes(bits: int, has_min: bool, group: int) -> int:
    data = group // BLOCK * (256 if bits == 4 else 512)
    return data + PANEL * 2 * (2 if has_min else 1)


def pack(t: QuantTensor) -> QuantizedWeight:
    """The packed layout of `t` (rows padded to 16, k to the group, with zero weights)."""
    if t.group % BLOCK:
        raise ValueError(f"group must be a multiple of {BLOCK}, got {t.group}")
    if t.bits == 4 and t.min is None:
        raise ValueError("4-bit weights need a min (symmetric 4-bit: min = -8 * scale)")
    n, k = t.q.shape
    groups = -(-k // t.group)
    n_pad, k_pad = -(-n // PANEL) * PANEL, groups * t.group
    q = torch.zeros(n_pad, k_pad, dtype=torch.int16)
    q[:n, :k] = t.q
    data = _pack_q4(q) if t.bits == 4 else _pack_q8(q)  # [P, G', data bytes]
    data = data.reshape(n_pad // PANEL, groups, -1)
    parts = [data, _pack_halves(t.scale, n_pad)]
    if t.min is not None:
        parts.append(_pack_halves(t.min, n_pad))
    packed = torch.cat(parts, dim=2).contiguous()
    assert packed.shape[2] == group_bytes(t.bits, t.min is not None, t.group)
    return QuantizedWeight(packed, t.bits, t.min is not None, t.group, n, k)


def _pack_q4(q: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    # [P, col, blocks, chunk c, half h, i]: k = 32 * block + 8c + 4h + i
    v = q.to(torch.uint8).reshape(n // PANEL, PANEL, k // BLOCK, 4, 2, 4)
    v = v.permute(0, 2, 3, 1, 5, 4)  # [P, blocks, c, col, i, h]
    return (v[..., 0] | (v[..., 1] << 4)).reshape(n // PANEL, -1)


def _pack_q8(q: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    v = (q + 128).to(torch.uint8).reshape(n // PANEL, PANEL, k // BLOCK, 8, 4)
    return v.permute(0, 2, 3, 1, 4).reshape(n // PANEL, -1)  # [P, blocks, c, col, i]


def _pack_halves(values: torch.Tensor, n_pad: int) -> torch.Tensor:
    """float [N, groups] -> fp16 bytes [P, groups, 32]."""
    n, groups = values.shape
    v = torch.zeros(n_pad, groups, dtype=torch.float16)
    v[:n] = values.to(torch.float16)
    v = v.reshape(n_pad // PANEL, PANEL, groups).permute(0, 2, 1).contiguous()
    return v.view(torch.uint8).reshape(n_pad // PANEL, groups, PANEL * 2)


def unpack(w: QuantizedWeight, rows: torch.Tensor | None = None) -> QuantTensor:
    """The plain form of `w` (of only `rows`, when given): the inverse of `pack`."""
    panels, groups, _ = w.packed.shape
    data_bytes = w.group // BLOCK * (256 if w.bits == 4 else 512)
    rows = torch.arange(w.out_features) if rows is None else rows
    part = w.packed[rows // PANEL]  # [R, groups, bytes]
    col = (rows % PANEL).reshape(-1, 1, 1)
    n = rows.numel()
    data = part[:, :, :data_bytes].reshape(n, groups * w.group // BLOCK, -1, PANEL, 4)
    picked = data.gather(3, col.reshape(-1, 1, 1, 1, 1).expand(-1, *data.shape[1:3], 1, 4))
    picked = picked.reshape(n, -1, data.shape[2], 4)  # [R, blocks, c, i]
    if w.bits == 4:
        nib = torch.stack(((picked & 0x0F), (picked >> 4)), dim=3)  # [R, blocks, c, h, i]
        q = nib.reshape(n, -1).to(torch.int16)
    else:
        q = picked.reshape(n, -1).to(torch.int16) - 128
    q = q[:, : w.in_features]

    def halves(offset: int) -> torch.Tensor:
        h = part[:, :, offset : offset + 2 * PANEL].contiguous().view(torch.float16)
        return h.gather(2, col.expand(-1, groups, 1)).squeeze(2).float()

    scale = halves(data_bytes)
    mins = halves(data_bytes + 2 * PANEL) if w.has_min else None
    return QuantTensor(q, scale, mins, w.bits, w.group)
