"""Reference attention in plain PyTorch, for any device.

Decode tokens (one query per request) are attended in one batched call: each request's blocks
are gathered up to the longest context in the batch and masked past its own length. A decode
verifying drafts joins that call with one row a query, each row seeing its request's keys up
to itself (every K/V of the step is written before any is read): attended one by one, as
prompts are, its drafts cost ~3-10 ms each in a step that carries a prompt (BENCHMARKS 9).
Prompt chunks are attended one by one (so a prompt's numbers do not depend on whether a prefix
cache hit left it a few tokens or many); a chunk that starts at position 0 attends to its own
fresh K/V without touching the cache.

Grouped-query attention without copying K/V: in decode, the G query heads that share a KV head
are laid out as G query rows of that KV head, (Bd, Hkv, G, D); in prefill SDPA's enable_gqa.

A quantized cache (int8 / fp8 with scales, attention/kv_quant.py) is read by the native decode
kernel in place and dequantized wherever these paths gather it; a fresh prompt then attends
to its own K/V as read back from the cache, so every path sees the same (quantized) numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.attention import kv_quant
from tokenmill.attention.backends.base import AttentionSpec, BaseAttentionBackend, write_kv
from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.native import kernels as native_kernels

# SDPA's grouped-query flag arrived in torch 2.5; older versions repeat the K/V heads instead.
_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
# A decode verifying drafts with at most this many queries is attended as decode rows (the fused
# CPU decode layer's bound on the queries of a request, worker/cpu_fused_decode.py).
MAX_ROW_QUERIES = 16


@dataclass
class _DecodePlan:
    token_idx: torch.Tensor | None  # [Bd] rows of q attended as decodes; None: all, in order
    block_table: torch.Tensor  # [Bd, nb] each row's request's blocks
    mask: torch.Tensor  # [Bd, 1, 1, nb * block_size] True = attend
    seq_lens: torch.Tensor  # [Bd] int64: the keys each row sees (its own position + 1)


@dataclass
class _Segment:
    start: int  # token range [start, end) in the flat batch
    end: int
    num_computed: int
    seq_len: int
    block_ids: torch.Tensor  # [nb] the blocks covering seq_len
    mask: torch.Tensor | None  # [Q, seq_len] True = attend; None: plain causal from 0
    padded_mask: torch.Tensor | None = None  # mask padded for SDPA: made by the first layer


@dataclass
class _StepPlan:
    decode: _DecodePlan | None
    segments: list[_Segment]


class TorchAttentionBackend(BaseAttentionBackend):
    name = "torch"
    reads_quantized_kv = True

    def __init__(self, use_native: bool = True) -> None:
        # On the CPU, decodes use the native paged kernel when it builds (tokenmill/native/csrc).
        self.use_native = use_native

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
        if kv_scale is None:
            write_kv(kv_cache, k, v, metadata.slot_mapping)
        else:
            kv_quant.write_kv_quantized(kv_cache, kv_scale, k, v, metadata.slot_mapping)
        return self.attend(spec, q, k, v, kv_cache, metadata, kv_scale)

    def attend(
        self,
        spec: AttentionSpec,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """forward() once the step's K/V are in the cache (the fused CPU layer stores them)."""
        cache = _Cache(kv_cache, kv_scale)
        plan = _plan_for(metadata, spec.sliding_window)
        native = self._native(q, cache) if plan.decode is not None else None
        if native is not None and not plan.segments and plan.decode.token_idx is None:
            return _native_attention(native, spec, q, cache, plan.decode)  # all decodes
        out = torch.empty_like(q)
        if plan.decode is not None:
            if native is not None:
                _decode_native(native, spec, q, cache, plan.decode, out)
            else:
                _decode(spec, q, cache, plan.decode, out)
        for seg in plan.segments:
            out[seg.start : seg.end] = _prefill_segment(spec, q, k, v, cache, seg, metadata)
        return out

    def _native(self, q: torch.Tensor, cache: _Cache):
        if not self.use_native or q.device.type != "cpu":
            return None
        if cache.scale is None and cache.kv.dtype != q.dtype:
            return None
        if q.dtype not in (torch.float32, torch.bfloat16) or q.shape[-1] % 16 or q.shape[-1] > 256:
            return None
        return native_kernels()


