"""`dspy.LM` factories: the local transformers engine and a vLLM OpenAI-compatible server.

`local_lm()` hands out `dspy.LM`s over a process-wide registry of engines, so every LM with the same
settings shares one engine (one model in memory, one batching worker: concurrent calls from different
programs still land in the same batches).
"""

from __future__ import annotations

import inspect
import json
import os
import threading
from pathlib import Path
from typing import Any

from leap_dspy.lm.engine import AsyncLocalEngine, LocalEngine
from leap_dspy.lm.models import DEFAULT_MODEL

_engines: dict[str, LocalEngine] = {}
_engines_lock = threading.Lock()


def get_engine(model: str = DEFAULT_MODEL, adapter: str | os.PathLike | None = None, **engine_kwargs: Any
               ) -> LocalEngine:
    """The shared `LocalEngine` for these settings (created on first use). Same arguments as `LocalEngine`."""
    from leap_dspy.lm.registry import adapter_key

    adapter_path = str(Path(adapter).expanduser().resolve()) if adapter is not None else None
    # Defaults filled in, so local_lm(max_batch=64) and a loaded state naming every setting share one engine.
    bound = inspect.signature(LocalEngine).bind(str(model), adapter_path, **engine_kwargs)
    bound.apply_defaults()
    settings = dict(bound.arguments)
    settings["adapter"] = adapter_key(adapter_path)
    key = json.dumps(settings, sort_keys=True, default=str)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = LocalEngine(model, adapter_path, **engine_kwargs)
            _engines[key] = engine
        return engine


def close_all() -> None:
    """Stop every shared engine's worker and forget the engines (their models go when unreferenced)."""
    from leap_dspy.lm.registry import release_all

    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.close()
    release_all()


def model_label(model: str) -> str:
    """A short model name for `dspy.LM("local/<label>")` (a directory's last part, never a whole path)."""
    path = Path(model)
    return path.name if path.name else str(model)


def local_lm(model: str = DEFAULT_MODEL, adapter: str | os.PathLike | None = None, **engine_kwargs: Any) -> Any:
    """A `dspy.LM` over the shared local engine: greedy (temperature 0), no DSPy cache, no network.

    `engine_kwargs` go to `LocalEngine` (dtype, max_batch, max_new_tokens, batching, prefix_cache,
    batch_wait_s, device). The LM's `max_tokens` is the engine's `max_new_tokens`. Save/load with DSPy:
    `program.save(path)` then `program.load(path, allow_unsafe_lm_state=True)` (the engine class is imported).
    """
    import dspy

    engine = get_engine(model, adapter, **engine_kwargs)
    label = model_label(engine.model) + (f"+{Path(engine.adapter).name}" if engine.adapter else "")
    return dspy.LM(
        f"local/{label}",
        engine=engine,
        async_engine=AsyncLocalEngine(engine),
        cache=False,
        temperature=0.0,
        max_tokens=engine.max_new_tokens,
    )


def vllm_lm(model: str, adapter: str | None = None, base_url: str = "http://localhost:8000/v1", *,
            api_key: str = "EMPTY", temperature: float = 0.0, max_tokens: int = 256, **lm_kwargs: Any) -> Any:
    """A `dspy.LM` for a running vLLM OpenAI-compatible server (the GPU path for rollouts).

    Start the server with LoRA enabled, e.g.
    `vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora --lora-modules student=/path/to/adapter`;
    vLLM serves an adapter under its own model name, so with `adapter` set the LM asks for that name (the
    adapter's registered name, e.g. "student"; a path's last folder is used when a path is given). vLLM
    applies the model's chat template itself, the same template `format_prompt` uses locally, and caches
    shared prefixes on its own.
    """
    import dspy

    served = model if adapter is None else Path(adapter).name
    return dspy.LM(
        f"hosted_vllm/{served}",
        api_base=base_url,
        api_key=api_key,
        cache=False,
        temperature=temperature,
        max_tokens=max_tokens,
        **lm_kwargs,
    )
