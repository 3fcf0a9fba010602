"""Plumbing shared by the trainers: model + LoRA set-up, TRL arguments for CPU, atomic adapter saving,
loss/throughput bookkeeping.

Why atomic: each LEAP iteration continues from the previous iteration's adapter and a resumed run trusts
whatever sits at `iter_<k>/adapter/`. Training writes into `<output_dir>.tmp` and renames it into place only
when the adapter is complete, so a killed or failed run never leaves a half adapter where a resume would look.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from leap_dspy.train.config import TrainConfig, TrainResult

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident memory of this program in MB: Linux's VmHWM, which starts afresh at exec, where ru_maxrss
    would carry the launching compile's own peak into a launched trainer (ru_maxrss: KiB on Linux, bytes on
    macOS)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def machine_memory_mb() -> float:
    """The memory this process's machine (or its container's cgroup limit, where lower) has, in MB."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):  # cgroup v2 writes "max" where there is no limit
        total = min(total, int(Path("/sys/fs/cgroup/memory.max").read_text()))
    return total / 2**20


def rss_mb() -> float:
    """Resident memory of this process now, in MB (0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_trainable_model(
    model: str, config: TrainConfig, init_adapter: str | os.PathLike[str] | None = None
) -> tuple[Any, Any]:
    """The base model in the training dtype with a trainable LoRA adapter, and its tokenizer.

    With `init_adapter`, the saved adapter is loaded trainable and its own LoRA shape (r, alpha, targets) is kept:
    LEAP iteration k continues from iteration k-1's weights. Otherwise a fresh adapter is made from `config`.
    LoRA weights stay float32 (PEFT upcasts adapters) while the frozen base runs in bf16: the optimizer then
    updates float32 weights, and the bf16 matmuls of the base carry most of the compute.
    """
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from leap_dspy.lm.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model)
    base = load_model(model, dtype=config.dtype)
    base.config.use_cache = False
    attn = config.attn_implementation
    if attn == "auto":  # on a CPU sdpa trains as fast as eager or faster, in less memory (docs/results.md)
        attn = None if torch.cuda.is_available() else "sdpa"
    if attn:
        base.set_attn_implementation(attn)
    if init_adapter is not None:
        adapter_path = Path(init_adapter)
        if not (adapter_path / "adapter_config.json").exists():
            raise FileNotFoundError(f"init_adapter {adapter_path} has no adapter_config.json")
        peft_model = PeftModel.from_pretrained(base, str(adapter_path), is_trainable=True)
    else:
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=lora_targets(config),
            bias="none",
            task_type="CAUSAL_LM",
        )
        # LoRA's A matrices start random: drawn from a generator seeded by the config, not from whatever state
        # the process's global one is in (rollouts sample from it), so a rerun of a seed starts from the same adapter.
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            torch.manual_seed(config.seed)
            peft_model = get_peft_model(base, lora)
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if config.gradient_checkpointing:
        peft_model.enable_input_require_grads()
    if config.torch_compile:
        # In place, so the state dict keeps its names and the saved adapter is the same either way.
        getattr(base, base.base_model_prefix).compile(dynamic=True)
    return peft_model, tokenizer


class TargetModulesNotFound(ValueError):
    """`train.target_modules` names a module the student's model lacks."""


def lora_targets(config: TrainConfig) -> str | list[str]:
    """PEFT's `target_modules`: its own shorthand `all-linear` passes as a string, as PEFT takes it."""
    return "all-linear" if config.target_modules == ["all-linear"] else list(config.target_modules)


