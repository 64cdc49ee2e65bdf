"""Precision schemes as data: a name like `int4-g64+kv-int8` is a set of engine-config settings.

    none      -> {}                              (the default dtype)
    bf16      -> {"dtype": "bfloat16"}           (also fp32, fp16)
    kv-int8   -> {"kv_cache_dtype": "int8"}      (any kv-<dtype>)
    int8      -> {"quantization": "int8"}        (any other name: a quantization method)
    a+b       -> the union (a setting named twice is refused)

plus {"quantization": "none"} wherever no method is named.

A setting is applied to whichever section of the EngineConfig tree has a field of that name, so a
quantization method the engine learns needs no change here; one the engine does not know fails
when its config is built (`SchemeUnsupported`), before any weights are read.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from tokenmill.config import EngineConfig
from tokenmill.errors import ConfigError

DTYPE_NAMES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
}
KV_PREFIX = "kv-"
_PART = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


class SchemeUnsupported(ConfigError):
    """This tokenmill cannot build an engine for the scheme (unknown option or value)."""


@dataclass(frozen=True)
class Scheme:
    name: str
    settings: tuple[tuple[str, str], ...]  # (config field, value), sorted by field

    @property
    def settings_dict(self) -> dict[str, str]:
        return dict(self.settings)


REFERENCE = Scheme("reference", (("dtype", "float32"), ("quantization", "none")))


def parse_scheme(name: str) -> Scheme:
    """`int8+kv-int8` -> Scheme with {"quantization": "int8", "kv_cache_dtype": "int8"}."""
    settings: dict[str, str] = {}
    for part in name.strip().lower().split("+"):
        if not _PART.match(part):
            raise ConfigError(f"scheme {name!r}: {part!r} is not a scheme name")
        for key, value in _part_settings(part).items():
            if key in settings:
                raise ConfigError(f"scheme {name!r} sets {key} twice")
            settings[key] = value
    # Explicit, so an engine whose default is another method (say "auto") computes none.
    settings.setdefault("quantization", "none")
    return Scheme(name.strip().lower(), tuple(sorted(settings.items())))


def parse_schemes(text: str) -> tuple[Scheme, ...]:
    names = [n for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("no schemes given")
    schemes = tuple(parse_scheme(n) for n in names)
    seen = [s.name for s in schemes]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"a scheme is named twice in {text!r}")
    return schemes


def _part_settings(part: str) -> dict[str, str]:
    if part == "none":
        return {}
    if part in DTYPE_NAMES:
        return {"dtype": DTYPE_NAMES[part]}
    if part.startswith(KV_PREFIX):
        return {"kv_cache_dtype": part[len(KV_PREFIX) :]}
    return {"quantization": part}


def apply_scheme(config: EngineConfig, scheme: Scheme) -> EngineConfig:
    """`config` with the scheme's settings, each in the config section that has the field.

    Raises SchemeUnsupported when no section has a field, or when the value is refused."""
    sections = {"": config, **{f.name: getattr(config, f.name) for f in _nested(config)}}
    changes: dict[str, dict[str, str]] = {}
    for key, value in scheme.settings:
        owner = next((s for s, obj in sections.items() if _has_field(obj, key)), None)
        if owner is None:
            if key == "quantization" and value == "none":
                continue  # an engine without the option computes exactly that
            raise SchemeUnsupported(
                f"scheme {scheme.name!r}: this tokenmill has no {key!r} option "
                f"(wanted {key}={value!r})"
            )
        changes.setdefault(owner, {})[key] = value
    try:
        top = changes.pop("", {})
        for section, values in changes.items():
            top[section] = dataclasses.replace(sections[section], **values)
        return dataclasses.replace(config, **top)
    except (ConfigError, TypeError, ValueError) as exc:
        raise SchemeUnsupported(f"scheme {scheme.name!r}: {exc}") from exc


def _nested(config: EngineConfig) -> list[dataclasses.Field]:
    return [
        f for f in dataclasses.fields(config) if dataclasses.is_dataclass(getattr(config, f.name))
    ]


def _has_field(obj: object, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(obj))
