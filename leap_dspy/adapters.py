"""`CompactChatAdapter`: DSPy's ChatAdapter with a short system message.

The student's prompt is paid for at every step of every rollout and every training row. ChatAdapter's
system message spells out each field's type and the whole input/output layout and repeats the output order
in every user message, which a model fine-tuned on the format does not need. This adapter keeps ChatAdapter's
`[[ ## field ## ]]` sections, its parser and its fine-tuning format, and says the rest in a few words.
"""

from __future__ import annotations

from dspy.adapters.chat_adapter import ChatAdapter
from dspy.signatures.signature import Signature

END_MARKER = "completed"
"""ChatAdapter's end-of-answer field."""


def _describe(fields: dict) -> str:
    parts = []
    for name, info in fields.items():
        desc = (info.json_schema_extra or {}).get("desc", "")
        parts.append(f"{name} ({desc})" if desc and not desc.startswith("${") else name)
    return ", ".join(parts)


class CompactChatAdapter(ChatAdapter):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - ChatAdapter's own arguments
        kwargs.setdefault("use_json_adapter_fallback", False)
        super().__init__(*args, **kwargs)

    def format_field_description(self, signature: type[Signature]) -> str:
        return f"Inputs: {_describe(signature.input_fields)}.\nOutputs: {_describe(signature.output_fields)}."

    def format_field_structure(self, signature: type[Signature]) -> str:
        outputs = "\n\n".join(f"[[ ## {name} ## ]]\n{{{name}}}" for name in signature.output_fields)
        return f"Answer in this form:\n\n{outputs}\n\n[[ ## completed ## ]]"

    def format_task_description(self, signature: type[Signature]) -> str:
        return signature.instructions

    def user_message_output_requirements(self, signature: type[Signature]) -> str:
        return ""
