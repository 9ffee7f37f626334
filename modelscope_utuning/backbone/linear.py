"""The frozen backbone's linear layers, ``y = x W^T + b``, with a faster fp32 CPU forward.

PyTorch's default fp32 CPU GEMM (MKL) is slower than oneDNN's on AMD CPUs: for ViT-B/16 shapes on this project's
reference machine (2-core AMD EPYC, AVX2) ``x W^T`` ran at 92-105 GFLOP/s through ``addmm`` and 93-129 GFLOP/s
through oneDNN (``benchmarks/gemm_backends.py``). A frozen weight needs no weight gradient, only the input gradient
``dL/dx = dL/dy W``, for which the default ``mm`` (``W`` already row-major) is as fast as oneDNN or faster. So
:func:`linear` runs the forward through oneDNN and the backward through ``mm``, and saves nothing for backward but
the weight itself (the input is not needed when ``W`` is frozen).

Anything outside that case - a weight that trains, CUDA, autocast or a dtype other than fp32, tracing / export,
a PyTorch without the oneDNN op - takes plain ``F.linear``. Results differ from ``F.linear`` only in summation
order (relative ~1e-6).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def _find_onednn_linear():
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):  # a build without oneDNN, or an op renamed in some release
        return None


_ONEDNN_LINEAR = _find_onednn_linear()


class _FrozenLinear(torch.autograd.Function):
    """``y = x W^T + b`` with W frozen: forward by oneDNN, ``dL/dx = dL/dy W`` by mm, ``dL/db`` for BitFit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return _ONEDNN_LINEAR(x, weight, bias, 'none', [], '')

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    if _ONEDNN_LINEAR is None or weight.requires_grad or x.device.type != 'cpu':
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or (bias is not None and bias.dtype != x.dtype):
        return False
    if torch.is_autocast_enabled('cpu') or torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    return not (torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; the oneDNN path when the weight is frozen and everything is fp32 on CPU."""
    if _onednn_applies(x, weight, bias):
        return _FrozenLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class FrozenFastLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class QKVLinear(FrozenFastLinear):
    """The fused ``W_qkv`` of shape (3C, C), applied as two products: ``q = W_q h[:, :n]`` and
    ``kv = [W_k; W_v] h`` -> ``(q (B, n, C), kv (B, N, 2C))``.

    q may cover only the first n tokens (the others are keys / values only), and keeping kv apart from q lets kv's
    buffer be freed once a prefix is concatenated to it, rather than living on as part of q's storage.
    """

    def forward(self, h: torch.Tensor, n_query: Optional[int] = None):
        C = self.in_features
        w, b = self.weight, self.bias
        n = h.shape[1] if n_query is None else n_query
        # a contiguous slice: F.linear then takes one GEMM path whatever the weight's requires_grad
        hq = h if n == h.shape[1] else h[:, :n].contiguous()
        q = linear(hq, w[:C], None if b is None else b[:C])
        kv = linear(h, w[C:], None if b is None else b[C:])
        return q, kv
