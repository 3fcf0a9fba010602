"""From a DSPy request to the exact prompt text the model sees, shared by inference and training.

Fine-tuning teaches the student the format only if the training prompt is byte-for-byte the inference
prompt. Both sides therefore go through `format_prompt` (the tokenizer's chat template with
`add_generation_prompt=True`) and tokenize the result with `tokenize_prompt` (no extra special tokens: the
template already wrote them).
"""

from __future__ import annotations

from typing import Any


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(getattr(part, "text", None) or "" for part in content)


def request_to_messages(request: Any) -> list[dict[str, str]]:
    """Chat messages (`{"role", "content"}`) of a `dspy.lm15.Request`: its system text, then its messages.

    A `developer` message becomes a system message when it opens the conversation and a user message
    elsewhere (chat templates accept a system turn only first); tool results become user turns.
    """
    messages: list[dict[str, str]] = []
    if request.system is not None:
        messages.append({"role": "system", "content": _text_of(request.system)})
    for message in request.messages:
        role = message.role
        text = _text_of(message.parts)
        if role == "developer":
            role = "system" if not messages else "user"
        elif role == "tool":
            role = "user"
        if role == "system" and messages:
            role = "user"
        messages.append({"role": role, "content": text})
    return messages


def format_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text for `messages`: the chat template with the assistant turn opened."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a formatted prompt. No special tokens are added: the template already holds them."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def split_for_training(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, str]:
    """(prompt, completion) texts for a conversation whose last message is the assistant's answer.

    The prompt is `format_prompt(messages[:-1])`, exactly what inference sends; the completion is the rest of
    the rendered conversation (the answer plus the template's end-of-turn marker, e.g. `<|im_end|>\\n`), so a
    model trained on it learns to stop. Tokenize the two parts separately and concatenate the ids: that is
    how inference sees the prompt (tokenized on its own).
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("split_for_training needs a conversation that ends with an assistant message")
    prompt = format_prompt(tokenizer, messages[:-1])
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("this chat template renders the assistant turn differently from the generation prompt")
    return prompt, full[len(prompt):]
