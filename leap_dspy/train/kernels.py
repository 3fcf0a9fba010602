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


def _lora_forward(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor | None,
                  b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x W^T (+ bias) + (x A^T) B^T for 2-D x, and x A^T (what backward needs); no adapter when `a` is None."""
    y = x2 @ weight.t() if bias is None else torch.addmm(bias.to(weight.dtype), x2, weight.t())
    if a is None or b is None:
        return y, None
    h = x2 @ a.t()
    return y.addmm_(h, b.t()), h


def _lora_backward(ctx: Any, g: torch.Tensor, x2: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor,
                   a: torch.Tensor | None, b: torch.Tensor | None, want_x: bool) -> tuple[Any, Any, Any]:
    """The gradients of `_lora_forward` for x, A and B from the output's `g` (2-D, in the weights' dtype)."""
    if a is None or b is None or h is None:
        return (g @ weight if want_x else None), None, None
    gh = g @ b  # the gradient reaching x A^T
    gx = (g @ weight).addmm_(gh, a) if want_x else None
    grad_a = (gh.t() @ x2).to(ctx.param_dtypes[0])
    grad_b = (g.t() @ h).mul_(ctx.scaling).to(ctx.param_dtypes[1])
    return gx, grad_a, grad_b


def _adapter_in(ctx: Any, weight: torch.Tensor, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
                scaling: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A and the scaled B in the frozen base's dtype (the adapter's float32 master weights multiply in it)."""
    ctx.scaling = scaling
    if lora_a is None or lora_b is None:
        return None, None
    ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
    return lora_a.to(weight.dtype), (lora_b * scaling).to(weight.dtype)


class _LoraLinear(torch.autograd.Function):
    """y = x W^T (+ bias) + (x A^T)(s B)^T, with gradients for x, A and B (W and bias are frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        a, b = _adapter_in(ctx, weight, lora_a, lora_b, scaling)
        x2 = x.reshape(-1, x.shape[-1]).to(weight.dtype)
        y, h = _lora_forward(x2, weight, bias, a, b)
        ctx.save_for_backward(x2, h, weight, a, b)
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h, weight, a, b = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0]).to(weight.dtype)
        # no input gradient in the first layer, which reads the frozen embeddings
        gx, grad_a, grad_b = _lora_backward(ctx, g, x2, h, weight, a, b, ctx.needs_input_grad[0])
        gx = None if gx is None else gx.view(ctx.x_shape).to(ctx.x_dtype)
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


class _RMSNorm(torch.autograd.Function):
    """Llama's RMSNorm, `w * bf16(x / rms(x))`, keeping x and 1/rms for the backward where autograd keeps a
    float32 copy of x (twice the bytes, in every norm of every layer)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        dn = (grad * weight).to(torch.float32)
        normed = x.to(torch.float32) * rstd
        dx = (dn - normed * (dn * normed).mean(-1, keepdim=True)) * rstd
        return dx.to(x.dtype), None, None


class _GatedDown(torch.autograd.Function):
    """down(silu(gate) * up), a SwiGLU MLP's tail with its (LoRA) down projection: keeps gate and up, and
    recomputes silu(gate) and the product in the backward, where autograd keeps both (two more activations as
    wide as the MLP)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float) -> torch.Tensor:
        a, b = _adapter_in(ctx, weight, lora_a, lora_b, scaling)
        product = (torch.nn.functional.silu(gate) * up).reshape(-1, gate.shape[-1]).to(weight.dtype)
        y, h = _lora_forward(product, weight, bias, a, b)
        ctx.save_for_backward(gate, up, h, weight, a, b)
        return y.view(*gate.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up, h, weight, a, b = ctx.saved_tensors
        silu = torch.nn.functional.silu(gate)
        product = (silu * up).reshape(-1, gate.shape[-1]).to(weight.dtype)
        g = grad.reshape(-1, weight.shape[0]).to(weight.dtype)
        gp, grad_a, grad_b = _lora_backward(ctx, g, product, h, weight, a, b, True)
        gp = gp.view(gate.shape).to(gate.dtype)
        grad_gate = torch.ops.aten.silu_backward(gp * up, gate)
        return grad_gate, gp * silu, None, None, grad_a, grad_b, None


def _norm_forward(module: Any) -> tuple[Any, Any]:
    """`module`'s forward through `_RMSNorm` (its own while its weight trains), and the fused path alone."""
    original, eps = module.forward, float(getattr(module, "variance_epsilon", getattr(module, "eps", 0.0)))

    def fused(x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, module.weight, eps)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return original(x) if module.weight.requires_grad else fused(x)

    return forward, fused


