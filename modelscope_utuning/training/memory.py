"""Host memory: an opt-in malloc setting that hands freed tensor memory back to the OS at once.

glibc serves a large allocation by its own ``mmap`` only until the first such block is freed; it then raises its
mmap threshold (up to 32 MiB) and serves later tensors of that size from the heap, where freed blocks stay resident
and fragment. A CPU training step frees and re-allocates hundreds of MB of activations, so the process keeps
several hundred MB more resident than is ever live at once (about 0.4 GB for a ViT-B/16, batch 8 step).

``train.cpu_allocator: lean`` fixes glibc's thresholds (``M_MMAP_THRESHOLD`` = 128 KiB, ``M_TRIM_THRESHOLD`` = 0):
every tensor above 128 KiB gets its own mapping, returned when freed. The price is the page faults of fresh
memory, a few per cent of step time (figures in ``benchmarks/README.md``), hence opt-in. The setting is
process-wide and lasts until the process ends; elsewhere than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

ALLOCATORS = ('default', 'lean')
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_LEAN_MMAP_THRESHOLD = 128 * 1024

logger = logging.getLogger(__name__)


def _glibc():
    if not sys.platform.startswith('linux'):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.gnu_get_libc_version  # glibc only (musl has mallopt as a stub)
        return libc
    except (OSError, AttributeError):
        return None


def use_cpu_allocator(kind: str) -> bool:
    """Apply ``train.cpu_allocator``; returns whether malloc's behaviour changed."""
    if kind not in ALLOCATORS:
        raise ValueError(f'train.cpu_allocator={kind!r}: expected one of {ALLOCATORS}')
    if kind == 'default':
        return False
    libc = _glibc()
    if libc is None:
        logger.warning("train.cpu_allocator='lean' needs glibc; the allocator is left as it is")
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _LEAN_MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 0))
