"""Paged attention in one Triton kernel for the whole flat batch (prefill chunks and decodes).

Each program owns one (request, KV head, tile of BLOCK_M query tokens) and walks that request's
block table one cache block at a time with an online softmax, so K/V are read straight from the
paged cache (never gathered) and a prefill chunk's tile stops at its causal limit. The G query
heads sharing a KV head are processed together: the tile is (BLOCK_M tokens x G heads) rows, so
each K/V block loaded serves all of them.

    rows of a tile:  r = token_in_tile * GP + head_in_group      (GP = G rounded up to pow2)
    query position:  num_computed + m * BLOCK_M + token_in_tile

Runs on GPUs, and on the CPU under TRITON_INTERPRET=1 (how the tests check it without a GPU).
"""

from __future__ import annotations

import torch

from tokenmill.attention.backends.base import (
    AttentionSpec,
    BaseAttentionBackend,
    quantized_kv_unsupported,
    write_kv,
)
from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.env import triton_interpreted
from tokenmill.errors import ConfigError

_INTERPRETED = triton_interpreted()

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ConfigError("the triton attention backend needs the `triton` package") from exc


@triton.jit
def _online_softmax_step(
    q, k, v, allowed, scale_log2, m_i, l_i, acc, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr
):
    """Fold one tile of keys/values into the running (max, sum, output) of each query row."""
    if DOT_FP32:
        k, v = k.to(tl.float32), v.to(tl.float32)
    # Scores in log2 units: exp2 is the cheaper instruction.
    scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale_log2
    scores = tl.where(allowed, scores, float("-inf"))  # (R, N)
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    # Rows with nothing allowed yet keep m = -inf; guard exp(-inf - -inf).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_table_ptr, query_start_ptr, seq_lens_ptr,
    scale, window,
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt,
    G: tl.constexpr, GP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    req, kv_head, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_ptr + req)
    q_len = tl.load(query_start_ptr + req + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    num_computed = seq_len - q_len

    rows = tl.arange(0, BLOCK_M * GP)
    tok = tile * BLOCK_M + rows // GP  # token index within the request's chunk
    head = kv_head * G + rows % GP
    row_ok = (tok < q_len) & (rows % GP < G)
    q_pos = num_computed + tok  # (R,)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )  # (R, D)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M * GP], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GP], tl.float32)
    acc = tl.zeros([BLOCK_M * GP, HEAD_DIM], tl.float32)
    # Keys past the tile's last query are never attended: stop there (causal limit).
    kv_end = tl.minimum(seq_len, num_computed + (tile + 1) * BLOCK_M)
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(0, num_computed + tile * BLOCK_M - window + 1)
    scale_log2 = scale * 1.4426950408889634  # log2(e)
    offs = tl.arange(0, TILE_N)
    for tile_start in range(kv_start, kv_end, TILE_N):
        k_pos = tile_start + offs  # (N,) a tile may span several cache blocks
        k_ok = k_pos < kv_end
        block_id = tl.load(
            block_table_ptr + req * stride_bt + k_pos // BLOCK_SIZE, mask=k_ok, other=0
        )
        base = block_id * stride_cb + (k_pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        k = tl.load(k_cache_ptr + base[:, None] + dims[None, :], mask=k_ok[:, None], other=0.0)
        v = tl.load(v_cache_ptr + base[:, None] + dims[None, :], mask=k_ok[:, None], other=0.0)
        allowed = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        if USE_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        m_i, l_i, acc = _online_softmax_step(
            q, k, v, allowed, scale_log2, m_i, l_i, acc, PRECISION, DOT_FP32
        )
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_offs = (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


class TritonAttentionBackend(BaseAttentionBackend):
    name = "triton"

    def forward(
        self,
        spec: AttentionSpec,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if kv_scale is not None:
            raise ConfigError(quantized_kv_unsupported(self.name))
        write_kv(kv_cache, k, v, metadata.slot_mapping)
        q = q.contiguous()
        out = torch.empty_like(q)
        groups = spec.num_queries_per_kv
        group_pow2 = triton.next_power_of_2(groups)
        max_q_len = _max_query_len(metadata)
        # A tile is (BLOCK_M tokens x GP heads) rows; tl.dot wants at least 16 of them. Prefill
        # tiles grow to 128 rows and 8 warps; decode tiles stay small.
        is_prefill = max_q_len >= 64
        rows = 128 if is_prefill else 16
        block_m = max(rows // group_pow2, 1)
        grid = (metadata.num_reqs, spec.num_kv_heads, triton.cdiv(max_q_len, block_m))
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        _paged_attention_kernel[grid](
            q, k_cache, v_cache, out, metadata.block_table, metadata.query_start_loc,
            metadata.seq_lens, spec.scale, spec.sliding_window or 0,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            metadata.block_table.stride(0),
            G=groups, GP=group_pow2, HEAD_DIM=spec.head_dim, BLOCK_M=block_m, TILE_N=64,
            BLOCK_SIZE=metadata.block_size, USE_WINDOW=spec.sliding_window is not None,
            # float32 models get exact float32 products, not TF32.
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            # Triton's CPU interpreter computes 16-bit dots wrongly; it gets float32 operands.
            DOT_FP32=_INTERPRETED,
            num_warps=8 if is_prefill else 4,
        )  # fmt: skip
        return out


def _max_query_len(metadata: AttentionMetadata) -> int:
    starts = metadata.query_start_loc_list
    return max(b - a for a, b in zip(starts, starts[1:], strict=False))
