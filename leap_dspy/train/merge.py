"""Exporting an adapter merged into its base weights: a plain transformers folder for servers (vLLM, llama.cpp
conversion) that do not load LoRA."""

from __future__ import annotations

import os
from pathlib import Path


def merge_adapter(
    model: str, adapter_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], dtype: str = "auto"
) -> Path:
    """Load `model` + the LoRA at `adapter_dir`, fold the adapter into the weights, save safetensors + tokenizer
    at `out_dir` (written to `<out_dir>.tmp` then renamed). Returns `out_dir`."""
    from leap_dspy.lm.models import load_model, load_tokenizer, merge_lora
    from leap_dspy.train.common import atomic_output_dir

    merged = merge_lora(load_model(model, dtype=dtype), adapter_dir)
    tokenizer = load_tokenizer(model)
    with atomic_output_dir(out_dir) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)
