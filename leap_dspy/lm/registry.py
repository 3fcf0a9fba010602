"""Process-level sharing of loaded models: a model in memory is expensive, so load each one once.

Two engines (or two `local_lm()` calls) naming the same (model, adapter, dtype, device) share one
`Generator`: the weights, the tokenizer, the prefix KV store and the lock that serialises forward passes
(on a small CPU, two concurrent forward passes only fight over the cores).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leap_dspy.lm.generate import Generator
from leap_dspy.lm.kernels import prepare_for_inference
from leap_dspy.lm.models import load_model_with_adapter, load_tokenizer, pick_dtype

_lock = threading.Lock()
_loaded: dict[tuple, LoadedModel] = {}


@dataclass
class LoadedModel:
    """A model and tokenizer in memory, with the generator that runs them and a lock for the tokenizer."""

    key: tuple
    model: Any
    tokenizer: Any
    generator: Generator
    tokenizer_lock: threading.Lock

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def adapter_key(adapter: str | Path | None) -> tuple[str, float] | None:
    """An adapter's identity: its absolute path and the weights' mtime (a retrained adapter written to the
    same folder is a different model)."""
    if adapter is None:
        return None
    path = Path(adapter).expanduser().resolve()
    weights = [p for p in path.glob("adapter_model.*")]
    mtime = max((p.stat().st_mtime for p in weights), default=0.0)
    return str(path), mtime


def model_key(model: str, adapter: str | Path | None, dtype: str, device: str | None) -> tuple:
    return (model, adapter_key(adapter), str(pick_dtype(dtype)), device or default_device())


def get_loaded(model: str, adapter: str | Path | None = None, dtype: str = "auto",
               device: str | None = None) -> LoadedModel:
    """The shared `LoadedModel` for these settings, loading it on first use."""
    key = model_key(model, adapter, dtype, device)
    with _lock:
        found = _loaded.get(key)
        if found is not None:
            return found
        tokenizer = load_tokenizer(model)
        lm = load_model_with_adapter(model, adapter, dtype, key[3])
        prepare_for_inference(lm)
        loaded = LoadedModel(key, lm, tokenizer, Generator(lm, tokenizer), threading.Lock())
        _loaded[key] = loaded
        return loaded


def loaded_generators() -> list[Generator]:
    """The generators of the models in memory now."""
    with _lock:
        return [loaded.generator for loaded in _loaded.values()]


def release_all() -> None:
    """Forget every loaded model (engines already holding one keep it alive until they go)."""
    with _lock:
        _loaded.clear()
