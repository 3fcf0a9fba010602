"""Preference fine-tuning of the LoRA student: DPO on (chosen, rejected) pairs and KTO on unpaired
desirable/undesirable completions, through TRL's DPOTrainer/KTOTrainer.

The reference policy is the policy training starts from: with `init_adapter`, TRL (ref_model=None with a PEFT
model) adds a frozen copy of that adapter, named "ref", and computes reference log-probs through it, so each
LEAP round is a step of iterative DPO/KTO away from the student's last policy (tests/test_train.py checks that
the first step's DPO loss is log 2: policy and reference agree). Without one, the adapter is fresh and the
reference is the base model.

Rows are handed to TRL as plain strings already rendered by the chat template (`data.prompt_text` and
`data.completion_text`), so the prompt the model is trained on is exactly the inference prompt, and TRL's own
tokenisation (prompt, then prompt + completion split at their common prefix) sees the same text as SFT does.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from leap_dspy.cores import trainer_callbacks
from leap_dspy.train.common import (
    LossRecorder,
    atomic_output_dir,
    load_trainable_model,
    quiet_libraries,
    run_trainer,
    torch_threads,
    trl_common_args,
)
from leap_dspy.train.config import TrainConfig, TrainResult
from leap_dspy.train.data import as_messages, check_rows, completion_text, prompt_text

PREFERENCE_TOKEN_COST = 2
"""A preference row's tokens count this many times an SFT row's against `max_batch_tokens`: DPO and KTO keep
every completion position's vocabulary-wide logits and run a reference pass too, where SFT's chunked loss keeps
no logits. At 2 they keep the batches they were measured at when SFT's bound was 2,048."""


def _pass_length(longest: int) -> int:
    """The tokens a batch row of length `longest` counts against `max_batch_tokens`: each row runs twice a batch
    (DPO: chosen and rejected; KTO: its own completion and another's as the KL term)."""
    return 2 * longest * PREFERENCE_TOKEN_COST


def _render(
    tokenizer: Any, prompt: Any, completions: Sequence[Any], max_length: int | None
) -> tuple[str, list[str], int, int]:
    """(prompt string, completion strings, tokens of prompt + all completions, tokens of prompt + the longest
    completion); the prompt is cut from its start when the last exceeds `max_length`."""
    messages = as_messages(prompt, "prompt")
    head = prompt_text(tokenizer, messages)
    tails = [completion_text(tokenizer, messages, as_messages(c, "completion")) for c in completions]
    p_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    c_lens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in tails]
    if max_length is not None and len(p_ids) + max(c_lens) > max_length:
        keep = max(max_length - max(c_lens), 1)
        p_ids = p_ids[-keep:]
        head = tokenizer.decode(p_ids)
    return head, tails, len(p_ids) * len(tails) + sum(c_lens), len(p_ids) + max(c_lens)


@contextlib.contextmanager
def _completions_scored_alone() -> Iterator[None]:
    """TRL's fused LM head scores only the completion positions on Triton devices and every position elsewhere
    (on Neuron a new tile shape per batch would recompile). Eager on a CPU nothing recompiles, and a row's prompt
    is most of its positions: there too the head runs over the completions alone, with the same log-probs."""
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:  # another TRL: its own choice stands
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def _fit(trainer_class: Any, method: str, peft_model: Any, tokenizer: Any, args: Any, columns: dict[str, list[Any]],
         tmp: Path, final_dir: Path, train_rows: int, tokens: int, t0: float, config: TrainConfig) -> TrainResult:
    """Run TRL's `trainer_class` over the rendered columns; ref_model=None: see the module docstring."""
    from datasets import Dataset

    recorder = LossRecorder()
    callbacks = [recorder.callback(), *trainer_callbacks(config.num_threads)]
    trainer = trainer_class(model=peft_model, ref_model=None, args=args, train_dataset=Dataset.from_dict(columns),
                            processing_class=tokenizer, callbacks=callbacks)
    with _completions_scored_alone():
        return run_trainer(trainer, recorder, method=method, tmp_dir=tmp, final_dir=final_dir, tokenizer=tokenizer,
                           train_rows=train_rows, tokens_per_epoch=tokens, setup_s=time.perf_counter() - t0,
                           kernels=config)


