"""`open_model`: turn a ModelConfig into a LoadedModel by picking the loader for its format."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.loader.base import LoadedModel
from tokenmill.loader.default_model import default_model_path
from tokenmill.loader.dummy import open_dummy
from tokenmill.loader.gguf_file import GGUF_MAGIC
from tokenmill.loader.gguf_loader import open_gguf
from tokenmill.loader.hf_loader import open_hf_folder
from tokenmill.models.arch_config import ArchConfig

LOADERS: dict[str, Callable[[str], LoadedModel]] = {"gguf": open_gguf, "hf": open_hf_folder}


def open_model(model_config: ModelConfig) -> LoadedModel:
    """Open the model `model_config` names; `model=None` is the bundled SmolLM2 GGUF.

    load_format "auto" picks GGUF for a .gguf file (or a folder holding exactly one) and the
    Hugging Face loader for a folder with config.json. "dummy" gives random weights for
    `dummy_config`, or for the architecture of `model` (keeping its tokenizer).
    """
    if model_config.load_format == "dummy":
        return _open_dummy(model_config)
    path = model_config.model or default_model_path()
    path = os.path.expanduser(path)
    fmt = model_config.load_format
    if fmt == "auto":
        fmt, path = detect_format(path)
    elif not os.path.exists(path):
        raise ModelLoadError(f"model path does not exist: {path}")
    return LOADERS[fmt](path)


def detect_format(path: str) -> tuple[str, str]:
    """(format, file or folder to open) for a model path, or ModelLoadError saying why not."""
    if not os.path.exists(path):
        raise ModelLoadError(f"model path does not exist: {path}")
    if os.path.isfile(path):
        if is_gguf_file(path):
            return "gguf", path
    elif os.path.isfile(os.path.join(path, "config.json")):
        return "hf", path
    else:
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return "gguf", os.path.join(path, ggufs[0])
    raise ModelLoadError(
        f"cannot tell how to load {path}: expected a .gguf file or a Hugging Face model "
        "folder with config.json and *.safetensors"
    )


def is_gguf_file(path: str) -> bool:
    """A file named *.gguf or starting with the GGUF magic."""
    if path.endswith(".gguf"):
        return True
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _open_dummy(model_config: ModelConfig) -> LoadedModel:
    source = model_config.dummy_config
    if source is None:
        real = open_model(ModelConfig(model=model_config.model))
        return open_dummy(real.arch, seed=model_config.seed, tokenizer=real.tokenizer)
    if isinstance(source, str):
        try:
            with open(source, encoding="utf-8") as f:
                source = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot read dummy_config {source}: {exc}") from exc
    arch = ArchConfig.from_hf_dict(source)
    return open_dummy(arch, seed=model_config.seed)
