"""Kernel choices made for the machine at hand: the faster of equivalent implementations, measured, remembered.

Which implementation of an operation is fastest depends on the CPU (AVX2 / AVX512 / AMX, the BLAS and oneDNN
builds), the dtype and the shapes. Measured on two 2-core machines of this project (``benchmarks/README.md``):
PyTorch's fused ``scaled_dot_product_attention`` runs its CPU backward in bf16 several times slower than plain
``softmax(q k^T / sqrt(d)) v`` (35 ms against 5.5 ms for DINOv2 ViT-S/14 at 112 px, batch 25), while in fp32 at
ViT-B/16 shapes it is the faster one; oneDNN's fp32 GEMM beats MKL's on an AMD EPYC and may not on a Xeon.

So each candidate set (:data:`CANDIDATES`) is timed once per *key* - the operation, device, dtype, whether a
backward follows, and the shapes rounded up to powers of two - on synthetic tensors of the real shapes, under the
caller's autocast state, and the fastest is remembered: in memory, and in a small JSON file per machine (CPU model
and flags, torch version) so that every process on the machine makes the same choice (a run and its resume compute
the same numbers). All candidates compute the same function; they differ in summation order only (the tests
compare each against the reference on its own).

Environment: ``UTUNING_KERNELS=default`` skips the timing and takes the first candidate of each set (what version
0.1 ran); ``UTUNING_ATTENTION=sdpa|math`` and ``UTUNING_LINEAR=onednn|addmm`` force one; ``UTUNING_KERNEL_CACHE``
names the cache file (``none``: memory only). Any failure while timing falls back to the first candidate.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import threading
import time
from typing import Callable, Dict, Optional, Tuple

import torch

logger = logging.getLogger('modelscope.utuning.kernels')

CANDIDATES = {'attention': ('sdpa', 'math'), 'linear': ('onednn', 'addmm')}
FORCE_ENV = {'attention': 'UTUNING_ATTENTION', 'linear': 'UTUNING_LINEAR'}
_WARMUP, _REPS = 2, 5


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> Tuple[str, Tuple[str, ...]]:
    """``/proc/cpuinfo``'s first model name and flags (Linux; elsewhere ``platform.processor()`` and no flags)."""
    model, flags = platform.processor(), None
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
                elif line.startswith('flags'):
                    flags = tuple(line.split(':', 1)[1].split())
                if model and flags is not None:
                    break
    except OSError:
        pass
    return model, flags or ()


def cpu_flags() -> frozenset:
    """The CPU's feature flags as ``/proc/cpuinfo`` lists them (empty where it cannot be read)."""
    return frozenset(_cpuinfo()[1])


@functools.lru_cache(maxsize=1)
def machine_id() -> str:
    """CPU model name and vector / matrix flags, torch version and threads: what the choices depend on."""
    model, flags = _cpuinfo()
    flags = ' '.join(sorted(x for x in flags if x.startswith(('avx', 'amx'))))
    return f'{model}|{flags}|torch {torch.__version__}|threads {torch.get_num_threads()}'


def _cache_path() -> Optional[str]:
    path = os.environ.get('UTUNING_KERNEL_CACHE')
    if path == 'none':
        return None
    if path:
        return path
    digest = hashlib.sha1(machine_id().encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser('~'), '.cache', 'modelscope_utuning', f'kernels-{digest}.json')


