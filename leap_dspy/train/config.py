"""Settings and results of one fine-tuning run, shared by the SFT, DPO and KTO backends.

Defaults suit a small model fine-tuned on a CPU (bench/train.py measures them; docs/results.md has the numbers):
LoRA r=16 on the attention and MLP projections, bf16 weights, no gradient checkpointing, batches of similar
length.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainConfig(BaseModel):
    """Hyper-parameters of a LoRA fine-tune.

    `learning_rate=None` picks the usual value per method: LoRA SFT of a small model on a few hundred rows
    needs 2e-3 to learn an agent's policy within an epoch or two, while DPO/KTO push a log-ratio against a
    frozen reference and diverge at that rate, so they get 5e-5.
    """

    model_config = ConfigDict(extra="forbid")

    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES), min_length=1)
    """The model's modules that get LoRA weights (Llama's names by default), or `["all-linear"]` as in PEFT;
    a compile checks them against the model before anything runs."""
    learning_rate: float | None = Field(None, ge=0)
    epochs: float = Field(2.0, gt=0)
    max_steps: int = -1
    """When > 0, overrides `epochs` (tests and benchmarks use it to bound the work)."""
    per_device_batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    """Eight rows per optimizer step, all at once where they fit `max_batch_tokens` (an agent step's rows): one
    forward of 8 rows trains about 1.2x as fast as two of 4 on a CPU, in about 1 GB more."""
    max_batch_tokens: int | None = Field(4096, ge=1)
    """The most padded tokens one forward and backward pass holds (the memory of long rows, WebShop's pages),
    counted in 16-bit activations: float32 keeps twice the bytes a token, so a float32 pass holds half as many.
    SFT runs a batch past it as a few passes of equal runs of rows with the batch's gradient, so one long row
    slows only its own batch; DPO and KTO halve the per-device batch (and double accumulation) until a batch of
    their longest rows fits. None: every batch in one pass."""
    max_length: int = Field(1024, ge=1)
    """Rows longer than this (prompt + completion tokens) are cut from the start of the prompt, never the
    completion, so what is trained is always the tail the model must produce."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """"auto": bfloat16 on CUDA or on a CPU with AVX512-BF16/AMX (much faster than float32 there), else float32."""
    gradient_checkpointing: bool = False
    """Off: it recomputes the forward, and a small model's activations fit in RAM."""
    attn_implementation: str | None = "auto"
    """"auto": sdpa on a CPU (as fast as eager or faster, and eager keeps length² scores per row for the backward);
    the model's own (sdpa/flash) on CUDA. None keeps the model's."""
    torch_compile: bool = False
    """Compile the backbone (torch.compile): on a GPU a small model's step is mostly short kernels (LoRA, norms,
    rotary) that compilation fuses; the first steps pay for compiling, so it pays off on long runs only."""
    use_liger_kernel: bool = False
    """SFT only: TRL's Liger kernels (fused RMSNorm, SwiGLU, rotary; `pip install liger-kernel`, CUDA only)."""
    fused_lora: bool = True
    """Train plain LoRA linears through one autograd function (`kernels.py`): the same gradients without the
    activation-sized scale and add passes of PEFT's separate operators. Off: PEFT's own forward."""
    fused_layers: bool = True
    """Train RMSNorms and SwiGLU MLPs through autograd functions (`kernels.py`) that keep x rather than a float32
    copy, and gate and up rather than also silu(gate) and the product: the same gradients in about a third less
    activation memory. A module whose forward a probe finds different (Gemma's norm) keeps its own; off under
    `use_liger_kernel`, whose Triton kernels fuse the same layers on a GPU."""
    fused_loss: bool = True
    """SFT: the LM head and cross-entropy over the completion positions a chunk at a time, the gradient for the
    hidden states computed in the forward (`kernels.linear_cross_entropy`): no vocabulary-wide logits kept for
    the backward. Off: the head, then `F.cross_entropy`."""
    group_by_length: bool = True
    """Batch rows of similar length together, so little of each batch is padding."""
    share_prompt: bool = True
    """SFT: run the prompt head that every row of a batch shares (an agent's system turn) once per batch, its keys
    and values broadcast to the rows: the same loss and gradients for less compute. Off under gradient
    checkpointing and `torch_compile`, which replay or trace one forward per step, and under FSDP, which gathers
    a layer's shards around one forward."""
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: str = "linear"
    seed: int = 0
    beta: float = 0.1
    """DPO/KTO temperature of the implicit reward (higher = stay closer to the reference)."""
    logging_steps: int = Field(1, ge=1)
    num_threads: int | None = Field(None, ge=1)
    """torch threads while training; None = leave torch's setting (on CPU: one per core)."""
    progress_bar: bool = True
    report_to: list[str] = Field(default_factory=list)
    """Trackers TRL sends the training curves to (tensorboard, mlflow, wandb); none by default."""

    @property
    def shares_prompt(self) -> bool:
        return self.share_prompt and not (self.gradient_checkpointing or self.torch_compile)

    def lr_for(self, method: str) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-3 if method == "sft" else 5e-5


class TrainResult(BaseModel):
    """What a training run produced and how fast it went."""

    method: str
    adapter_dir: str
    learning_rate: float | None = None
    """The peak rate the scheduler used (None in results written before it was recorded)."""
    train_rows: int
    train_tokens: int
    """Non-padding tokens through the model (prompt + completion, each epoch; DPO counts both branches)."""
    steps: int
    wall_s: float
    """Time inside the optimisation loop (model loading and tokenisation excluded)."""
    tokens_per_s: float
    final_loss: float | None
    loss_history: list[float]
    peak_rss_mb: float
    """Peak resident memory of the whole process so far (getrusage), not of this run alone."""
    host_rss_mb: float | None = None
    """Resident memory of the compile beside a fine-tune launched as its own process (None: it ran inside the
    compile): the two together are what the machine held."""
    setup_s: float = 0.0
