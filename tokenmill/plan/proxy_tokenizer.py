"""A stand-in tokenizer for measuring ShareGPT lengths when the planned model's own tokenizer is
not at hand: the engine's Tokenizer of the bundled SmolLM2 model. Token counts of other models
differ by some percent (Llama 3's 128k vocabulary packs English a little tighter), which the
planner states in its output.
"""

from __future__ import annotations

import functools

from tokenmill.errors import ConfigError, ModelLoadError
from tokenmill.workload.sharegpt import TextEncoder

PROXY_NAME = "SmolLM2-135M-Instruct (bundled)"


@functools.lru_cache(maxsize=1)
def load_proxy_tokenizer() -> TextEncoder:
    """The bundled model's tokenizer (read from its GGUF metadata; weights are not loaded)."""
    from tokenmill.loader.default_model import default_model_path
    from tokenmill.loader.gguf_loader import open_gguf

    try:
        tokenizer = open_gguf(default_model_path()).tokenizer
    except (ModelLoadError, OSError) as exc:
        raise ConfigError(
            f"no proxy tokenizer: the bundled model cannot be opened ({exc})"
        ) from exc
    if tokenizer is None:
        raise ConfigError("no proxy tokenizer: the bundled model has no tokenizer metadata")
    return tokenizer
