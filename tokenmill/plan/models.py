"""The model catalogue: published config.json files of popular models (catalogue/*.json, each
with a `_source`), or any config.json path or model folder the user names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tokenmill.errors import ConfigError, UnsupportedModelError
from tokenmill.models.arch_config import ArchConfig


@dataclass(frozen=True)
class ModelEntry:
    name: str
    arch: ArchConfig
    source: str


def _catalogue() -> dict[str, object]:
    folder = resources.files("tokenmill.plan").joinpath("catalogue")
    return {f.name.removesuffix(".json"): f for f in folder.iterdir() if f.name.endswith(".json")}


def list_models() -> list[str]:
    return sorted(_catalogue())


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace("llama3", "llama-3")


def _from_gguf(path: Path) -> ModelEntry:
    """The architecture in a GGUF file's metadata (what `tokenmill serve` loads; no weights)."""
    from tokenmill.loader.gguf_file import GGUFFile
    from tokenmill.loader.gguf_loader import gguf_arch_config

    try:
        arch = gguf_arch_config(GGUFFile(str(path)))
    except (OSError, ValueError, KeyError, UnsupportedModelError) as exc:
        raise ConfigError(f"cannot read the GGUF model {path}: {exc}") from exc
    return ModelEntry(path.stem, arch, str(path))


def _from_path(path: Path) -> ModelEntry:
    from tokenmill.loader.registry import is_gguf_file

    if path.is_file() and is_gguf_file(str(path)):
        return _from_gguf(path)
    config = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read model config {config}: {exc}") from exc
    try:
        arch = ArchConfig.from_hf_dict(raw)
    except KeyError as exc:
        raise ConfigError(f"{config} is not a Llama-family config.json: missing {exc}") from exc
    return ModelEntry(
        path.name if path.is_dir() else path.parent.name or path.stem, arch, str(config)
    )


def get_model(name_or_path: str) -> ModelEntry:
    """A catalogue model by name, or a config.json / model folder / GGUF file by path."""
    catalogue = _catalogue()
    key = _normalise(name_or_path)
    if key in catalogue:
        raw = json.loads(catalogue[key].read_text(encoding="utf-8"))
        return ModelEntry(key, ArchConfig.from_hf_dict(raw), raw.get("_source", "catalogue"))
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _from_path(path)
    raise ConfigError(
        f"unknown model {name_or_path!r}; known: {', '.join(list_models())} "
        "(or give a config.json, model folder or GGUF path)"
    )
