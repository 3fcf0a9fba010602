"""Shared fixtures: an isolated cache, and a tiny randomly initialised Llama with SmolLM2's tokenizer
(real transformers/PEFT/TRL code paths at a fraction of the cost of the real model)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer_source() -> str:
    """Where the tiny models' tokenizer comes from: the embedded model, or (`$LEAP_DSPY_TEST_TOKENIZER`) a
    tokenizer folder, for machines without the embedded package (a lent GPU, see bench/device_check.sh)."""
    return os.environ.get("LEAP_DSPY_TEST_TOKENIZER", "smollm2-135m")


def build_tiny_model(path: Path, tokenizer_source: str) -> str:
    """A 2-layer random Llama saved at `path` with the tokenizer of `tokenizer_source` (also bench/scale_out.py's)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from leap_dspy.lm.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_source)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_source: str) -> str:
    return build_tiny_model(Path(tmp_path_factory.mktemp("tiny-llama")), tokenizer_source)


@pytest.fixture(autouse=True, scope="module")
def _release_models() -> object:
    """Models stay loaded in the process-wide engine registry for speed; a test module's engines are let go
    when it ends, so the whole suite's memory stays that of its largest module."""
    yield
    import gc

    from leap_dspy.lm import close_all

    close_all()
    gc.collect()
