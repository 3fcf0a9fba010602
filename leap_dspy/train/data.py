"""Turning chat rows into token ids exactly as the inference engine will see them.

The prompt is `tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)`, tokenised on
its own: the same string and the same ids the local LM engine builds before generating. The completion is the
text the chat template appends for the assistant turn, up to and including its end-of-turn token (so the model
learns to stop); the template's trailing newline after that token is never generated, so it is not trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Message = Mapping[str, Any]


def as_messages(value: Any, field: str) -> list[dict[str, Any]]:
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ValueError(f"{field!r} must be a non-empty list of chat messages, got {type(value).__name__}")
    return [dict(m) for m in value]


def prompt_text(tokenizer: Any, prompt: Sequence[Message]) -> str:
    """The generation prompt string, identical to what inference builds."""
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def end_of_turn(tokenizer: Any) -> str:
    """The token that closes an assistant turn (SmolLM2/ChatML: `<|im_end|>`, which is also its EOS)."""
    return tokenizer.eos_token


def completion_text(tokenizer: Any, prompt: Sequence[Message], completion: Sequence[Message]) -> str:
    """What the chat template appends to the generation prompt for `completion`, cut after end-of-turn."""
    head = prompt_text(tokenizer, prompt)
    full = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
    if not full.startswith(head):
        raise ValueError(
            "the chat template renders the prompt differently with and without the completion; training text "
            "would not match inference text"
        )
    tail = full[len(head):]
    eot = end_of_turn(tokenizer)
    if eot and eot in tail:
        tail = tail[: tail.rindex(eot) + len(eot)]
    return tail


def encode_prompt_completion(
    tokenizer: Any, prompt: Sequence[Message], completion: Sequence[Message], max_length: int | None = None
) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids), each tokenised on its own (no special tokens added beyond the template's).

    Rows over `max_length` lose tokens from the start of the prompt: the completion and the prompt's end (the
    latest observation, the generation header) are what matter for the next action.
    """
    p_ids = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion_text(tokenizer, prompt, completion), add_special_tokens=False)["input_ids"]
    if max_length is not None and len(p_ids) + len(c_ids) > max_length:
        keep = max(max_length - len(c_ids), 1)
        p_ids = p_ids[-keep:]
        c_ids = c_ids[: max_length - len(p_ids)]
    return list(p_ids), list(c_ids)


def sft_features(tokenizer: Any, rows: Sequence[Mapping[str, Any]], max_length: int | None) -> dict[str, list]:
    """Columns `input_ids`, `labels` (-100 on the prompt) for a pre-tokenised SFT dataset."""
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    for i, row in enumerate(rows):
        if "prompt" not in row or "completion" not in row:
            raise ValueError(f"row {i} needs 'prompt' and 'completion' (conversational prompt-completion)")
        p, c = encode_prompt_completion(
            tokenizer, as_messages(row["prompt"], "prompt"), as_messages(row["completion"], "completion"), max_length
        )
        input_ids.append(p + c)
        labels.append([-100] * len(p) + c)
    return {"input_ids": input_ids, "labels": labels}


def check_rows(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], method: str) -> None:
    if not rows:
        raise ValueError(f"{method}: no training rows")
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{method}: row {i} lacks {missing}; expected keys {list(keys)}")
