"""The frozen backbone's linear layers, ``y = x W^T + b``, on the fastest path this machine has for them.

A frozen weight needs no weight gradient, only the input gradient ``dL/dx = dL/dy W``. Two cases get a path of
their own; everything else (a weight that trains, CUDA without autocast, tracing / export, a PyTorch without
oneDNN) takes plain ``F.linear``:

- **fp32 on the CPU**: the forward runs through oneDNN (``mkldnn::_linear_pointwise``) or PyTorch's default GEMM
  (``addmm``, MKL), whichever :mod:`.kernels` measured faster for this width and row count on this machine (on
  the project's AMD EPYC oneDNN ran the ViT-B/16 shapes at 93-129 GFLOP/s against 92-105 through ``addmm``;
  Intel's MKL may win elsewhere). Either way nothing is saved for backward but the weight (the input is not
  needed when W is frozen), and the input gradient is computed with ``mm``, as fast as oneDNN or faster here.
- **bf16 autocast** (CPU or CUDA): autocast re-casts a weight that does not require grad at every call (it caches
  only casts of leaves that require grad); for a frozen weight that is a full copy of every matrix at every step.
  We keep one bf16 copy per weight instead, refreshed only when the fp32 weight changes (its version counter), and
  multiply with it: the same numbers autocast computes, without the copies.

Results differ from ``F.linear`` only in summation order (relative ~1e-6 in fp32).

**int8 inference** (opt-in, :func:`quantize_frozen_linears`): a marked frozen weight without gradients on the CPU
takes :mod:`.int8`'s products (smoothed, per-token int8 activations, per-channel int8 weights, int32 sums); inside
:func:`.int8.calibrating` it runs in fp32 and records its input's ranges instead. Tuners, norms, attention
products and the head stay fp32.
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import int8, kernels


def _find_onednn_linear():
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):  # a build without oneDNN, or an op renamed in some release
        return None


_ONEDNN_LINEAR = _find_onednn_linear()


class _FrozenLinear(torch.autograd.Function):
    """``y = x W^T + b`` with W frozen: the forward by ``kernel`` (oneDNN or ``addmm``), ``dL/dx = dL/dy W`` by mm,
    ``dL/db`` for BitFit. Only the weight is saved for backward, whatever the forward kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], kernel: str) -> torch.Tensor:
        ctx.save_for_backward(weight)
        if kernel == 'onednn':
            return _ONEDNN_LINEAR(x, weight, bias, 'none', [], '')
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b, None


def _exporting() -> bool:
    return torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling() or \
        torch.onnx.is_in_onnx_export()


def _fp32_cpu_frozen(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    if _ONEDNN_LINEAR is None or weight.requires_grad or x.device.type != 'cpu':
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or (bias is not None and bias.dtype != x.dtype):
        return False
    return not torch.is_autocast_enabled('cpu') and not _exporting()


def _fp32_runners(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], grad: bool):
    """Each forward kernel once on a synthetic input of the real shape (made once, reused), with the backward; the
    weight and bias detached, so nothing reaches the real gradients."""
    weight, bias = weight.detach(), None if bias is None else bias.detach()
    xs = torch.randn(x.shape, requires_grad=grad)
    g = torch.randn(x.shape[:-1] + (weight.shape[0],)) if grad else None

    def make(kernel):
        def run():
            y = _FrozenLinear.apply(xs, weight, bias, kernel)
            if grad:
                torch.autograd.grad(y, xs, g)
        return run
    return {'onednn': make('onednn'), 'addmm': make('addmm')}


# Low-precision copies of frozen fp32 weights: id(weight) -> (version, data_ptr, copy), dropped with the weight.
_LOW: Dict[int, tuple] = {}


