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

**int8 inference** (opt-in, :func:`quantize_frozen_linears`): the frozen weights of a model's backbone linears
get an int8 copy, quantized per output channel (``W ~ s_j q_j``, ``q`` in [-127, 127], ``s_j = max|W_j| / 127``);
without gradients on the CPU the product runs as PyTorch's dynamic int8 linear (the input quantized per call,
per tensor, to 7 bits: ``reduce_range``, which x86 kernels without VNNI need to stay clear of saturation),
``y ~ (s_x q_x)(s_W q_W)^T + b`` in fp32 out. Tuners, norms, attention products and the head stay fp32.
PyTorch 2.13 marks its quantized tensors (``torch.quantize_per_channel``) deprecated; the ONNX export's int8 path
(ONNX Runtime's quantizer) does not depend on them.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels


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


# int8 copies of frozen weights marked by quantize_frozen_linears: id(weight) -> (weight's version and address,
# bias's, {rows: packed int8 weight}); dropped with the weight, rebuilt when either tensor changes.
_INT8: Dict[int, list] = {}


def _int8_available() -> bool:
    try:
        return 'x86' in torch.backends.quantized.supported_engines or \
            'fbgemm' in torch.backends.quantized.supported_engines
    except (AttributeError, RuntimeError):
        return False


def quantize_frozen_linears(root: nn.Module, enable: bool = True) -> int:
    """Mark (``enable``) or unmark every frozen :class:`FrozenFastLinear` under ``root`` for int8 inference
    (module docstring); returns how many. A weight that trains is left in fp32. The int8 copies are made at the
    first product and follow the fp32 weight (a merge or a load rebuilds them)."""
    if enable and not _int8_available():
        raise RuntimeError("int8 inference needs PyTorch's x86 / fbgemm quantized engine, which this build lacks; "
                           f'engines: {torch.backends.quantized.supported_engines}')
    count = 0
    for module in root.modules():
        if isinstance(module, FrozenFastLinear) and not module.weight.requires_grad:
            key = id(module.weight)
            if enable and key not in _INT8:
                _INT8[key] = [None, None, {}]
                weakref.finalize(module.weight, _INT8.pop, key, None)
            elif not enable:
                _INT8.pop(key, None)
            count += 1
    return count


def _int8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 rows: Optional[slice]) -> torch.Tensor:
    entry = _INT8[id(weight)]
    state = (weight._version, weight.data_ptr())
    bias_state = None if bias is None else (bias._version, bias.data_ptr())
    if entry[0] != state or entry[1] != bias_state:
        entry[0], entry[1], entry[2] = state, bias_state, {}
    key = None if rows is None else (rows.start, rows.stop)
    packed = entry[2].get(key)
    if packed is None:
        w = weight.detach() if rows is None else weight.detach()[rows]
        b = None if bias is None else (bias.detach() if rows is None else bias.detach()[rows])
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # PyTorch 2.13 marks quantized tensors deprecated: said in the docstring
            warnings.simplefilter('ignore', UserWarning)
            q = torch.quantize_per_channel(w.contiguous(), scale, torch.zeros_like(scale, dtype=torch.long), 0,
                                           torch.qint8)
            packed = entry[2][key] = torch.ops.quantized.linear_prepack(q, None if b is None else b.contiguous())
    y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).contiguous(), packed, True)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           rows: Optional[slice] = None) -> torch.Tensor:
    """``F.linear(x, weight[rows], bias[rows])`` for a weight that may be frozen, on the fastest path (module
    docstring). ``rows`` selects output rows of the weight (q or k / v of a fused qkv)."""
    if _INT8 and id(weight) in _INT8 and not torch.is_grad_enabled() and x.device.type == 'cpu' \
            and x.dtype == torch.float32 and not _exporting():
        return _int8_linear(x, weight, bias, rows)
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
        hq = h if n == h.shape[1] else h[:, :n].contiguous()
        q = linear(hq, self.weight, self.bias, rows=slice(0, C))
        kv = linear(h, self.weight, self.bias, rows=slice(C, 3 * C))
        return q, kv
