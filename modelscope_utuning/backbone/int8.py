"""int8 products for the frozen backbone linears (inference only): ``y = x W^T + b`` with x and W in int8.

Opt-in per weight (:func:`mark`, called by :func:`~.linear.quantize_frozen_linears`); :func:`~.linear.linear`
sends a marked weight here when no gradient is wanted, on the CPU, in fp32, outside tracing / export.

The math, for a weight W (N, K), its input x (M tokens, K) and an optional calibration:

1. **Smoothing** (SmoothQuant, Xiao et al. 2023, alpha = 1/2). A few input channels of a ViT's linears carry most
   of the activations' range (outlier channels); with one scale per token they would leave the other channels a
   handful of levels. With ``a_j = max |x_tj|`` over the calibration tokens and ``w_j = max_i |W_ij|``,
   ``s_j = sqrt(a_j / w_j)`` and ``x' = x / s``, ``W' = W diag(s)``: ``x' W'^T = x W^T`` exactly, and channel j's
   range becomes ``sqrt(a_j w_j)`` on both sides. Without a calibration ``s = 1``. (:func:`calibrating`)
2. **Weights**: per output channel, symmetric: ``W'_i ~ sw_i q_i``, ``q`` in [-127, 127], ``sw_i = max|W'_i| / 127``.
3. **Activations**: per token, symmetric, at every call: ``x'_t ~ sx_t p_t``, ``sx_t = max_j |x'_tj| / 127``.
4. ``y_ti = sx_t sw_i sum_j p_tj q_ij + b_i``; the sum in int32 (``torch._int_mm``: exact integer products, run by
   oneDNN with VNNI where the CPU has it).

Where ``torch._int_mm`` is missing or not exact (:func:`kernel` tests a worst case once), and on x86 CPUs without
VNNI (whose int8 kernels sum pairs of u8 x s8 products in int16, which saturates; the per-token path was not
measured on one), steps 3-4 become PyTorch's dynamic int8 linear instead, the path measured there (1.2x fp32):
one scale per call (per tensor), asymmetric, 7 bits (``reduce_range``) to stay clear of that saturation. Smoothing
applies to both.

Measured on DINOv2 ViT-S/14 + a U-Tuning tri-tuner, 500 Fashion-MNIST test images (benchmarks/README.md, int8):
per tensor 7 bits agreed with fp32 on 95.6 % of top-1 answers, per token 98.6 %, per token after smoothing
calibrated on the 100 training images 99.4 %. Calibrating on noise images instead gave 90.6 %: the statistics must
come from real images.
"""
from __future__ import annotations

import contextlib
import platform
import warnings
import weakref
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from .kernels import cpu_flags

ALPHA = 0.5  # SmoothQuant's migration strength: equal ranges on both sides
_FLOOR = 1e-3  # a channel's calibrated range is at least this fraction of the layer's largest (dead channels)


class _State:
    """One marked weight: its calibrated input ranges and its int8 copies (one per row slice), rebuilt when the
    weight or bias changes in place (version counter and address)."""
    __slots__ = ('stamp', 'input_absmax', 'packed')

    def __init__(self):
        self.stamp: Optional[tuple] = None
        self.input_absmax: Optional[torch.Tensor] = None
        self.packed: Dict[Optional[Tuple[int, int]], tuple] = {}


_STATE: Dict[int, _State] = {}  # id(weight) -> state; dropped with the weight
_RECORD: Optional[Dict[int, torch.Tensor]] = None  # while calibrating: id(weight) -> running max |x_j|
_KERNEL: Optional[str] = None


def mark(weight: torch.Tensor) -> None:
    key = id(weight)
    if key not in _STATE:
        _STATE[key] = _State()
        weakref.finalize(weight, _STATE.pop, key, None)


def unmark(weight: torch.Tensor) -> None:
    _STATE.pop(id(weight), None)


def is_marked(weight: torch.Tensor) -> bool:
    return id(weight) in _STATE


def available() -> bool:
    """Whether this PyTorch can run the products (``torch._int_mm``, or the x86 / fbgemm quantized engine)."""
    return kernel() != 'none'


def _x86_without_vnni() -> bool:
    if platform.machine().lower() not in ('x86_64', 'amd64', 'i386', 'i686'):
        return False
    flags = cpu_flags()
    # flags unread (not Linux): the exactness check alone decides
    return bool(flags) and not flags & {'avx512_vnni', 'avx_vnni', 'amx_int8'}


def _int_mm_exact() -> bool:
    """``torch._int_mm`` on a worst case: rows of +-127 against rows of +-127, whose pairs sum past int16 (32767)
    as soon as two of them add up, so a kernel that accumulates pairs in int16 gets it wrong."""
    try:
        a = torch.full((4, 64), 127, dtype=torch.int8)
        a[:, 1::2] = -127
        w = a.clone()
        w[:, ::4] = -127  # mixed signs: sums cross zero and back
        return torch.equal(torch._int_mm(a, w.t()).long(), a.long() @ w.long().t()) and \
            torch.equal(torch._int_mm(a[:1, :8], w[:3, :8].t()).long(), a[:1, :8].long() @ w[:3, :8].long().t())
    except (AttributeError, RuntimeError):
        return False


def kernel() -> str:
    """'per-token' (``torch._int_mm``), 'per-tensor-7bit' (PyTorch's dynamic int8 linear) or 'none'. Decided once
    per process: per-token needs an x86 CPU with VNNI / AMX (or another architecture) and exact products
    (:func:`_int_mm_exact`)."""
    global _KERNEL
    if _KERNEL is None:
        engines = getattr(torch.backends.quantized, 'supported_engines', [])
        if not _x86_without_vnni() and _int_mm_exact():
            _KERNEL = 'per-token'
        elif 'x86' in engines or 'fbgemm' in engines:
            _KERNEL = 'per-tensor-7bit'
        else:
            _KERNEL = 'none'
    return _KERNEL


