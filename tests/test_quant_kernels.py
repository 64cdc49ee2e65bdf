"""Quantized weight formats: packing round trips, the quantizers' error bounds, GGUF blocks kept
exactly, and the native integer kernel against its PyTorch reference (every format, odd shapes,
NaN/inf inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize as gguf_quantize

from tokenmill.loader.gguf_dequant import dequantize
from tokenmill.native import kernels as native_kernels
from tokenmill.quant.gguf_blocks import gguf_quant_tensor
from tokenmill.quant.packing import pack, unpack
from tokenmill.quant.quantize import quantize_int4, quantize_int8
from tokenmill.quant.reference import dequantize_rows, quantize_activations, reference_matmul

# (name, quantizer): every packed format the kernel has (4-bit with min, 8-bit with and without).
FORMATS = {
    "int8-channel": lambda w: quantize_int8(w),
    "int8-g32": lambda w: quantize_int8(w, 32),
    "int4-g32": lambda w: quantize_int4(w, 32),
    "int4-g64-sym": lambda w: quantize_int4(w, 64, symmetric=True),
    "int4-g128": lambda w: quantize_int4(w, 128),
}
SHAPES = [(16, 32), (50, 70), (96, 576), (33, 1536)]  # rows and k not multiples of 16 / 32


def _with_min_8bit(w: torch.Tensor):
    t = quantize_int4(w, 32)
    t.bits = 8  # 4-bit integers widened: the 8-bit layout with mins (merged q/k/v shards)
    return t


FORMATS["int8-g32-min"] = _with_min_8bit


@pytest.fixture(scope="module")
def kernels():
    k = native_kernels()
    if k is None:
        pytest.skip("no native kernels on this machine")
    return k


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_round_trip(fmt, shape):
    t = FORMATS[fmt](torch.randn(*shape, generator=torch.Generator().manual_seed(1)))
    back = unpack(pack(t))
    assert torch.equal(back.q, t.q)
    assert torch.equal(back.scale, t.scale)  # scales are fp16 values already
    assert (back.min is None) == (t.min is None)
    if t.min is not None:
        assert torch.equal(back.min, t.min)
    rows = torch.tensor([shape[0] - 1, 0, shape[0] // 2])
    assert torch.equal(dequantize_rows(pack(t), rows, torch.float32), t.dequantize()[rows])


def test_quantizers_stay_within_half_a_step():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    for t in (quantize_int8(w), quantize_int8(w, 32), quantize_int4(w, 32), quantize_int4(w, 128)):
        step = t.scale.abs().repeat_interleave(t.group, dim=1)[:, : w.shape[1]]
        assert ((t.dequantize() - w).abs() <= 0.5 * step * 1.01 + 1e-7).all()
    sym = quantize_int4(w, 32, symmetric=True)  # one side may clip by up to a full step
    step = sym.scale.abs().repeat_interleave(32, dim=1)
    assert ((sym.dequantize() - w).abs() <= step * 1.01).all()
    assert (sym.dequantize() - w).abs().mean() < 0.3 * step.mean()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_bits", [8, 16])
def test_kernel_matches_reference(kernels, fmt, shape, dtype, act_bits):
    gen = torch.Generator().manual_seed(3)
    w = pack(FORMATS[fmt](torch.randn(*shape, generator=gen)))
    for rows in (1, 2, 3, 5, 8, 33):
        x = torch.randn(rows, shape[1], generator=gen).to(dtype)
        got = kernels.quant_gemm(x, w.packed, w.bits, w.has_min, w.group, shape[0], act_bits)
        want = reference_matmul(x, w, act_bits)
        assert got.shape == (rows, shape[0]) and got.dtype == dtype
        scale = want.float().abs().max().item()
        tol = 1e-5 * scale if dtype == torch.float32 else 2**-7 * want.float().abs() + 1e-5 * scale
        assert ((got.float() - want.float()).abs() <= tol).all(), (fmt, rows)


@pytest.mark.parametrize("fmt", ["int4-g32", "int4-g128", "int8-g32-min", "int8-channel"])
def test_product_is_the_weight_times_the_rounded_activations(kernels, fmt):
    """The kernel computes W x' exactly (x' the int8-rounded activations), so its error is
    W (x' - x). A group's min must multiply x' too: times the exact x it would err by
    (W - min)(x' - x), twice as much for 4-bit weights whose min sits near -8 scales."""
    gen = torch.Generator().manual_seed(5)
    t = FORMATS[fmt](torch.randn(48, 576, generator=gen) + 0.5)  # mins far from zero
    w = pack(t)
    x = torch.randn(4, 576, generator=gen)
    q, d = quantize_activations(x, 576)
    rounded = (q.reshape(4, -1, 32) * d[:, :, None]).reshape(4, 576)
    want = rounded.double() @ t.dequantize().double().T
    got = kernels.quant_gemm(x, w.packed, w.bits, w.has_min, w.group, 48)
    exact = x.double() @ t.dequantize().double().T
    tol = 1e-5 * want.abs().max().item()  # float32 results
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=tol)
    assert torch.allclose(reference_matmul(x, w).double(), want, rtol=1e-5, atol=tol)
    assert (got.double() - exact).abs().max() > 1e-3  # the rounding is there to be placed


@pytest.mark.parametrize("fmt", ["int4-g32", "int8-channel"])
def test_16_bit_activations_err_hundreds_of_times_less(kernels, fmt):
    """act_bits 16 rounds each block of x and then its remainder: the product's error against
    the dequantized weight times the exact x shrinks by ~254x (the remainder's finer scale)."""
    gen = torch.Generator().manual_seed(7)
    t = FORMATS[fmt](torch.randn(64, 576, generator=gen))
    w = pack(t)
    x = torch.randn(3, 576, generator=gen) * torch.rand(3, 576, generator=gen) ** 4  # outliers
    exact = x.double() @ t.dequantize().double().T
    err = {
        bits: (kernels.quant_gemm(x, w.packed, w.bits, w.has_min, w.group, 64, bits).double()
               - exact).abs().max().item()
        for bits in (8, 16)
    }  # fmt: skip
    assert err[16] < err[8] / 50, err


def test_non_finite_inputs_give_non_finite_rows_only(kernels):
    w = pack(quantize_int4(torch.randn(32, 96), 32))
    x = torch.randn(3, 96)
    x[0, 5], x[2, 70] = float("inf"), float("nan")
    got = kernels.quant_gemm(x, w.packed, w.bits, w.has_min, w.group, 32)
    want = reference_matmul(x, w)
    assert got[0].isnan().all() and got[2].isnan().all() and want[0].isnan().all()
    assert torch.allclose(got[1], want[1], rtol=1e-5, atol=1e-5)


GGUF_CASES = ("Q4_1", "Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q4_K", "Q6_K")


@pytest.fixture(scope="module")
def gguf_tensors():
    """type name -> (raw rows, type, shape): slices of the bundled files' tensors (SmolLM2:
    Q4_1, Q8_0; Gemma 3: Q4_K, Q6_K), plus formats they lack quantized by gguf's own code."""
    from tokenmill.loader.default_model import default_model_path, gemma3_model_path
    from tokenmill.loader.gguf_file import GGUFFile

    out = {}
    for path in (default_model_path(), gemma3_model_path()):
        gguf = GGUFFile(path)
        for info in gguf.tensors.values():
            if info.ggml_type.name in GGUF_CASES and info.ggml_type.name not in out:
                rows = gguf.raw(info).reshape(info.shape[0], -1)[:48]
                out[info.ggml_type.name] = (np.ascontiguousarray(rows), info.ggml_type,
                                            (48, info.shape[1]))  # fmt: skip
    data = np.random.default_rng(4).standard_normal((48, 512)).astype(np.float32)
    for qtype in (T.Q4_0, T.Q5_1):
        out[qtype.name] = (gguf_quantize(data, qtype), qtype, (48, 512))
    return out


@pytest.mark.parametrize("label", GGUF_CASES)
def test_gguf_blocks_keep_the_files_values(gguf_tensors, label):
    raw, qtype, shape = gguf_tensors[label]
    want = dequantize(raw.reshape(-1), qtype, shape).float()
    got = gguf_quant_tensor(raw.reshape(-1), qtype, shape).dequantize()
    err = (got - want).abs()
    if qtype in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        assert torch.equal(got, want), label  # the file's integers and fp16 scales, as stored
    elif qtype == T.Q4_K:  # d * sc and dmin * m rounded once to fp16
        assert (err <= 2**-10 * want.abs() + 2**-10 * want.abs().amax()).all()
    else:  # Q6_K: recomputed as 8-bit per 32 values
        step = want.reshape(shape[0], -1, 32).abs().amax(dim=2, keepdim=True) / 127
        assert (err.reshape(shape[0], -1, 32) <= 0.5 * step * 1.01 + 1e-7).all()
    if qtype != T.Q6_K:
        packed = pack(gguf_quant_tensor(raw.reshape(-1), qtype, shape))
        assert packed.bits_per_weight <= {4: 5.0, 8: 9.0}[packed.bits]