class KernelChooser:
    """Remembers, per key, the fastest candidate of an operation (see the module docstring)."""

    def __init__(self):
        self._choices: Dict[str, str] = {}
        self._lock = threading.Lock()
        self._loaded = False

    def _load(self) -> None:
        self._loaded = True
        path = _cache_path()
        if path and os.path.isfile(path):
            try:
                with open(path) as f:
                    data = json.load(f)
                if data.get('machine') == machine_id():
                    self._choices.update(data.get('choices', {}))
            except (OSError, ValueError):
                pass

    def _save(self) -> None:
        path = _cache_path()
        if not path:
            return
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f'{path}.{os.getpid()}.tmp'
            with open(tmp, 'w') as f:
                json.dump({'machine': machine_id(), 'choices': self._choices}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: the choices live in memory for this process

    def choices(self) -> Dict[str, str]:
        return dict(self._choices)

    def choose(self, op: str, key: str, make_runners: Callable[[], Dict[str, Callable[[], None]]]) -> str:
        """The candidate to use for ``key``: forced, remembered, or timed now with the runners that
        ``make_runners()`` returns (name -> a call that runs the candidate once on synthetic inputs, backward
        included where the key says so). ``make_runners`` is called only when timing: this runs on every
        forward, and building the synthetic inputs costs as much as the operation itself."""
        names = CANDIDATES[op]
        forced = os.environ.get(FORCE_ENV[op])
        if forced in names:
            return forced
        if os.environ.get('UTUNING_KERNELS') == 'default':
            return names[0]
        full = f'{op}|{key}'
        choice = self._choices.get(full)
        if choice is not None:
            return choice
        with self._lock:
            if not self._loaded:
                self._load()
                choice = self._choices.get(full)
                if choice is not None:
                    return choice
            # The synthetic inputs are random: draw them without touching the global generators, so that a
            # run whose first forward times a kernel and its resume, which finds the choice cached, draw the
            # same random numbers for everything else (augmentation, initialisation, dropout).
            with torch.random.fork_rng(devices=_rng_devices()):
                choice = _time(make_runners(), names[0])
            self._choices[full] = choice
            self._save()
        logger.debug(f'kernel for {full}: {choice}')
        return choice


def _time(runners: Dict[str, Callable[[], None]], default: str, margin: float = 0.1) -> str:
    """The fastest runner by its best time over interleaved repetitions (a load that comes and goes hits every
    candidate alike); another candidate replaces ``default`` only when it is faster by more than ``margin``."""
    best = {name: float('inf') for name in runners}
    try:
        for _ in range(_WARMUP):
            for run in runners.values():
                run()
        for _ in range(_REPS):
            for name, run in runners.items():
                t0 = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - a candidate that fails here is never chosen
        logger.warning(f'kernel timing failed ({type(e).__name__}: {e}); using {default}')
        return default
    return pick(best, default, margin)


def pick(best: Dict[str, float], default: str, margin: float = 0.1) -> str:
    """The candidate with the smallest best time; ``default`` stays unless another beats it by more than
    ``margin`` (timing noise must not flip a choice)."""
    fastest = min(best, key=best.get)
    if default in best and best[fastest] > (1.0 - margin) * best[default]:
        return default
    return fastest


CHOOSER = KernelChooser()


def _rng_devices() -> list:
    """The CUDA devices whose generator a timing could draw from (none where CUDA was never started)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


def _bucket(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# -- attention -----------------------------------------------------------------------------------------------------
def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` with plain matrix products (B, H, n, d) x (B, H, N, d) -> (B, H, n, d)."""
    scores = torch.matmul(q * (q.shape[-1] ** -0.5), k.transpose(-2, -1))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def _attention_key(q: torch.Tensor, k: torch.Tensor, grad: bool) -> str:
    B, H, n, d = q.shape
    autocast = torch.is_autocast_enabled(q.device.type) if q.device.type in ('cpu', 'cuda') else False
    return (f'{q.device.type}|{q.dtype}|autocast={autocast}|grad={grad}|H={H}|d={d}|B={_bucket(B)}|'
            f'n={_bucket(n)}|N={_bucket(k.shape[2])}')


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention through the faster implementation for these shapes on this machine."""
    if dropout_p > 0.0 or torch.jit.is_scripting() or torch.jit.is_tracing() or \
            torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    choice = CHOOSER.choose('attention', _attention_key(q, k, grad), lambda: _attention_runners(q, k, v, grad))
    if choice == 'math':
        return math_attention(q, k, v)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _attention_runners(q, k, v, grad: bool) -> Dict[str, Callable[[], None]]:
    """Each candidate once on synthetic tensors of the real shapes (made once, reused), with its backward."""
    qs, ks, vs = (torch.randn(t.shape, dtype=t.dtype, device=t.device, requires_grad=grad) for t in (q, k, v))
    g = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=v.dtype, device=v.device) if grad else None

    def make(fn):
        def run():
            out = fn(qs, ks, vs)
            if grad:
                torch.autograd.grad(out, (qs, ks, vs), g.to(out.dtype))
        return run
    return {'sdpa': make(torch.nn.functional.scaled_dot_product_attention), 'math': make(math_attention)}


# -- frozen linears ---------------------------------------------------------------------------------------------------
def linear_choice(x: torch.Tensor, weight: torch.Tensor, grad: bool,
                  make_runners: Callable[[], Dict[str, Callable[[], None]]]) -> str:
    """'onednn' or 'addmm' for a frozen fp32 linear of this width and about this many rows."""
    rows = x.numel() // max(x.shape[-1], 1)
    key = (f'{weight.device.type}|{weight.dtype}|grad={grad}|in={weight.shape[1]}|out={weight.shape[0]}|'
           f'rows={_bucket(rows)}')
    return CHOOSER.choose('linear', key, make_runners)


def chosen() -> Dict[str, str]:
    """Every choice made so far in this process (and loaded from the cache), for the benchmarks' records."""
    return CHOOSER.choices()


__all__ = ['CANDIDATES', 'CHOOSER', 'attention', 'chosen', 'linear_choice', 'machine_id', 'math_attention', 'pick']
