"""A seeded generator of small JSON schemas (nested objects, enums, arrays, bounded numbers),
for the structured-output tests and `tokenmill.bench.structured_bench`."""

from __future__ import annotations

import random

WORDS = ["name", "city", "score", "tags", "level", "owner", "size", "active", "kind", "price"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema: 1-3 required properties, no others (additionalProperties false)."""
    names = rng.sample(WORDS, rng.randint(1, 3))
    return {
        "type": "object",
        "properties": {name: _value_schema(rng, depth) for name in names},
        "required": names,
        "additionalProperties": False,
    }


def _value_schema(rng: random.Random, depth: int) -> dict:
    kinds = ["string", "integer", "number", "boolean", "enum", "array"]
    if depth < 1:
        kinds.append("object")
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 12)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
    if kind == "number":
        low = rng.choice([-10.0, 0.0, 0.5, 3.0])
        return {"type": "number", "minimum": low, "maximum": low + rng.choice([1.0, 10.0, 100.0])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "small", "large", "none"], 3)}
    if kind == "array":
        item = rng.choice([{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}])
        return {"type": "array", "items": item, "minItems": 1, "maxItems": 3}
    return random_schema(rng, depth + 1)