def _low_precision_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    key = id(t)
    hit = _LOW.get(key)
    if hit is not None and hit[0] == t._version and hit[1] == t.data_ptr() and hit[2].dtype == dtype:
        return hit[2]
    if hit is None:
        weakref.finalize(t, _LOW.pop, key, None)
    copy = t.detach().to(dtype)
    _LOW[key] = (t._version, t.data_ptr(), copy)
    return copy


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    device = x.device.type
    if device not in ('cpu', 'cuda') or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def quantize_frozen_linears(root: nn.Module, enable: bool = True) -> int:
    """Mark (``enable``) or unmark every frozen :class:`FrozenFastLinear` under ``root`` for int8 inference
    (:mod:`.int8`); returns how many. A weight that trains is left in fp32. The int8 copies are made at the first
    product and follow the fp32 weight (a merge or a load rebuilds them)."""
    if enable and not int8.available():
        raise RuntimeError("int8 inference needs torch._int_mm or PyTorch's x86 / fbgemm quantized engine, which "
                           f'this build lacks; engines: {torch.backends.quantized.supported_engines}')
    count = 0
    for module in root.modules():
        if isinstance(module, FrozenFastLinear) and not module.weight.requires_grad:
            (int8.mark if enable else int8.unmark)(module.weight)
            count += 1
    return count


def _int8_input(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x`` meets a weight marked for int8 inference where it applies: no gradient, the CPU, fp32, no
    tracing / export. While calibrating, the input's ranges are recorded and the answer is no (fp32 product)."""
    if not int8.is_marked(weight) or torch.is_grad_enabled() or x.device.type != 'cpu' or \
            x.dtype != torch.float32 or _exporting():
        return False
    if int8.recording():
        int8.record(x, weight)
        return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           rows: Optional[slice] = None) -> torch.Tensor:
    """``F.linear(x, weight[rows], bias[rows])`` for a weight that may be frozen, on the fastest path (module
    docstring). ``rows`` selects output rows of the weight (q or k / v of a fused qkv)."""
    if _int8_input(x, weight):
        return int8.products(x, weight, bias, [rows])[0]
    dtype = _autocast_dtype(x)
    if dtype is not None and not weight.requires_grad and weight.dtype == torch.float32 and not _exporting():
        # one low-precision copy of the whole weight, sliced; BitFit biases train: those are cast per call
        w = _low_precision_copy(weight, dtype)
        b = None if bias is None else (bias.to(dtype) if bias.requires_grad else _low_precision_copy(bias, dtype))
        if rows is not None:
            w, b = w[rows], (None if b is None else b[rows])
        return F.linear(x.to(dtype), w, b)
    if rows is not None:
        weight, bias = weight[rows], (None if bias is None else bias[rows])
    if _fp32_cpu_frozen(x, weight, bias):
        grad = torch.is_grad_enabled() and x.requires_grad
        kernel = kernels.linear_choice(x, weight, grad, lambda: _fp32_runners(x, weight, bias, grad))
        return _FrozenLinear.apply(x, weight, bias, kernel)
    return F.linear(x, weight, bias)


class FrozenFastLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class QKVLinear(FrozenFastLinear):
    """The fused ``W_qkv`` of shape (3C, C). The attention applies it as two products with :meth:`split`:
    ``q = W_q h[:, :n]`` and ``kv = [W_k; W_v] h`` -> ``(q (B, n, C), kv (B, N, 2C))``.

    q may cover only the first n tokens (the others are keys / values only), and keeping kv apart from q lets kv's
    buffer be freed once a prefix is concatenated to it, rather than living on as part of q's storage.

    ``forward(h)`` keeps ``nn.Linear``'s contract (one tensor, ``(B, N, 3C)``): libraries that wrap or replace a
    model's linears by name (ms-swift's or peft's LoRA on ``qkv``) call the module they wrap that way.
    """

    def split(self, h: torch.Tensor, n_query: Optional[int] = None):
        C = self.in_features
        n = h.shape[1] if n_query is None else n_query
        # a contiguous slice: F.linear then takes one GEMM path whatever the weight's requires_grad
        if n == h.shape[1] and _int8_input(h, self.weight):  # int8: h quantized once for both products
            q, kv = int8.products(h, self.weight, self.bias, [slice(0, C), slice(C, 3 * C)])
            return q, kv
        hq = h if n == h.shape[1] else h[:, :n].contiguous()
        q = linear(hq, self.weight, self.bias, rows=slice(0, C))
        kv = linear(h, self.weight, self.bias, rows=slice(C, 3 * C))
        return q, kv