@dataclass
class _Cache:
    """One layer's cache: kv [2, NB, BS, Hkv, D]; scale [2, NB, Hkv, BS] when quantized."""

    kv: torch.Tensor
    scale: torch.Tensor | None

    def blocks(self, which: int, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """K (which=0) or V (1) of the blocks [...] in `dtype`: [..., BS, Hkv, D]."""
        if self.scale is None:
            return self.kv[which][block_ids].to(dtype)
        return kv_quant.read_blocks(self.kv, self.scale, which, block_ids, dtype)


def _native_attention(kernels, spec: AttentionSpec, q, cache: _Cache, plan: _DecodePlan):
    """Reads each request's blocks in place: no gather copy, no padding to the longest."""
    q_d = (q if plan.token_idx is None else q.index_select(0, plan.token_idx)).contiguous()
    kv, window = cache.kv, spec.sliding_window or 0
    if cache.scale is not None:
        return kernels.paged_decode_attention_quant(
            q_d, kv[0], kv[1], cache.scale[0], cache.scale[1], plan.block_table, plan.seq_lens,
            spec.scale, window,
        )  # fmt: skip
    return kernels.paged_decode_attention(
        q_d, kv[0], kv[1], plan.block_table, plan.seq_lens, spec.scale, window
    )


def _decode_native(kernels, spec: AttentionSpec, q, cache: _Cache, plan: _DecodePlan, out) -> None:
    out.index_copy_(0, plan.token_idx, _native_attention(kernels, spec, q, cache, plan))


def _decode(spec: AttentionSpec, q: torch.Tensor, cache: _Cache, plan: _DecodePlan, out) -> None:
    hkv, g, d = spec.num_kv_heads, spec.num_queries_per_kv, spec.head_dim
    q_d = q if plan.token_idx is None else q.index_select(0, plan.token_idx)
    num = q_d.shape[0]
    q_d = q_d.view(num, hkv, g, d)  # (Bd, Hkv, G, D): G queries per KV head
    # (Bd, nb, bs, Hkv, D) -> (Bd, L, Hkv, D) -> (Bd, Hkv, L, D)
    keys = cache.blocks(0, plan.block_table, q.dtype).flatten(1, 2).transpose(1, 2)
    values = cache.blocks(1, plan.block_table, q.dtype).flatten(1, 2).transpose(1, 2)
    o = F.scaled_dot_product_attention(q_d, keys, values, attn_mask=plan.mask, scale=spec.scale)
    o = o.reshape(num, hkv * g, d)  # (Bd, H, D)
    if plan.token_idx is None:
        out.copy_(o)
    else:
        out.index_copy_(0, plan.token_idx, o)


def _prefill_segment(
    spec: AttentionSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: _Cache,
    seg: _Segment,
    md: AttentionMetadata,
) -> torch.Tensor:
    # 4-D inputs: CPU SDPA takes its flash kernel only for (batch, heads, seq, dim).
    q_s = q[seg.start : seg.end]  # (Q, H, D)
    if seg.mask is None:
        # Fresh prompt: the keys are this chunk's own, causal; read back from a quantized cache
        # only, so that they are the values every later read of them sees.
        keys, values = k[seg.start : seg.end], v[seg.start : seg.end]  # (Q, Hkv, D)
        if cache.scale is not None:
            slots = md.slot_mapping[seg.start : seg.end]
            keys = kv_quant.read_slots(cache.kv, cache.scale, 0, slots, q.dtype)
            values = kv_quant.read_slots(cache.kv, cache.scale, 1, slots, q.dtype)
    else:
        # (nb, bs, Hkv, D) -> (L, Hkv, D)
        keys = cache.blocks(0, seg.block_ids, q.dtype).flatten(0, 1)[: seg.seq_len]
        values = cache.blocks(1, seg.block_ids, q.dtype).flatten(0, 1)[: seg.seq_len]
    num_q = q_s.shape[0]
    mask = seg.mask
    if _pads_sdpa(q):
        q_s, keys, values = (_pad_rows(x) for x in (q_s, keys, values))
        if mask is not None:
            if seg.padded_mask is None:
                seg.padded_mask = _pad_mask(mask, q_s.shape[0], keys.shape[0])
            mask = seg.padded_mask
    # (len, heads, D) -> (1, heads, len, D)
    q_s, keys, values = (x.transpose(0, 1)[None] for x in (q_s, keys, values))
    o = _sdpa(q_s, keys, values, mask, spec.scale)
    return o[0, :, :num_q].transpose(0, 1)  # (Q, H, D)


# CPU SDPA in bfloat16/float16 JIT-compiles a brgemm kernel for every (query block, key block)
# shape it meets and keeps each one in a per-thread cache that nothing empties (torch's cpublas
# KernelCache): ragged prompt lengths grew a served engine's memory by megabytes a minute without
# bound (BENCHMARKS.md section 13). Queries and keys padded with zeros to a multiple of SDPA_PAD
# leave it a few dozen shapes. Exact: under the causal rule a real query never sees a padded
# key, the padding columns of a mask are closed and the padded query rows are dropped.
SDPA_PAD = 64


def _pads_sdpa(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    """x (len, heads, D) with zero rows appended up to a multiple of SDPA_PAD."""
    extra = -x.shape[0] % SDPA_PAD
    return F.pad(x, (0, 0, 0, 0, 0, extra)) if extra else x


def _pad_mask(mask: torch.Tensor, num_q: int, num_k: int) -> torch.Tensor:
    """[Q, L] -> [num_q, num_k]: padded keys closed to real queries; padded query rows (dropped
    afterwards) open to every key, so that no row is empty."""
    padded = torch.ones(num_q, num_k, dtype=torch.bool, device=mask.device)
    padded[: mask.shape[0], mask.shape[1] :] = False
    padded[: mask.shape[0], : mask.shape[1]] = mask
    return padded


def _sdpa(q, k, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q (1, H, Q, D); k, v (1, Hkv, L, D); causal from position 0 when mask is None."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not _HAS_GQA:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    kwargs = {"enable_gqa": True} if groups > 1 and _HAS_GQA else {}
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, **kwargs
    )


def _plan_for(metadata: AttentionMetadata, window: int | None) -> _StepPlan:
    key = ("torch_plan", window)
    plan = metadata.backend_state.get(key)
    if plan is None:
        plan = _build_plan(metadata, window)
        metadata.backend_state[key] = plan
    return plan


def _build_plan(md: AttentionMetadata, window: int | None) -> _StepPlan:
    starts = md.query_start_loc_list
    rows: list[tuple[int, int, int]] = []  # decode rows: token, request, keys it sees
    segments = []
    device = md.slot_mapping.device
    drafts = md.num_drafts_list or [0] * md.num_reqs
    for b in range(md.num_reqs):
        start, end = starts[b], starts[b + 1]
        computed, seq_len = md.num_computed_list[b], md.seq_lens_list[b]
        if end - start == 1 or (drafts[b] and end - start <= MAX_ROW_QUERIES):
            rows.extend((start + j, b, computed + j + 1) for j in range(end - start))
            continue
        num_blocks = -(-seq_len // md.block_size)
        mask = None
        if computed > 0 or (window is not None and seq_len > window):
            q_pos = torch.arange(computed, seq_len, device=device)[:, None]
            k_pos = torch.arange(seq_len, device=device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
        segments.append(
            _Segment(start, end, computed, seq_len, md.block_table[b, :num_blocks], mask)
        )
    return _StepPlan(_decode_plan(md, rows, window), segments)


def _decode_plan(
    md: AttentionMetadata, rows: list[tuple[int, int, int]], window: int | None
) -> _DecodePlan | None:
    if not rows:
        return None
    device = md.slot_mapping.device
    max_len = max(keys for _, _, keys in rows)
    num_blocks = -(-max_len // md.block_size)
    tokens, reqs, keys = (list(column) for column in zip(*rows, strict=True))
    token_idx = None if len(rows) == md.num_tokens else torch.tensor(tokens, device=device)
    block_table = md.block_table[torch.tensor(reqs, device=device), :num_blocks]
    seq_lens = torch.tensor(keys, dtype=torch.int64, device=device)[:, None]  # (Bd, 1)
    k_pos = torch.arange(num_blocks * md.block_size, device=device)[None, :]
    mask = k_pos < seq_lens
    if window is not None:
        mask &= k_pos >= seq_lens - window
    return _DecodePlan(
        token_idx, block_table.contiguous(), mask[:, None, None, :], seq_lens[:, 0].contiguous()
    )