def check_target_modules(model: str, config: TrainConfig) -> None:
    """Refuse, before anything runs, LoRA targets the model lacks: PEFT fails only in the first fine-tune, and
    only when no name matches, so a misspelt one among several would silently train without it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from leap_dspy.lm.models import resolve_model

    if lora_targets(config) == "all-linear":
        return
    # Resolved first: on a fresh machine resolving converts or builds real weights, which the meta device would
    # leave empty.
    model_config = AutoConfig.from_pretrained(str(resolve_model(model)))
    with torch.device("meta"):  # the module tree without the weights
        built = AutoModelForCausalLM.from_config(model_config)
    names = [name for name, _ in built.named_modules()]
    missing = [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in built.named_modules() if isinstance(m, torch.nn.Linear)})
        raise TargetModulesNotFound(f"train.target_modules {', '.join(missing)}: no such module in {model} (its "
                                    f"linear layers: {', '.join(linear)}; or all-linear)")


def activation_cost(model: Any) -> int:
    """How many 16-bit tokens' activation memory one token of `model`'s training keeps: `max_batch_tokens` counts
    16-bit tokens, so a float32 pass holds half as many tokens in the memory the bound means."""
    return max(1, model.get_base_model().dtype.itemsize // 2)  # the base's dtype: PEFT keeps LoRA in float32


def pass_budget(config: TrainConfig, model: Any = None) -> int | None:
    """`config.max_batch_tokens` in `model`'s own tokens (the one home of the float32 rule); no model: as set."""
    if not config.max_batch_tokens or model is None:
        return config.max_batch_tokens
    return max(1, config.max_batch_tokens // activation_cost(model))


def fit_batch(config: TrainConfig, longest: int | None, smallest: int = 1, model: Any = None) -> tuple[int, int]:
    """(per-device batch, accumulation steps) for rows up to `longest` tokens, under `pass_budget`, never below
    `smallest` rows a batch; None: the configured ones (a trainer that cuts long batches itself)."""
    batch, accumulation = config.per_device_batch_size, config.gradient_accumulation
    budget = pass_budget(config, model)
    if budget and longest:
        while batch // 2 >= smallest and batch % 2 == 0 and batch * longest > budget:
            batch, accumulation = batch // 2, accumulation * 2
    return batch, accumulation


def trl_common_args(config: TrainConfig, output_dir: Path, method: str, longest: int | None, smallest_batch: int = 1,
                    model: Any = None) -> dict[str, Any]:
    """Keyword arguments every TRL config gets here.

    TRL 1.16 defaults to bf16 autocast and gradient checkpointing; on CPU both are slower than casting the model
    itself to bf16 (done in `load_trainable_model`), so both are off unless asked for. No checkpoints (the
    adapter is saved once, atomically), no reporting, no dataloader workers (every core is busy computing).
    """
    import torch

    on_cuda = torch.cuda.is_available()
    batch, accumulation = fit_batch(config, longest, smallest_batch, model)
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=config.lr_for(method),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to=list(config.report_to) or "none",
        bf16=False,
        fp16=False,
        activation_checkpointing=config.gradient_checkpointing,
        dataloader_num_workers=0,
        dataloader_pin_memory=on_cuda,
        seed=config.seed,
        data_seed=config.seed,
        disable_tqdm=not config.progress_bar,
        use_cpu=not on_cuda,
    )


class LossRecorder:
    """A TrainerCallback (duck-typed to avoid importing transformers at module import) that keeps the logged
    losses and times the optimisation loop."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.started: float | None = None
        self.ended: float | None = None

    def callback(self) -> Any:
        from transformers import TrainerCallback

        recorder = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                recorder.started = time.perf_counter()

            def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                recorder.ended = time.perf_counter()

            def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
                if logs and "loss" in logs:
                    recorder.losses.append(float(logs["loss"]))

        return _Callback()

    @property
    def wall_s(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or time.perf_counter()) - self.started


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    import torch

    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def quiet_libraries(keep_progress_bar: bool) -> Iterator[None]:
    """Silence datasets' map/filter bars and transformers/TRL info chatter; the Trainer's own bar stays."""
    import datasets
    import transformers

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    trl_logger = logging.getLogger("trl")
    trl_level = trl_logger.level
    trl_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # deprecation notices from transformers/TRL internals, not actionable by callers
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
        transformers.logging.set_verbosity(previous)
        trl_logger.setLevel(trl_level)


def is_main_process() -> bool:
    """Rank 0 of an `accelerate launch` (or torchrun) job, or a process started on its own."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield `<output_dir>.tmp` to write into; on success replace `output_dir` by it, on failure delete it.

    An existing adapter at `output_dir` survives a failed run untouched. In a distributed fine-tune only the
    main process publishes; the others write into a scratch folder of their own, deleted at the end.
    """
    final = Path(output_dir)
    if not is_main_process():
        scratch = final.with_name(f"{final.name}.rank{os.environ.get('RANK')}")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


RESULT_FILE = "train_result.json"
"""The fine-tune's `TrainResult`, inside the adapter folder."""


def save_adapter(model: Any, tokenizer: Any, directory: Path) -> None:
    """Adapter weights + config only (a few MB), plus the tokenizer so the folder is self-describing.

    Trainer scratch files (runs/, checkpoint-*) are removed so the folder holds the adapter alone."""
    for child in directory.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


