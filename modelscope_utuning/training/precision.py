"""Mixed precision choice: ``amp`` = 'bf16' | 'fp16' | 'fp32' | 'auto' (bf16 where the hardware runs it natively).

bf16 autocast keeps fp32 master weights and needs no loss scaling; fp16 (CUDA only) goes through ModelScope's
TorchAMPOptimizerHook, which owns the GradScaler.
"""
from __future__ import annotations

import contextlib

import torch

from ..backbone.kernels import cpu_flags

PRECISIONS = ('auto', 'bf16', 'fp16', 'fp32')


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: without them CPU bf16 matmuls are emulated and slower than fp32."""
    return bool(cpu_flags() & {'avx512_bf16', 'amx_bf16'})


def resolve_precision(amp: str, device_type: str) -> str:
    if amp is None:
        amp = 'auto'
    if amp not in PRECISIONS:
        raise ValueError(f'train.amp={amp!r}: expected one of {PRECISIONS}')
    if amp == 'fp16' and device_type != 'cuda':
        raise ValueError("train.amp='fp16' needs a CUDA device; use 'bf16' on CPU")
    if amp == 'auto':
        if device_type == 'cuda':
            return 'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
        return 'bf16' if cpu_has_native_bf16() else 'fp32'
    return amp


def autocast(precision: str, device_type: str):
    if precision == 'bf16':
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
