"""The gated MLP (SwiGLU: ``down(silu(gate(x)) * up(x))``) keeping half the activations for the backward pass.

Autograd keeps four vocabulary-free but wide tensors per token in every decoder layer's MLP: ``gate(x)`` (for the
SiLU), ``silu(gate(x))`` and ``up(x)`` (for the product), and the product (the input of ``down``'s LoRA). On the
embedded model that is half of all the activations a step holds. Here only ``gate(x)`` and ``up(x)`` are kept;
``silu(gate(x))`` and the product are computed again from them in the backward pass: two elementwise ops, the same
numbers to the bit (the same ops on the same inputs), so what is learned does not change. The memory it frees lets
the hardware profile keep every layer's activations (no recompute of whole layers) on larger batches.

Applied to the layers whose activations are kept (a checkpointed layer keeps none); the hf engine only (Unsloth has
its own fused MLP).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


class SwiGLU(torch.autograd.Function):
    """``silu(g) * u``, keeping only ``g`` and ``u``; the backward is autograd's own for SiLU and the product."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * u, g), grad * F.silu(g)


def _forward(self, x):
    g, u = self.gate_proj(x), self.up_proj(x)
    product = SwiGLU.apply(g, u)
    if not torch.is_grad_enabled():
        return self.down_proj(product)
    storage = product.untyped_storage().data_ptr()

    def pack(t):  # the product, wherever down's layers keep it (a view of it included): a note to compute it again
        if t.untyped_storage().data_ptr() == storage:
            return ("product", g, u, t.shape, t.stride(), t.storage_offset())
        return t

    def unpack(packed):
        if isinstance(packed, tuple) and packed and packed[0] == "product":
            _, g_, u_, shape, stride, offset = packed
            with torch.no_grad():
                return (F.silu(g_) * u_).as_strided(shape, stride, offset)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return self.down_proj(product)


def is_swiglu(module) -> bool:
    act = getattr(module, "act_fn", None)
    return (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, torch.nn.SiLU) or getattr(act, "__name__", "") == "silu"
                 or type(act).__name__ == "SiLUActivation"))


def apply(model) -> int:
    """Lean MLPs in the decoder layers that keep their activations (not checkpointed); returns how many."""
    n = 0
    for layer in model.modules():
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not type(layer).__name__.endswith("DecoderLayer") or getattr(layer, "gradient_checkpointing", False):
            continue
        if is_swiglu(mlp):
            mlp.forward = types.MethodType(_forward, mlp)
            n += 1
    return n
