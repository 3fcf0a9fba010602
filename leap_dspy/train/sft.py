"""Supervised fine-tuning (behaviour cloning of expert/corrected steps) with TRL's SFTTrainer + LoRA.

Rows are tokenised here (see `data.py`) rather than by TRL so that the prompt ids are, by construction, the ids
the inference engine feeds the model. The loss is computed on completion tokens only, and the LM head is applied
only at those positions: on CPU, TRL's fused head scores every position, and with prompts much longer than
their completions the vocabulary projection would otherwise spend a large share of each step on logits nobody
uses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from leap_dspy.train.common import (
    LossRecorder,
    atomic_output_dir,
    fit_attention,
    load_trainable_model,
    quiet_libraries,
    run_trainer,
    torch_threads,
    trl_common_args,
)
from leap_dspy.train.config import TrainConfig, TrainResult
from leap_dspy.train.data import check_rows, sft_features


def completion_only_loss(model: Any, inputs: Mapping[str, Any], num_items_in_batch: Any = None) -> Any:
    """Mean next-token cross-entropy over positions whose label is not -100, projecting only those positions
    through the LM head. `model` is the (PEFT-wrapped) causal LM; the LoRA layers live inside its backbone."""
    import torch
    import torch.nn.functional as F

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    labels = inputs["labels"]
    out = backbone(
        input_ids=inputs["input_ids"],
        attention_mask=inputs.get("attention_mask"),
        position_ids=inputs.get("position_ids"),
        use_cache=False,
    )
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    hidden = out.last_hidden_state[:, :-1][mask]
    logits = causal_lm.get_output_embeddings()(hidden).float()
    loss_sum = F.cross_entropy(logits, shift_labels[mask], reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum()
    return loss_sum / torch.as_tensor(denom, device=loss_sum.device).clamp(min=1)


def _trainer_class() -> type:
    from trl import SFTTrainer

    class CompletionOnlySFTTrainer(SFTTrainer):
        """SFTTrainer whose loss projects only completion positions through the LM head."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            if return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = completion_only_loss(self.accelerator.unwrap_model(model), inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # As Trainer.compute_loss does: the token count is the global one, and DDP averages gradients.
                loss = loss * self.accelerator.num_processes
            return loss

    return CompletionOnlySFTTrainer


class _CountingCollator:
    """Wraps TRL's collator to count the real (non-padding) tokens of every batch the trainer consumes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.tokens = 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        self.tokens += sum(len(e["input_ids"]) for e in examples)
        return self.inner(examples)


def train_sft(
    rows: Sequence[Mapping[str, Any]],
    *,
    model: str,
    output_dir: str | os.PathLike[str],
    init_adapter: str | os.PathLike[str] | None = None,
    config: TrainConfig | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter on conversational prompt-completion rows; save it (adapter only) at output_dir.

    rows: `{"prompt": [system, user, ...], "completion": [{"role": "assistant", "content": ...}]}` as produced by
    DSPy's `ChatAdapter.format_finetune_data`. `init_adapter` continues training an existing adapter.
    """
    from datasets import Dataset
    from trl import SFTConfig

    config = config or TrainConfig()
    check_rows(rows, ("prompt", "completion"), "sft")
    t0 = time.perf_counter()
    final_dir = Path(output_dir)
    with torch_threads(config.num_threads), quiet_libraries(config.progress_bar), atomic_output_dir(final_dir) as tmp:
        peft_model, tokenizer = load_trainable_model(model, config, init_adapter)
        features = sft_features(tokenizer, rows, config.max_length)
        longest = max(len(ids) for ids in features["input_ids"])
        fit_attention(peft_model, config, longest)
        dataset = Dataset.from_dict(features)
        tokens_per_epoch = sum(len(ids) for ids in features["input_ids"])
        args = SFTConfig(
            **trl_common_args(config, tmp, "sft", longest),
            max_length=None,  # rows are already cut to config.max_length, keeping the completion
            completion_only_loss=True,
            use_liger_kernel=config.use_liger_kernel,
            train_sampling_strategy="group_by_length" if config.group_by_length else "random",
            dataset_kwargs={"skip_prepare_dataset": False},
        )
        recorder = LossRecorder()
        trainer = _trainer_class()(
            model=peft_model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[recorder.callback()],
        )
        counter = _CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        return run_trainer(
            trainer,
            recorder,
            method="sft",
            tmp_dir=tmp,
            final_dir=final_dir,
            tokenizer=tokenizer,
            train_rows=len(rows),
            tokens_per_epoch=tokens_per_epoch,
            setup_s=time.perf_counter() - t0,
            counted_tokens=lambda: counter.tokens,
        )