def _down_parts(down: Any) -> tuple[Any, ...] | None:
    """(weight, bias, A, B, scale) of a frozen `nn.Linear` or plain LoRA on one, else None."""
    name = _plain_adapter(down)
    if name is not None:
        base = down.get_base_layer()
        return base.weight, base.bias, down.lora_A[name].weight, down.lora_B[name].weight, float(down.scaling[name])
    if type(down) is torch.nn.Linear and not down.weight.requires_grad and (
            down.bias is None or not down.bias.requires_grad):
        return down.weight, down.bias, None, None, 1.0
    return None


def _mlp_forward(module: Any) -> tuple[Any, Any]:
    """`module`'s forward through `_GatedDown` (its own while its down projection is not plain), and the fused
    path alone (None when it cannot run now)."""
    original = module.forward

    def fused(x: torch.Tensor, parts: tuple[Any, ...]) -> torch.Tensor:
        return _GatedDown.apply(module.gate_proj(x), module.up_proj(x), *parts)

    def forward(x: torch.Tensor) -> torch.Tensor:
        parts = _down_parts(module.down_proj)  # once a call: the adapter may be disabled (DPO's reference pass)
        return original(x) if parts is None else fused(x, parts)

    parts = _down_parts(module.down_proj)
    return forward, None if parts is None else (lambda x: fused(x, parts))


def _candidates(model: Any) -> Iterator[tuple[Any, tuple[Any, Any]]]:
    """(module, (forward, fused path)) for each module shaped like an RMSNorm or a gated MLP; `fused_layers`
    checks on a probe that the fused path computes what the module's own forward does before using it."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.nn.Parameter) and weight.dim() == 1
                and isinstance(getattr(module, "variance_epsilon", getattr(module, "eps", None)), float)):
            yield module, _norm_forward(module)
        elif all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) and _is_silu(
                getattr(module, "act_fn", None)):
            yield module, _mlp_forward(module)


def _is_silu(act: Any) -> bool:
    from transformers.activations import SiLUActivation

    return isinstance(act, torch.nn.SiLU | SiLUActivation)


def _same_on_a_probe(module: Any, fused: Any) -> bool:
    """Whether the fused path gives the module's own output on a random input (Gemma's norm scales by 1 + w,
    some MLPs mix their halves otherwise: those keep their forward)."""
    if fused is None:
        return False
    width = module.weight.shape[0] if hasattr(module, "weight") else module.gate_proj.in_features
    dtype = next(module.parameters()).dtype
    probe = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        expected, got = module.forward(probe), fused(probe)
    return expected.shape == got.shape and torch.allclose(expected.float(), got.float(), rtol=1e-3, atol=1e-3)


@contextlib.contextmanager
def fused_layers(model: Any, enabled: bool = True) -> Iterator[int]:
    """Within the block, the model's RMSNorms and SwiGLU MLPs train through `_RMSNorm` and `_GatedDown`, which
    keep fewer activations for the backward; yields how many modules. Outside it they are the model's own."""
    checked: dict[type, bool] = {}
    patched, previous = [], []
    for module, (forward, fused) in (_candidates(model) if enabled else ()):
        kind = type(module)
        if kind not in checked:  # one probe per class: its instances share the forward
            checked[kind] = _same_on_a_probe(module, fused)
        if checked[kind]:
            patched.append(module)
            previous.append(module.__dict__.get("forward"))
            module.forward = forward
    try:
        yield len(patched)
    finally:
        for module, forward in zip(patched, previous, strict=True):
            if forward is None:
                del module.forward
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