def train_dpo(
    rows: Sequence[Mapping[str, Any]],
    *,
    model: str,
    output_dir: str | os.PathLike[str],
    init_adapter: str | os.PathLike[str] | None = None,
    config: TrainConfig | None = None,
) -> TrainResult:
    """DPO on `{"prompt": [...], "chosen": [assistant msg], "rejected": [assistant msg]}` rows; saves the adapter
    (only) at output_dir, atomically. `config.beta` is DPO's beta.

    When any row has `"anchor": True` (chosen == rejected: a step known to be right, see
    `training_data.preference_rows`), the loss is DPO's sigmoid plus TRL's "sft" term, the NLL of every chosen
    completion in the batch, which is what trains the anchors.
    """
    from trl import DPOConfig, DPOTrainer

    config = config or TrainConfig()
    check_rows(rows, ("prompt", "chosen", "rejected"), "dpo")
    t0 = time.perf_counter()
    final_dir = Path(output_dir)
    with torch_threads(config.num_threads), quiet_libraries(config.progress_bar), atomic_output_dir(final_dir) as tmp:
        peft_model, tokenizer = load_trainable_model(model, config, init_adapter)
        columns: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
        tokens = longest = 0
        for row in rows:
            head, (chosen, rejected), n, length = _render(tokenizer, row["prompt"], [row["chosen"], row["rejected"]],
                                                           config.max_length)
            longest = max(longest, length)
            columns["prompt"].append(head)
            columns["chosen"].append(chosen)
            columns["rejected"].append(rejected)
            tokens += n
        args = DPOConfig(
            **trl_common_args(config, tmp, "dpo", _pass_length(longest), model=peft_model),
            beta=config.beta,
            max_length=None,  # rows were cut to config.max_length above, keeping the completions
            precompute_ref_log_probs=False,
            loss_type=["sigmoid", "sft"] if any(row.get("anchor") for row in rows) else ["sigmoid"],
        )
        return _fit(DPOTrainer, "dpo", peft_model, tokenizer, args, columns, tmp, final_dir, len(rows), tokens, t0,
                    config)


def train_kto(
    rows: Sequence[Mapping[str, Any]],
    *,
    model: str,
    output_dir: str | os.PathLike[str],
    init_adapter: str | os.PathLike[str] | None = None,
    config: TrainConfig | None = None,
) -> TrainResult:
    """KTO on `{"prompt": [...], "completion": [assistant msg], "label": bool}` rows (True = desirable).

    KTO compares each completion with a KL baseline estimated from mismatched pairs in the same batch, and needs
    both desirable and undesirable examples; rows are shuffled once (seeded) so that every batch mixes both
    kinds, since TRL's KTO samples sequentially.
    """
    from trl import KTOConfig, KTOTrainer

    config = config or TrainConfig()
    check_rows(rows, ("prompt", "completion", "label"), "kto")
    desirable = sum(1 for r in rows if bool(r["label"]))
    if desirable == 0 or desirable == len(rows):
        kind = "undesirable (label=False)" if desirable else "desirable (label=True)"
        raise ValueError(
            f"kto: all {len(rows)} rows have label={bool(desirable)}; KTO needs at least one {kind} example too "
            "(use train_sft for positive-only data)"
        )
    if len(rows) < 2:
        raise ValueError("kto: needs at least 2 rows (the KL baseline pairs rows within a batch)")
    order = list(range(len(rows)))
    random.Random(config.seed).shuffle(order)
    t0 = time.perf_counter()
    final_dir = Path(output_dir)
    with torch_threads(config.num_threads), quiet_libraries(config.progress_bar), atomic_output_dir(final_dir) as tmp:
        peft_model, tokenizer = load_trainable_model(model, config, init_adapter)
        columns: dict[str, list[Any]] = {"prompt": [], "completion": [], "label": []}
        tokens = longest = 0
        for i in order:
            row = rows[i]
            head, (completion,), n, length = _render(tokenizer, row["prompt"], [row["completion"]], config.max_length)
            longest = max(longest, length)
            columns["prompt"].append(head)
            columns["completion"].append(completion)
            columns["label"].append(bool(row["label"]))
            tokens += 2 * n  # each row also runs once as another row's KL (mismatched) completion
        undesirable = len(rows) - desirable
        # The KL term pairs rows within a batch, so a batch needs two.
        common = trl_common_args(config, tmp, "kto", _pass_length(longest), smallest_batch=2,
                                 model=peft_model)
        common["per_device_train_batch_size"] = max(2, min(common["per_device_train_batch_size"], len(rows)))
        args = KTOConfig(
            **common,
            beta=config.beta,
            max_length=None,
            precompute_ref_log_probs=False,
            # weight the rarer kind up so both contribute equally (KTO paper's recommended ratio range)
            desirable_weight=max(1.0, undesirable / desirable),
            undesirable_weight=max(1.0, desirable / undesirable),
        )
        return _fit(KTOTrainer, "kto", peft_model, tokenizer, args, columns, tmp, final_dir, len(rows), tokens, t0,
                    config)
