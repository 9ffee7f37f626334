"""Bypass mode (Res-Tuning-Bypass style): the frozen backbone runs without autograd, the tuners run beside it.

Every bypass-capable tuner reads the detached OP inputs ``h_{l,op}`` of the frozen pass (a :class:`~.vit.FrozenStep`
per block). Their terms form a side stream ``b_l = V_l(b_{l-1}) + sum_t s_t U_t(h_{l,op})`` (``V_l`` the layer's
vertical tuners, identity when there are none) that joins the last residual stream: ``x_L + b_L``.
Back-propagation never enters the backbone.

Because the frozen pass does not depend on the tuners, it can be

- shared: several sets of tuners over the same frozen weights (several tasks) read one pass;
- cached: a :class:`~.feature_cache.FrozenFeatureCache` on the ViT returns the steps of images it has seen
  (training epochs after the first read them instead of recomputing them).
"""
from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from .hooks import OPS
from .block import OP_FIELDS, FrozenStep

BYPASS_POINT = 'bypass'  # the hook point of vertical tuners: ``carry(b_prev) -> b``, in bypass mode only


def fields_needed(vit, tuned: Sequence, layers: Optional[Sequence[int]]) -> Tuple[Tuple[str, ...], ...]:
    """Per block, the :class:`~.vit.FrozenStep` fields that the tuners of ``tuned`` and the wanted outputs read
    (``out`` at the layers in ``layers`` and at the last block)."""
    wanted = set(layers or ()) | {len(vit.blocks) - 1}
    needs = []
    for i in range(len(vit.blocks)):
        fields = set()
        for other in tuned:
            for op in OPS:
                if other.blocks[i].tuners_at(op):
                    fields.update(OP_FIELDS[op])
        if i in wanted:
            fields.add('out')
        needs.append(tuple(sorted(fields)))
    return tuple(needs)


def live_steps(vit, images: torch.Tensor, n_side: Optional[int]) -> Iterator[FrozenStep]:
    """The frozen pass, one block at a time (each step's inputs only outlive it if a reader keeps them). Under
    ``n_side`` the OP inputs are cut to the first ``n_side`` rows (the last block computes only those)."""
    with torch.no_grad():
        x = vit.embed(images)
    last = len(vit.blocks) - 1
    for i, blk in enumerate(vit.blocks):
        with torch.no_grad():  # entered per step: a generator must not leave grad mode off while its reader runs
            step = blk.forward_frozen(x, n_out=n_side if i == last else None)
            if n_side is not None and i != last:
                step = step.rows(n_side)
        x = step.out
        yield step


def frozen_steps(vit, images: torch.Tensor, n_side: Optional[int], needs) -> Iterable[FrozenStep]:
    """The frozen pass over ``images``: from the ViT's feature cache when it holds them, else computed."""
    cache = getattr(vit, 'feature_cache', None)
    if cache is None:
        return live_steps(vit, images, n_side)
    return cache.steps(vit, images, (n_side, needs), lambda some: live_steps(vit, some, n_side))


def forward_bypass(vit, images: torch.Tensor, tuned: List, class_token_only: bool = False,
                   layers: Optional[Sequence[int]] = None) -> List:
    """Images ``(B, 3, H, W)`` -> for each backbone of ``tuned`` (the same frozen weights as ``vit``, its own tuners;
    ``vit`` itself may be one of them) its tokens after its final norm, ``(B, N, C)`` (``(B, 1, C)`` under
    ``class_token_only``: the side stream then only reaches the class row, so the tuners see just that row). With
    ``layers``: each one's ``(final, [tokens after block l: x_l + b_l, normed, for l in layers])``.

    ``vit``'s frozen blocks run once; each tuner runs right after the frozen step it reads, so only its small
    inputs outlive that step."""
    n_side = 1 if class_token_only else None
    needs = fields_needed(vit, tuned, layers)
    sides: List[Optional[torch.Tensor]] = [None] * len(tuned)
    wanted = set(layers or ())
    collected: List[dict] = [{} for _ in tuned]
    last = len(vit.blocks) - 1
    x = None
    for i, step in enumerate(frozen_steps(vit, images, n_side, needs)):
        blk = vit.blocks[i]
        x = step.out
        contexts = {}
        for t, other in enumerate(tuned):
            tblk = other.blocks[i]
            side = sides[t]
            if side is not None:
                for tuner in tblk.tuners_at(BYPASS_POINT):
                    side = tuner.carry(side)
            for op in OPS:
                for tuner in tblk.tuners_at(op):
                    if op not in contexts:
                        contexts[op] = step.context(op, blk)
                    d = tuner.delta(contexts[op])
                    side = d if side is None else side + d
            sides[t] = side
            if i in wanted and i != last:
                collected[t][i] = other.norm(x if side is None else x + side)
    finals = [other.norm(x if side is None else x + side) for other, side in zip(tuned, sides)]
    if layers is None:
        return finals
    out = []
    for final, found in zip(finals, collected):
        found[last] = final
        out.append((final, [found[i] for i in layers]))
    return out
