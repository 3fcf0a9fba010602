"""Language-model backends: a local transformers engine for DSPy, and LM factories (local, vLLM).

Names are imported lazily so that `import leap_dspy.lm.models` (used by training code) does not pull DSPy.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "LocalEngine": "leap_dspy.lm.engine",
    "AsyncLocalEngine": "leap_dspy.lm.engine",
    "local_lm": "leap_dspy.lm.lms",
    "vllm_lm": "leap_dspy.lm.lms",
    "get_engine": "leap_dspy.lm.lms",
    "close_all": "leap_dspy.lm.lms",
    "format_prompt": "leap_dspy.lm.chat",
    "request_to_messages": "leap_dspy.lm.chat",
    "split_for_training": "leap_dspy.lm.chat",
    "tokenize_prompt": "leap_dspy.lm.chat",
    "DEFAULT_MODEL": "leap_dspy.lm.models",
    "load_model": "leap_dspy.lm.models",
    "load_tokenizer": "leap_dspy.lm.models",
    "load_model_with_adapter": "leap_dspy.lm.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'leap_dspy.lm' has no attribute {name!r}")
