"""U-Tuners: small trainable modules attached to the frozen OPs of a ViT.

U-Tuning (Jiang et al., arXiv 2303.00690) writes every tuner as ``x' = OP(x) + s * U(x)`` with a frozen OP
(mha, ffn or the whole block) and a parallel tuner U (adapter, prefix, prompt). The original, sequential forms
of these methods, LoRA, BitFit and side-tuning are here too.

Each kind is one module of this package that registers itself (:mod:`.base`); every module here is imported
when the registry is first read, so a new kind is one new file. :mod:`.spec` parses configuration entries.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Iterable, List

from .base import Dims, Tuner, dims_of, register_tuner, slot_name, tuner_class, tuner_kinds
from .spec import TunerSpec, legacy_entries, parse_tuner, parse_tuners

__all__ = ['Dims', 'Tuner', 'TunerSpec', 'attach_block_tuners', 'build_tuner', 'dims_of',
           'legacy_entries', 'parse_tuner', 'parse_tuners', 'register_tuner', 'slot_name', 'tuner_class',
           'tuner_kinds']

# Shared helpers, not kinds.
_NOT_KINDS = {'base', 'spec', 'scale', 'attention', 'parallel'}
_discovered = False


def _discover() -> None:
    """Import every module of this package once, so that each kind registers itself."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_KINDS and not info.name.startswith('_'):
            importlib.import_module(f'{__name__}.{info.name}')


def build_tuner(spec: TunerSpec, size: int, dims: Dims) -> Tuner:
    return spec.kind.form_class(spec.form)(spec, size, dims)


def attach_block_tuners(vit, specs: Iterable[TunerSpec]) -> None:
    """Attach the block-level tuners of ``specs`` to the blocks of ``vit`` (in place, in entry order)."""
    dims = dims_of(vit)
    for spec in specs:
        if spec.kind.level != 'block':
            continue
        for blk, size in zip(vit.blocks, spec.sizes):
            if size:
                blk.attach(slot_name(spec.kind, spec.op), build_tuner(spec, size, dims))


def bypass_problems(specs: List[TunerSpec]) -> List[dict]:
    """Entries that cannot live on the bypass path (they change the frozen computation)."""
    return [s.source for s in specs if s.form not in s.kind.bypass_forms and not s.kind.requires_bypass]


_discover()