@contextlib.contextmanager
def calibrating(root: nn.Module) -> Iterator[None]:
    """Inside: every marked weight under ``root`` runs in fp32 and records ``max |x_j|`` per input channel over
    all tokens it sees. On exit those ranges become the weights' calibration (smoothing, module docstring) and the
    int8 copies are rebuilt. Run a few dozen representative images through the model inside."""
    global _RECORD
    if _RECORD is not None:
        raise RuntimeError('int8 calibration is already running')
    _RECORD = {}
    try:
        yield
        seen = _RECORD
    finally:
        _RECORD = None
    marked = marked_weights(root)
    missing = [p for p in marked if id(p) not in seen]
    if missing:
        raise ValueError(f'int8 calibration: {len(missing)} of the {len(marked)} int8 layers saw no input; run the '
                         'model on the calibration images inside calibrating()')
    for p in marked:
        state = _STATE[id(p)]
        state.input_absmax = seen[id(p)]
        state.packed, state.stamp = {}, None


def marked_weights(root: nn.Module) -> List[torch.Tensor]:
    return [p for p in root.parameters() if id(p) in _STATE]


def calibrated(root: nn.Module) -> List[bool]:
    """For each marked weight under ``root``: whether it holds a calibration."""
    return [_STATE[id(p)].input_absmax is not None for p in marked_weights(root)]


def recording() -> bool:
    return _RECORD is not None


def record(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Fold ``max |x_j|`` over the tokens of ``x`` into the running calibration of ``weight``."""
    seen = x.detach().abs().reshape(-1, x.shape[-1]).amax(0)
    old = _RECORD.get(id(weight))
    _RECORD[id(weight)] = seen if old is None else torch.maximum(old, seen)


def smoothing(input_absmax: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``s_j = (a_j / w_j)^ALPHA`` with ``w_j = max_i |W_ij|`` over all rows of the weight (a fused qkv's three
    parts share their input, so they share s); ranges floored at ``_FLOOR`` x the largest (dead channels)."""
    a = input_absmax.clamp_min(float(input_absmax.max()) * _FLOOR).clamp_min(1e-12)
    w = weight.detach().abs().amax(0)
    w = w.clamp_min(float(w.max()) * _FLOOR).clamp_min(1e-12)
    return (a / w).pow(ALPHA)


def _pack(weight: torch.Tensor, bias: Optional[torch.Tensor], rows: Optional[slice], state: _State) -> tuple:
    w = weight.detach()
    inv_s = None
    if state.input_absmax is not None:
        s = smoothing(state.input_absmax, w)
        inv_s = s.reciprocal()
        w = w * s
    if rows is not None:
        w = w[rows]
    b = None if bias is None else (bias.detach() if rows is None else bias.detach()[rows]).contiguous()
    sw = (w.abs().amax(1) / 127.0).clamp_min(1e-12)
    if kernel() == 'per-token':
        q = torch.round(w / sw[:, None]).clamp_(-127, 127).to(torch.int8)
        return inv_s, (q.t().contiguous(), sw, b)  # (K, N): 6 % faster in _int_mm than the transposed view
    with warnings.catch_warnings():  # PyTorch 2.13 marks quantized tensors deprecated; the path is the fallback
        warnings.simplefilter('ignore', UserWarning)
        q = torch.quantize_per_channel(w.contiguous(), sw.double(), torch.zeros_like(sw, dtype=torch.long), 0,
                                       torch.qint8)
        return inv_s, (torch.ops.quantized.linear_prepack(q, b),)


def _packed(weight: torch.Tensor, bias: Optional[torch.Tensor], rows: Optional[slice]) -> tuple:
    state = _STATE[id(weight)]
    stamp = (weight._version, weight.data_ptr()) + \
        (None if bias is None else (bias._version, bias.data_ptr()))
    if state.stamp != stamp:
        state.stamp, state.packed = stamp, {}
    key = None if rows is None else (rows.start, rows.stop)
    packed = state.packed.get(key)
    if packed is None:
        packed = state.packed[key] = _pack(weight, bias, rows, state)
    return packed


def products(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             rows: List[Optional[slice]]) -> List[torch.Tensor]:
    """``[F.linear(x, weight[r], bias[r]) for r in rows]`` as int8 products (module docstring); x (..., K) fp32.
    The row slices share x's quantization (one pass for a fused qkv's q and k / v)."""
    parts = [_packed(weight, bias, r) for r in rows]
    inv_s = parts[0][0]  # the same for every slice of one weight
    x2 = x.reshape(-1, x.shape[-1])
    if len(parts[0][1]) == 1:  # the per-tensor fallback
        xs = x2 * inv_s if inv_s is not None else x2.contiguous()
        ys = [torch.ops.quantized.linear_dynamic(xs, p[1][0], True) for p in parts]
    else:
        xs = x2 * inv_s if inv_s is not None else x2.clone()  # a copy: quantized in place below
        # max |x'_t| as max(max x', -min x'): two vectorised reductions, 20x faster here than vector_norm(inf)
        sx = torch.maximum(xs.amax(1, keepdim=True), xs.amin(1, keepdim=True).neg_()).clamp_min_(1e-12).div_(127.0)
        xq = xs.div_(sx).round_().to(torch.int8)  # |x' / sx| <= 127: no clamp needed
        ys = []
        for _, (wq_t, sw, b) in parts:
            y = torch._int_mm(xq, wq_t).to(torch.float32).mul_(sw).mul_(sx)
            ys.append(y if b is None else y.add_(b))
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


