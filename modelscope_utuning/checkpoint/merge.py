"""Fold mergeable tuners into the frozen weights for inference, then drop them: same outputs, plain-backbone speed.

Works on a :class:`~modelscope_utuning.backbone.vit.VisionTransformer` with tuners attached: every tuner of the
kinds asked for that declares ``mergeable`` folds itself in (:meth:`~modelscope_utuning.tuners.base.Tuner.merge`)
and is detached from its block. Refused (ValueError, nothing changed) where merging would change outputs: a tuner
left in place that computes a projection itself from the frozen weights (``borrows()``, e.g. a parallel prompt's
keys and values) that a merged tuner changes (``modifies()``).
"""
from __future__ import annotations

from typing import Iterable, List, Optional


def _mergeable(tuner, kinds: Optional[Iterable[str]]) -> bool:
    return tuner.mergeable and (kinds is None or tuner.kind in kinds)


def merge_conflicts(vit, kinds: Optional[Iterable[str]] = None) -> List[str]:
    """Why merging ``kinds`` (every mergeable kind when None) would change the outputs; empty when it would not."""
    kinds = None if kinds is None else set(kinds)
    found = []
    for blk in vit.blocks:
        merged = [(n, t) for n, t in blk.tuners() if _mergeable(t, kinds)]
        changed = {p for _, t in merged for p in t.modifies()}
        for name, t in blk.tuners():
            if _mergeable(t, kinds):
                continue
            hit = sorted(set(t.borrows()) & changed)
            if hit:
                by = ', '.join(n for n, m in merged if set(m.modifies()) & set(hit))
                found.append(f'layer {blk.index}: the {t.form} {t.kind} on op {t.op!r} computes the frozen '
                             f'{"/".join(hit)} projection itself, which merging {by} would change')
    return found


def merge_block_tuners(vit, kinds: Optional[Iterable[str]] = None) -> List[str]:
    """Merge every mergeable tuner of ``kinds`` into ``vit``'s frozen weights and detach it; returns the merged
    kinds (one entry per kind). ValueError, with nothing changed, where outputs would change."""
    kinds = None if kinds is None else set(kinds)
    conflicts = merge_conflicts(vit, kinds)
    if conflicts:
        raise ValueError('cannot merge without changing the outputs:\n  ' + '\n  '.join(conflicts))
    merged = []
    for blk in vit.blocks:
        for name, tuner in blk.tuners():
            if _mergeable(tuner, kinds):
                tuner.merge(blk)
                blk.detach(name)
                if tuner.kind not in merged:
                    merged.append(tuner.kind)
    return merged


def has_tuners(vit, kinds: Iterable[str]) -> bool:
    kinds = set(kinds)
    return any(t.kind in kinds for blk in vit.blocks for _, t in blk.tuners())


__all__ = ['has_tuners', 'merge_block_tuners', 'merge_conflicts']
