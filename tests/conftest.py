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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_source: str) -> str:
    from leap_dspy.lm.models import build_tiny_model

    return str(build_tiny_model(Path(tmp_path_factory.mktemp("tiny-llama")), tokenizer_source))


@pytest.fixture(autouse=True, scope="module")
def _release_models() -> object:
    """Models stay loaded in the process-wide engine registry for speed; a test module's engines are let go
    when it ends, so the whole suite's memory stays that of its largest module."""
    yield
    import gc

    from leap_dspy.lm import close_all

    close_all()
    gc.collect()
