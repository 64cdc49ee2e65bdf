"""The Hugging Face folder loader against tiny random transformers models saved to disk, and
the dummy loader's names and shapes against the same transformers models."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.loader.dummy import dummy_weight_shapes, open_dummy
from tokenmill.loader.registry import open_model
from tokenmill.models.arch_config import ArchConfig, normalize_hf_config

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


def _tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=50000.0,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**(fields | overrides))).eval()


def _tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=16,
        query_pre_attn_scalar=32,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, hf_tokenizer):
    folder = tmp_path_factory.mktemp("tiny_llama")
    model = _tiny_llama()
    model.save_pretrained(folder, safe_serialization=True)
    hf_tokenizer.save_pretrained(folder)
    return str(folder), model


def test_config_and_weights_load_identical(llama_folder):
    folder, model = llama_folder
    loaded = open_model(ModelConfig(model=folder))
    assert loaded.format == "hf" and loaded.source == folder
    arch, cfg = loaded.arch, model.config
    assert arch.architecture == "llama"
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
    ):
        assert getattr(arch, name) == getattr(cfg, name), name
    assert arch.rope_theta == 50000.0 and arch.rope_scaling is None
    assert arch.bos_token_id == 1 and arch.eos_token_ids == (2,)
    ours = dict(loaded.iter_weights(torch.float32))
    ref = model.state_dict()
    assert set(ours) == set(ref)
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), name
    assert all(t.dtype == torch.bfloat16 for _, t in loaded.iter_weights(torch.bfloat16))


def test_tokenizer_from_folder_equals_transformers(llama_folder, hf_tokenizer):
    folder, _ = llama_folder
    tok = open_model(ModelConfig(model=folder)).tokenizer
    reference = hf_tokenizer
    assert tok.bos_token_id == 1 and 2 in tok.eos_token_ids
    assert tok.vocab_size == 49152 and tok.all_special_ids == frozenset(range(17))
    for text in ("Hello world!", "<|im_start|>user\n中文 😀<|im_end|>", "x" * 50):
        assert tok.encode(text) == reference(text)["input_ids"]
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == reference.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )


def test_chat_template_sources(llama_folder, tmp_path):
    from tokenmill.tokenizer.tokenizer import Tokenizer

    folder, _ = llama_folder
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(folder, name), encoding="utf-8") as src:
            (tmp_path / name).write_text(src.read(), encoding="utf-8")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = [
        {"name": "tool_use", "template": "T"},
        {"name": "default", "template": "D"},
    ]
    config["add_bos_token"] = True
    config["bos_token"] = {"content": "<|im_start|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = Tokenizer.from_hf_folder(str(tmp_path))
    assert tok.chat_template == "D"
    assert tok.add_bos and tok.encode("hi")[0] == 1 and tok.encode("hi", False)[0] != 1
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0].content }}", encoding="utf-8")
    tok = Tokenizer.from_hf_folder(str(tmp_path))
    assert tok.chat_template.startswith("J")
    # The template did not write BOS, so tokenize=True adds the one the model wants.
    ids = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True)
    assert ids[0] == 1 and tok.decode(ids) == "Jx"


def test_sharded_checkpoint_and_rope_parameters(tmp_path):
    model = _tiny_llama(
        rope_scaling=dict(LLAMA3_ROPE), rope_theta=500000.0, tie_word_embeddings=True
    )
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="2MB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    loaded = open_model(ModelConfig(model=str(tmp_path)))
    assert loaded.tokenizer is None
    assert loaded.arch.rope_theta == 500000.0
    assert loaded.arch.rope_scaling == LLAMA3_ROPE
    assert loaded.arch.tie_word_embeddings
    ours = dict(loaded.iter_weights(torch.float32))
    ref = model.state_dict()
    assert set(ref) - set(ours) <= {"lm_head.weight"}
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), name


def test_gemma3_folder_config(tmp_path):
    model = _tiny_gemma3()
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = open_model(ModelConfig(model=str(tmp_path)))
    arch, cfg = loaded.arch, model.config
    assert arch.architecture == "gemma3" and arch.hidden_act == "gelu_pytorch_tanh"
    assert arch.sliding_window == 16 and arch.sliding_window_pattern == 6
    assert arch.query_pre_attn_scalar == 32 and arch.head_dim == 32
    assert arch.rope_theta == cfg.rope_parameters["full_attention"]["rope_theta"]
    assert arch.rope_local_base_freq == cfg.rope_parameters["sliding_attention"]["rope_theta"]
    assert arch.tie_word_embeddings  # the saved file holds the embedding only
    assert set(dict(loaded.iter_weights(torch.float32))) == set(model.state_dict()) - {
        "lm_head.weight"
    }


def test_normalize_old_style_config():
    old = {
        "model_type": "gemma3_text",
        "rope_theta": 1e6,
        "rope_local_base_freq": 1e4,
        "rope_scaling": {"type": "linear", "factor": 8.0},
        "hidden_activation": "gelu",
    }
    cfg = normalize_hf_config(old)
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert cfg["hidden_act"] == "gelu" and cfg["rope_local_base_freq"] == 1e4


def test_folder_errors(tmp_path, llama_folder):
    (tmp_path / "config.json").write_text(json.dumps(_tiny_llama().config.to_dict()))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        open_model(ModelConfig(model=str(tmp_path)))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="missing.*model-00001-of-00002"):
        open_model(ModelConfig(model=str(tmp_path)))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        open_model(ModelConfig(model=str(tmp_path), load_format="hf"))


# --- dummy weights -------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_gemma3], ids=["llama", "gemma3"])
def test_dummy_names_and_shapes_match_transformers(make):
    model = make()
    arch = ArchConfig.from_hf_dict(model.config.to_dict())
    shapes = dummy_weight_shapes(arch)
    ref = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if arch.tie_word_embeddings:
        ref.pop("lm_head.weight")
    assert shapes == ref


def test_dummy_is_deterministic_and_small():
    arch = ArchConfig.from_hf_dict(_tiny_llama().config.to_dict())
    first = dict(open_dummy(arch, seed=3).iter_weights(torch.float32))
    again = dict(open_dummy(arch, seed=3).iter_weights(torch.float32))
    other = dict(open_dummy(arch, seed=4).iter_weights(torch.float32))
    for name, tensor in first.items():
        assert torch.equal(tensor, again[name]) and torch.isfinite(tensor).all()
        assert not torch.equal(tensor, other[name])
    q = first["model.layers.0.self_attn.q_proj.weight"]
    assert 0.015 < q.std().item() < 0.025
    assert torch.allclose(first["model.norm.weight"], torch.ones(64), atol=0.2)


def test_open_model_dummy_formats(smollm_path, tmp_path):
    cfg = _tiny_llama().config.to_dict()
    loaded = open_model(ModelConfig(load_format="dummy", dummy_config=cfg, seed=1))
    assert loaded.format == "dummy" and loaded.tokenizer is None
    assert loaded.arch.num_hidden_layers == 2
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    from_file = open_model(ModelConfig(load_format="dummy", dummy_config=str(path))).arch
    assert replace(from_file, extra={}) == replace(loaded.arch, extra={})
    like_smollm = open_model(ModelConfig(load_format="dummy", model=smollm_path))
    assert like_smollm.arch.hidden_size == 576 and like_smollm.tokenizer is not None
