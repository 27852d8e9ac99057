"""The decoder layers that keep their activations keep fewer of them, and compute the rest again when needed.

Autograd keeps, per token and per decoder layer, every tensor some backward formula reads. On the embedded model
(fp32, LoRA on every linear layer) that is about 8,000 numbers a token a layer; here about 5,900, in three ways:

- **The gated MLP** (SwiGLU: ``down(silu(gate(x)) * up(x))``) keeps ``gate(x)`` and ``up(x)`` only; ``silu(gate(x))``
  and the product (the input of ``down``'s LoRA) are computed again from them in the backward pass.
- **The RMSNorms' outputs** (the inputs of the q/k/v and gate/up LoRAs) are not kept: the norm keeps its input
  anyway (its own backward reads it), and the output is computed again from it.
- **Attention on the key/value heads** (grouped-query attention): SDPA gets the 3 key/value heads of the embedded
  model with ``enable_gqa`` instead of copies repeated to its 9 query heads, so it keeps 3 of each, not 9
  (transformers repeats them whenever there is a padding mask; CPU only, where PyTorch's flash kernel takes both).
  The padding mask goes in as one additive float mask shared by every layer, not converted (and kept) per layer.

And the LM head with the loss (``head_loss``) keeps no logits at all: the answer positions' logits are made a few
hundred rows at a time, and each chunk's loss and gradient with respect to the hidden states are computed at once;
the backward pass only scales that gradient. A 49k-vocabulary row costs 200 KB, and its log-softmax and gradient as
much again each.

The MLP and the norms recompute with the same ops on the same inputs: the same numbers to the bit, so the loss and every
gradient are unchanged. Attention on the key/value heads gives the same outputs; the key/value gradients are summed
in another order (about 1e-6 apart), as are the chunked head's. The memory freed lets the hardware profile keep every layer's activations (no
recompute of whole layers) on larger batches.

Applied to the layers whose activations are kept (a checkpointed layer keeps none); the hf engine only (Unsloth
has its own fused kernels).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from opensem import onednn

ATTENTION = "opensem_sdpa_gqa"


# the gated MLP --------------------------------------------------------------------------------------------------
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


def _mlp_forward(self, x):
    g, u = self.gate_proj(x), self.up_proj(x)
    product = SwiGLU.apply(g, u)
    if not torch.is_grad_enabled():
        return self.down_proj(product)
    held = {product.untyped_storage().data_ptr(): (product, lambda: F.silu(g) * u)}
    try:
        with _recomputed(held):
            return self.down_proj(product)
    finally:
        held.clear()  # autograd keeps the hooks with each saved tensor: they must not keep the product


def is_swiglu(module) -> bool:
    act = getattr(module, "act_fn", None)
    return (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, torch.nn.SiLU) or getattr(act, "__name__", "") == "silu"
                 or type(act).__name__ == "SiLUActivation"))


# the norms' outputs -----------------------------------------------------------------------------------------------
def _layer_forward(self, *args, **kwargs):
    if not torch.is_grad_enabled():
        return self._lean_forward(*args, **kwargs)
    outputs: dict = {}  # storage of a norm's output -> (the output, how to compute it again)
    self._lean_outputs = outputs
    try:
        with _recomputed(outputs):
            return self._lean_forward(*args, **kwargs)
    finally:
        outputs.clear()  # autograd keeps the hooks with each saved tensor: they must not keep the outputs
        self._lean_outputs = None


def _norm_forward(self, x):
    out = self._lean_forward(x)
    outputs = getattr(self._lean_layer(), "_lean_outputs", None)
    if outputs is not None and torch.is_grad_enabled() and out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
        # the output itself is held until the layer's forward ends, so no other tensor takes its address meanwhile
        outputs[out.untyped_storage().data_ptr()] = (out, lambda: self._lean_forward(x))
    return out


def _recomputed(outputs: dict):
    """Saved-tensor hooks: a tensor kept for the backward pass that is one of ``outputs`` (or a view of one) is kept
    as a note, and computed again (no grad) when the backward pass reads it."""

    def pack(t):
        held = outputs.get(t.untyped_storage().data_ptr())
        return t if held is None else ("again", held[1], t.shape, t.stride(), t.storage_offset())

    def unpack(packed):
        if isinstance(packed, tuple) and packed and packed[0] == "again":
            _, again, shape, stride, offset = packed
            with torch.no_grad():
                return again().as_strided(shape, stride, offset)
        return packed

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def is_rmsnorm(module) -> bool:
    """An RMSNorm whose forward is a pure function of its input (transformers' Llama/Qwen/Mistral kind), checked by
    running it twice on the same input."""
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(getattr(module, "weight", None), torch.Tensor):
        return False
    with torch.no_grad():
        x = torch.randn(2, 3, module.weight.shape[-1], dtype=module.weight.dtype, device=module.weight.device)
        return torch.equal(module(x), module(x.clone()))


# attention on the key/value heads -------------------------------------------------------------------------------
def sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, but grouped-query attention in the kernel (no repeated keys/values) on a CPU
    even with a padding mask; anything else (a GPU, one query, a position bias) goes to transformers' own."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (groups == 1 or query.device.type != "cpu" or query.shape[2] == 1 or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions")
            or (attention_mask is None and key.shape[2] != query.shape[2])):  # a cache without a mask: transformers aligns it
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=_additive(attention_mask, query.dtype),
                                         dropout_p=dropout, scale=scaling,
                                         is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


_MASK: list = [None, None]  # the last boolean mask seen (a weak reference) and its additive form


def _additive(mask, dtype):
    """A boolean mask as SDPA itself turns it into floats (0 where attended, -inf elsewhere), made once for all the
    layers of a forward pass instead of once (and kept once) per layer."""
    import weakref

    if mask is None or mask.dtype != torch.bool:
        return mask
    last = _MASK[0]() if _MASK[0] is not None else None
    if last is not mask or _MASK[1].dtype != dtype:
        _MASK[0], _MASK[1] = weakref.ref(mask), torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return _MASK[1]


def _use_gqa_attention(model) -> bool:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(ATTENTION, sdpa_gqa)
    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the same padding mask SDPA gets
    model.set_attn_implementation(ATTENTION)
    return True


# the LM head with the loss ------------------------------------------------------------------------------------------
class HeadLoss(torch.autograd.Function):
    """``cross_entropy(hidden @ weight.T, targets, reduction="sum")`` made ``rows`` answer positions at a time; the
    gradient with respect to ``hidden`` is computed in the forward pass, chunk by chunk, and kept instead of the
    logits. The head's weight is frozen (no gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows: int):
        with onednn.on():
            return HeadLoss._forward(ctx, hidden, weight, targets, rows)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, rows: int):
        total = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
            if grad is not None:  # d loss / d logits = softmax - one-hot, then back through the head
                probs = logits.sub_(lse.unsqueeze(1)).exp_()
                probs[torch.arange(t.shape[0]), t] -= 1
                grad[start:start + rows] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype), None, None, None