@contextlib.contextmanager
def adapters_in_base_dtype(model: Any) -> Iterator[None]:
    """Run the float32 LoRA layers' matmuls in the frozen base's bf16/fp16, keeping float32 master weights.

    PEFT casts each LoRA layer's input up to the adapter's float32, so every adapted projection copies its
    activations and multiplies in float32, which on a bf16-capable CPU is much slower than bf16 and makes each
    training step slower. The optimizer still updates float32 weights.
    """
    import torch
    from peft.helpers import disable_input_dtype_casting

    dtype = next((p.dtype for p in model.parameters() if not p.requires_grad), torch.float32)
    if dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    device = next(model.parameters()).device.type
    # No cast cache: autocast keeps the bf16 copy of a weight until its context exits, and this context spans
    # the whole training loop, so cached copies would hide every optimizer update from later forwards.
    with torch.autocast(device, dtype=dtype, cache_enabled=False), disable_input_dtype_casting(model):
        yield


def _no_part_warmup(trainer: Any) -> None:
    """No warmup where a warmup ratio comes to under one step. Transformers rounds it up to a whole step, and a
    warmup's first step runs at a learning rate of 0: a fine-tune of under 1/ratio steps (a small round) wasted
    its first step, and one of a single step trained nothing. Longer fine-tunes keep transformers' rounding."""
    ratio, create = float(trainer.args.warmup_steps), trainer.create_scheduler
    if not 0 < ratio <= 1:
        return

    def create_scheduler(num_training_steps: int, optimizer: Any = None) -> Any:
        if ratio == 1 or num_training_steps * ratio < 1:  # (transformers reads 1.0 as one step)
            trainer.args.warmup_steps = num_training_steps if ratio == 1 else 0
        return create(num_training_steps=num_training_steps, optimizer=optimizer)

    trainer.create_scheduler = create_scheduler


def run_trainer(
    trainer: Any,
    recorder: LossRecorder,
    *,
    method: str,
    tmp_dir: Path,
    final_dir: Path,
    tokenizer: Any,
    train_rows: int,
    tokens_per_epoch: int,
    setup_s: float,
    counted_tokens: Any = None,
    kernels: TrainConfig | None = None,
) -> TrainResult:
    """Train, save the adapter into `tmp_dir` and report; the caller's `atomic_output_dir` publishes it.
    `kernels`: the config whose `fused_lora` and `fused_layers` say which of `kernels.py`'s functions train."""
    from leap_dspy.lm.kernels import attention_kernels
    from leap_dspy.train.kernels import fused_layers, fused_lora

    kernels = kernels or TrainConfig()
    device, model = next(trainer.model.parameters()).device.type, trainer.model
    _no_part_warmup(trainer)
    with (adapters_in_base_dtype(model), attention_kernels(device), fused_lora(model, kernels.fused_lora),
          fused_layers(model, kernels.fused_layers and not kernels.use_liger_kernel)):  # Liger fuses its own
        output = trainer.train()
    steps = int(output.global_step)
    epochs_done = float(trainer.state.epoch or 0.0)
    save_adapter(trainer.model, tokenizer, tmp_dir)
    wall = recorder.wall_s
    # Exact count where the caller's collator counted real tokens; else rows seen x mean row length
    tokens = int(counted_tokens()) if counted_tokens is not None else int(round(tokens_per_epoch * epochs_done))
    result = TrainResult(
        method=method,
        adapter_dir=str(final_dir),
        learning_rate=float(trainer.args.learning_rate),
        train_rows=train_rows,
        train_tokens=tokens,
        steps=steps,
        wall_s=round(wall, 3),
        tokens_per_s=round(tokens / wall, 2) if wall > 0 else 0.0,
        final_loss=recorder.losses[-1] if recorder.losses else None,
        loss_history=recorder.losses,
        peak_rss_mb=round(peak_rss_mb(), 1),
        setup_s=round(setup_s, 3),
    )
    # Published with the adapter, atomically: a kill right after publishing must not lose the result.
    (tmp_dir / RESULT_FILE).write_text(result.model_dump_json(indent=2))
    return result


M_ARENA_MAX = -8  # glibc's mallopt parameter, as MALLOC_ARENA_MAX sets it


def cap_heaps(arenas: int = 2) -> None:
    """Let glibc keep at most `arenas` heaps, as `MALLOC_ARENA_MAX` would: each of an evaluation's 64 episode
    threads otherwise gets a heap of its own (up to 8 per core), each keeping the peak of what was freed in it.
    Only before the process has started threads: glibc fixes the limit when it first needs more than 8 heaps.
    An environment that sets `MALLOC_ARENA_MAX` keeps its own."""
    import ctypes

    if "MALLOC_ARENA_MAX" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its own allocator
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas)


def release_memory() -> None:
    """Hand the trainer's freed memory back to the system: without it the process keeps the peak of every
    training round (glibc holds freed heap), and rollouts that follow run with gigabytes less."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a launched trainer needs the GPU memory too
        torch.cuda.empty_cache()


