"""Open a Hugging Face model folder: config.json, *.safetensors (sharded or not), tokenizer."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open

from tokenmill.errors import ModelLoadError
from tokenmill.loader.base import LoadedModel
from tokenmill.models.arch_config import ArchConfig
from tokenmill.tokenizer.tokenizer import Tokenizer

# Multimodal checkpoints (Gemma 3 4B+) nest the text model; these prefixes map back to the
# plain causal-LM names, and the vision parts are skipped.
_NAME_PREFIXES = {
    "model.language_model.": "model.",
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
}
_SKIPPED_PREFIXES = (
    "vision_tower.",
    "model.vision_tower.",
    "multi_modal_projector.",
    "model.multi_modal_projector.",
)


def open_hf_folder(folder: str, with_tokenizer: bool = True) -> LoadedModel:
    """Open `folder`; tensors are read one at a time by `iter_weights(dtype)`."""
    config = read_json_file(os.path.join(folder, "config.json"))
    arch = ArchConfig.from_hf_dict(config)
    files = safetensors_files(folder)
    generation = read_json_file(os.path.join(folder, "generation_config.json"), missing_ok=True)
    eos_ids = list(arch.eos_token_ids)
    for eos in _as_list(generation.get("eos_token_id")):
        if eos not in eos_ids:
            eos_ids.append(eos)

    def iter_weights(dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    hf_name = _causal_lm_name(name)
                    if hf_name is not None:
                        yield hf_name, f.get_tensor(name).to(dtype)

    tokenizer = None
    if with_tokenizer and os.path.isfile(os.path.join(folder, "tokenizer.json")):
        tokenizer = Tokenizer.from_hf_folder(folder, extra_eos_token_ids=eos_ids)
    return LoadedModel(
        arch=dataclasses.replace(arch, eos_token_ids=tuple(eos_ids)),
        iter_weights=iter_weights,
        tokenizer=tokenizer,
        source=folder,
        format="hf",
    )


def safetensors_files(folder: str) -> list[str]:
    """The folder's safetensors files, in the order the shard index lists them."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        weight_map = read_json_file(index_path).get("weight_map", {})
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise ModelLoadError(f"{folder}: shards listed in {index_path} are missing: {missing}")
        return [os.path.join(folder, n) for n in names]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{folder} has config.json but no *.safetensors weights")
    return files


def _causal_lm_name(name: str) -> str | None:
    if name.startswith(_SKIPPED_PREFIXES):
        return None
    for old, new in _NAME_PREFIXES.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def read_json_file(path: str, missing_ok: bool = False) -> dict[str, Any]:
    if not os.path.isfile(path):
        if missing_ok:
            return {}
        raise ModelLoadError(f"{path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