def plain_head(head) -> bool:
    """A frozen linear layer without a bias (not trained, LoRA-wrapped or quantized): the kind ``head_loss`` takes."""
    weight = getattr(head, "weight", None)
    return (type(head) is torch.nn.Linear and getattr(head, "bias", None) is None and weight is not None
            and not weight.requires_grad and weight.dtype in (torch.float32, torch.bfloat16, torch.float16))


def head_loss(head, hidden, targets, rows: int = 256):
    """The summed cross-entropy of a plain head on ``hidden`` (answer positions) against ``targets``, keeping no
    logits."""
    return HeadLoss.apply(hidden, head.weight, targets, rows)


# apply ------------------------------------------------------------------------------------------------------------
def apply(model, gqa_attention: bool = True) -> dict:
    """Lean MLPs and norms in the decoder layers that keep their activations (not checkpointed), and (with
    ``gqa_attention``) attention on the key/value heads in every layer; returns how many of each."""
    import weakref

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    done = {"mlp": 0, "norm": 0, "gqa_attention": 0}
    for layer in base.modules():
        if not type(layer).__name__.endswith("DecoderLayer") or getattr(layer, "gradient_checkpointing", False):
            continue
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and is_swiglu(mlp):
            mlp.forward = types.MethodType(_mlp_forward, mlp)
            done["mlp"] += 1
        norms = [m for m in layer.children() if is_rmsnorm(m)]
        if norms:
            layer._lean_forward, layer._lean_outputs = layer.forward, None
            layer.forward = types.MethodType(_layer_forward, layer)
            for norm in norms:
                norm._lean_forward, norm._lean_layer = norm.forward, weakref.ref(layer)
                norm.forward = types.MethodType(_norm_forward, norm)
                done["norm"] += 1
    inner = getattr(base, "model", base)
    if gqa_attention and _use_gqa_attention(base if hasattr(base, "set_attn_implementation") else inner):
        done["gqa_attention"] = sum(1 for m in inner.modules() if getattr(m, "num_key_value_groups", 1) > 1)
    return done
