"""How a model being trained runs: LoRA linears and the completion loss each as one autograd function.

Both replace chains of operators that each make a pass over an activation-sized tensor (on a CPU, cold and
freshly allocated memory, which costs more than the arithmetic) with a few matmuls; the gradients are the same.

LoRA linears. PEFT computes `base(x) + lora_B(lora_A(x)) * scaling` as separate operators: the scale, the add and
their backward each write and read back an activation as large as the layer's output, and for a small model
those passes cost more than the frozen weights' matmuls. Here the scaled `B` is a matrix of r columns, so the
update accumulates into the base matmul's output (`addmm_`), and backward gets the input's gradient from one
matmul per weight with no elementwise pass. The parameters are PEFT's own: the optimizer, the saved adapter and
merging see no difference.

The loss. The vocabulary head's logits for every completion position, their log-softmax and its gradient are
each as wide as the vocabulary (49k for SmolLM2); computed a chunk of positions at a time, with the hidden
states' gradient taken in the forward since the head is frozen, none of them outlives its chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class _LoraLinear(torch.autograd.Function):
    """y = x W^T (+ bias) + (x A^T)(s B)^T, with gradients for x, A and B (W and bias are frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        dtype = weight.dtype  # the frozen base's: the adapter's float32 master weights multiply in it
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), (lora_b * scaling).to(dtype)
        h = x2 @ a.t()
        y = x2 @ weight.t() if bias is None else torch.addmm(bias.to(dtype), x2, weight.t())
        y.addmm_(h, b.t())
        ctx.save_for_backward(x2, h, weight, a, b)
        ctx.scaling, ctx.x_dtype, ctx.x_shape = scaling, x.dtype, x.shape
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h, weight, a, b = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0]).to(weight.dtype)
        gh = g @ b  # the gradient reaching x A^T
        gx = None
        if ctx.needs_input_grad[0]:  # not in the first layer, which reads the frozen embeddings
            gx = (g @ weight).addmm_(gh, a).view(ctx.x_shape).to(ctx.x_dtype)
        grad_a = (gh.t() @ x2).to(ctx.param_dtypes[0])
        grad_b = (g.t() @ h).mul_(ctx.scaling).to(ctx.param_dtypes[1])
        return gx, None, None, grad_a, grad_b, None


def _plain_adapter(module: Any) -> str | None:
    """The one active adapter's name when `module` is plain LoRA on a frozen `nn.Linear` without dropout (what
    the fused path computes), else None."""
    from peft.tuners.lora.layer import Linear

    if not isinstance(module, Linear) or module.merged or module.disable_adapters:
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1 or active[0] in module.lora_variant or getattr(module, "fan_in_fan_out", False):
        return None
    base = module.get_base_layer()
    plain = (type(base) is torch.nn.Linear and not base.weight.requires_grad and not hasattr(module, "_hf_hook")
             and (base.bias is None or not base.bias.requires_grad)
             and isinstance(module.lora_dropout[active[0]], torch.nn.Identity))
    return active[0] if plain else None


def _fused_forward(module: Any, original: Any) -> Any:
    """`module.forward` through `_LoraLinear` while the module stays plain LoRA, else `original`."""

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = None if args or kwargs else _plain_adapter(module)
        if name is None:  # mixed-adapter batches and anything changed since: PEFT's
            return original(x, *args, **kwargs)
        base = module.get_base_layer()
        return _LoraLinear.apply(x, base.weight, base.bias, module.lora_A[name].weight, module.lora_B[name].weight,
                                 float(module.scaling[name]))

    return forward


@contextlib.contextmanager
def fused_lora(model: Any, enabled: bool = True) -> Iterator[int]:
    """Within the block, the model's plain LoRA linears train through `_LoraLinear`; yields how many. Outside it
    (saving, merging, generating) they are PEFT's again."""
    patched = [m for m in model.modules() if enabled and _plain_adapter(m) is not None]
    previous = [module.__dict__.get("forward") for module in patched]
    for module in patched:
        module.forward = _fused_forward(module, module.forward)
    try:
        yield len(patched)
    finally:
        for module, forward in zip(patched, previous, strict=True):
            if forward is None:
                del module.forward  # the class's forward is back
            else:
                module.forward = forward


LOSS_CHUNK = 64
"""Completion positions whose vocabulary-wide logits exist at once in `linear_cross_entropy`."""


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i -log softmax(h_i W^T)[y_i] for a frozen head W, `LOSS_CHUNK` positions at a time. The gradient for h
    is computed in forward, chunk by chunk, so no vocabulary-wide tensor outlives its chunk."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], LOSS_CHUNK):
            logits = (hidden[start:start + LOSS_CHUNK] @ weight.t()).float()
            label = labels[start:start + LOSS_CHUNK]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, label[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax - one-hot: the logits' gradient
            probs[torch.arange(label.shape[0], device=label.device), label] -= 1
            grad[start:start + LOSS_CHUNK] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype), None, None


def linear_cross_entropy(hidden: torch.Tensor, head: Any, labels: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of `head(hidden)` against `labels`: through `_LinearCrossEntropy` for a frozen
    bias-free linear head, else plainly (a trained or adapted head needs its own gradient)."""
    weight = getattr(head, "weight", None)
    if (type(head) is torch.nn.Linear and head.bias is None and weight is not None and not weight.requires_grad
            and hidden.dtype == weight.dtype):
        return _LinearCrossEntropy.apply(hidden, weight, labels)
    return torch.nn.functional.cross_entropy(head(hidden).float(), labels, reduction="sum")
