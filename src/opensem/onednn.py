"""fp32 linear layers through oneDNN on CPUs where that is exact and faster.

PyTorch sends an fp32 matmul on a CPU to MKL. On some CPUs (measured: an AMD EPYC with AVX-512) MKL's fp32 kernel
runs at less than half the speed of oneDNN's AVX-512 one for the same product. PyTorch hands fp32 matmuls to oneDNN
only while ``torch.backends.mkldnn.matmul.fp32_precision`` is ``"bf16"``; where the CPU has AMX, oneDNN then really
computes in bf16, and elsewhere (AVX-512 with or without AVX512-BF16) it computes in fp32. So a probe decides, once
per process, on this machine: the setting is used only if a product made with it equals the float64 one to fp32
accuracy (no bf16 arithmetic) and it is clearly faster than without it. Otherwise nothing changes.

The setting is turned on around the linear layers alone (forward and backward): with it on, PyTorch's CPU flash
attention runs about three times slower. ``OPENSEM_ONEDNN=0`` turns this off (``1`` skips the speed half of the
probe, never the exactness half).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import types

import torch
import torch.nn.functional as F

EXACT = 1e-5  # relative error of an fp32 product against float64: about 3e-7 in fp32, about 3e-3 with bf16 inputs


def _setting():
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return matmul if matmul is not None and hasattr(matmul, "fp32_precision") else None


@contextlib.contextmanager
def on():
    """fp32 matmuls go to oneDNN inside this block (nothing changes where the probe said no)."""
    matmul = _setting()
    if matmul is None or not available():
        yield
        return
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def _timed(f, reps: int = 5) -> float:
    f()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


@functools.cache
def available() -> bool:
    """Whether oneDNN's fp32 matmul is exact (fp32 arithmetic) and faster than the default here."""
    wanted = os.environ.get("OPENSEM_ONEDNN", "")
    matmul = _setting()
    if wanted == "0" or matmul is None or not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 576, generator=gen), torch.randn(1536, 576, generator=gen)
    ref = x.double() @ w.double().t()
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "bf16"
        y = x @ w.t()
        exact = float((y.double() - ref).norm() / ref.norm()) < EXACT
        fast = _timed(lambda: x @ w.t()) if exact and wanted != "1" else 0.0
    finally:
        matmul.fp32_precision = before
    if not exact:
        return False
    return wanted == "1" or fast < 0.8 * _timed(lambda: x @ w.t())


class _Linear(torch.autograd.Function):
    """``F.linear`` with its products in oneDNN, forward and backward; keeps the input only when the weight is
    trained (as autograd's own linear does)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        with on():
            y = F.linear(x, weight, bias)
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        with on():
            if ctx.needs_input_grad[0]:
                gx = grad @ weight
            if ctx.needs_input_grad[1]:
                gw = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, gw, gb


def _forward(self, x):
    if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return F.linear(x, self.weight, self.bias)
    if not torch.is_grad_enabled() or not (x.requires_grad or self.weight.requires_grad
                                           or (self.bias is not None and self.bias.requires_grad)):
        with on():
            return F.linear(x, self.weight, self.bias)
    return _Linear.apply(x, self.weight, self.bias)


def apply(model) -> int:
    """Every plain fp32 ``nn.Linear`` of ``model`` on the CPU computes through oneDNN, if the probe says so; returns
    how many."""
    if not available():
        return 0
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if type(m) is torch.nn.Linear and w is not None and w.device.type == "cpu" and w.dtype == torch.float32:
            m.forward = types.MethodType(_forward, m)
            n += 1
    return n
