"""Supervised fine-tuning (behaviour cloning of expert/corrected steps) with TRL's SFTTrainer + LoRA.

Rows are tokenised here (see `data.py`) rather than by TRL so that the prompt ids are, by construction, the ids
the inference engine feeds the model. The loss is computed on completion tokens only, and the LM head is applied
only at those positions: on CPU, TRL's fused head scores every position, and with prompts much longer than
their completions the vocabulary projection would otherwise spend a large share of each step on logits nobody
uses. For the same reason the prompt head every row of a batch shares (the system turn) runs once per batch
(`TrainConfig.share_prompt`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from leap_dspy.cores import trainer_callbacks
from leap_dspy.train.common import (
    LossRecorder,
    atomic_output_dir,
    load_trainable_model,
    pass_budget,
    quiet_libraries,
    run_trainer,
    torch_threads,
    trl_common_args,
)
from leap_dspy.train.config import TrainConfig, TrainResult
from leap_dspy.train.data import check_rows, sft_features


def shared_prompt_len(inputs: Mapping[str, Any], smallest: int = 16) -> int:
    """How many leading tokens every row of the batch shares before its first trained token: the prompts' common
    head (an agent's system turn), which `completion_only_loss` then computes once, not once per row. 0 when
    fewer than `smallest`, or when the batch is packed (several rows to a sequence)."""
    import torch

    ids, labels = inputs["input_ids"], inputs["labels"]
    if ids.shape[0] < 2 or inputs.get("position_ids") is not None:
        return 0
    mask = inputs.get("attention_mask")
    same = (ids == ids[:1]) if mask is None else (ids == ids[:1]) & mask.bool() & mask[:1].bool()
    common = int(same.long().cumprod(dim=1).sum(dim=1).min())
    trained = labels != -100
    first = torch.where(trained.any(dim=1), trained.long().argmax(dim=1), labels.shape[1])
    # The token before the first trained one predicts it: its hidden state must come from the shared pass too.
    length = min(common, int(first.min()) - 1)
    return length if length >= smallest else 0


def _hidden_after_shared_prompt(backbone: Any, inputs: Mapping[str, Any], shared: int) -> Any:
    """The backbone's last hidden states at positions `shared:`, the first `shared` tokens run once at batch 1
    and their keys and values broadcast over the batch: the same attention inputs as the full batch (causal
    attention never looks forward), and backward sums each row's gradient into the one shared pass."""
    import torch
    from transformers import DynamicCache

    ids = inputs["input_ids"]
    batch, length = ids.shape
    cache = DynamicCache(config=backbone.config)
    backbone(input_ids=ids[:1, :shared], cache=cache, use_cache=True)
    for layer in cache.layers:
        layer.keys = layer.keys.expand(batch, -1, -1, -1)
        layer.values = layer.values.expand(batch, -1, -1, -1)
    mask = inputs.get("attention_mask")
    positions = torch.arange(shared, length, device=ids.device).expand(batch, -1)
    out = backbone(input_ids=ids[:, shared:], attention_mask=mask, position_ids=positions, cache=cache,
                   use_cache=True)
    return out.last_hidden_state


def completion_only_loss(model: Any, inputs: Mapping[str, Any], num_items_in_batch: Any = None,
                         share_prompt: bool = False, fused: bool = False) -> Any:
    """Mean next-token cross-entropy over positions whose label is not -100, projecting only those positions
    through the LM head. `model` is the (PEFT-wrapped) causal LM; the LoRA layers live inside its backbone.
    `share_prompt` computes the rows' common prompt head once per batch (`shared_prompt_len`); `fused` computes
    the head and the loss a chunk of positions at a time (`kernels.linear_cross_entropy`)."""
    import torch
    import torch.nn.functional as F

    from leap_dspy.train.kernels import linear_cross_entropy

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    labels = inputs["labels"]
    shared = shared_prompt_len(inputs) if share_prompt else 0
    if shared:
        hidden = _hidden_after_shared_prompt(backbone, inputs, shared)
    else:
        hidden = backbone(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
            use_cache=False,
        ).last_hidden_state
    shift_labels = labels[:, shared + 1:]
    mask = shift_labels != -100
    hidden = hidden[:, :-1][mask]
    head = causal_lm.get_output_embeddings()
    if fused:
        loss_sum = linear_cross_entropy(hidden, head, shift_labels[mask])
    else:
        loss_sum = F.cross_entropy(head(hidden).float(), shift_labels[mask], reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum()
    return loss_sum / torch.as_tensor(denom, device=loss_sum.device).clamp(min=1)


def row_chunks(inputs: Mapping[str, Any], max_tokens: int | None) -> list[dict[str, Any]]:
    """The batch cut into as few equal runs of rows as keep each under `max_tokens` padded tokens (the memory of
    one forward and backward); the batch whole when it fits or when there is no bound."""
    ids = inputs["input_ids"]
    rows, width = ids.shape
    if not max_tokens or rows * width <= max_tokens:
        return [dict(inputs)]
    parts = math.ceil(rows / max(1, max_tokens // width))  # the fewest runs of at most that many rows
    size = math.ceil(rows / parts)
    return [{k: v[start:start + size] if hasattr(v, "shape") and v.shape[:1] == (rows,) else v
             for k, v in inputs.items()} for start in range(0, rows, size)]


def _trainer_class(share_prompt: bool, fused_loss: bool, max_batch_tokens: int | None = None) -> type:
    from trl import SFTTrainer

    class CompletionOnlySFTTrainer(SFTTrainer):
        """SFTTrainer whose loss projects only completion positions through the LM head, and which runs a batch
        of long rows as several forward and backward passes (`row_chunks`)."""

        def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
            parts = row_chunks(inputs, max_batch_tokens)
            if len(parts) == 1:
                return super().training_step(model, inputs, num_items_in_batch)
            if num_items_in_batch is None:  # each part's loss is then a share of the whole batch's mean
                num_items_in_batch = (inputs["labels"][:, 1:] != -100).sum()
            return sum(super(CompletionOnlySFTTrainer, self).training_step(model, part, num_items_in_batch)
                       for part in parts)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            if return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # FSDP gathers a layer's shards around one forward: the shared pass would be a second.
            share = share_prompt and not self.is_fsdp_enabled
            loss = completion_only_loss(self.accelerator.unwrap_model(model), inputs, num_items_in_batch, share,
                                        fused_loss)
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
        dataset = Dataset.from_dict(features)
        tokens_per_epoch = sum(len(ids) for ids in features["input_ids"])
        args = SFTConfig(
            **trl_common_args(config, tmp, "sft", None),  # the trainer cuts batches of long rows itself
            max_length=None,  # rows are already cut to config.max_length, keeping the completion
            completion_only_loss=True,
            use_liger_kernel=config.use_liger_kernel,
            train_sampling_strategy="group_by_length" if config.group_by_length else "random",
            dataset_kwargs={"skip_prepare_dataset": False},
        )
        recorder = LossRecorder()
        bound = pass_budget(config, peft_model)
        trainer = _trainer_class(config.shares_prompt, config.fused_loss, bound)(
            model=peft_model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[recorder.callback(), *trainer_callbacks(config.num_threads)],
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
            kernels=config,
        )
