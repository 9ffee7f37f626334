"""How the blocks of a :class:`~.vit.VisionTransformer` are run: which rows each block computes, and bypass mode.

Standard mode runs the blocks in order, calling each block's ``tokens`` point first. Rows whose outputs nothing
reads are not computed (they still act as keys / values, so the kept rows are the same numbers):

- under class-token pooling, the last block finishes only the class token;
- rows that the next block's ``tokens`` point will discard (VPT-deep prompts that the next layer replaces).

Bypass mode (Res-Tuning-Bypass style): the frozen backbone runs without autograd and every bypass-capable tuner
reads the detached OP inputs ``h_{l,op}`` beside it. Their terms form a side stream
``b_l = V_l(b_{l-1}) + sum_t s_t U_t(h_{l,op})`` (``V_l`` the layer's vertical tuners, identity when there are
none) that joins the last residual stream: ``x_L + b_L``. Back-propagation never enters the backbone.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .hooks import OPS, TokenState

BYPASS_POINT = 'bypass'  # the hook point of vertical tuners: ``carry(b_prev) -> b``, in bypass mode only


def forward_tokens(vit, x: torch.Tensor, class_token_only: bool = False,
                   layers: Optional[Sequence[int]] = None):
    """Embedded tokens ``(B, N, C)`` -> tokens after the final norm (``(B, 1, C)`` with ``class_token_only``).

    ``layers``: block indices whose outputs are also wanted (dense heads read several depths); then the result is
    ``(final tokens, [tokens after block l, final norm applied, for l in layers])``, from the same single pass."""
    if vit.bypass:
        return forward_bypass(vit, x, class_token_only, layers)
    state = TokenState()
    wanted = set(layers or ())
    collected = {}
    blocks = vit.blocks
    last = len(blocks) - 1
    for i, blk in enumerate(blocks):
        x = blk.edit_tokens(x, state)
        n_out: Optional[int] = None
        if i == last:
            n_out = 1 if class_token_only else None
        else:
            drop = blocks[i + 1].rows_dropped(state)
            if drop:
                n_out = x.shape[1] - drop
                state.appended -= drop  # those rows are gone already
        x = blk(x, n_out)
        if i in wanted and i != last:
            collected[i] = vit.norm(x)
    out = vit.norm(x)
    if layers is None:
        return out
    collected[last] = out
    return out, [collected[i] for i in layers]


def forward_bypass(vit, x: torch.Tensor, class_token_only: bool = False, layers: Optional[Sequence[int]] = None):
    """Bypass mode (see the module docstring). Each block's tuners run right after its frozen step, so only their
    small inputs outlive it. Under class-token pooling the side stream only reaches the class row, so the tuners
    see just that row. ``layers``: as in :func:`forward_tokens`."""
    return forward_bypass_many(vit, x, [vit], class_token_only, layers)[0]


def forward_bypass_many(vit, x: torch.Tensor, tuned: List, class_token_only: bool = False,
                        layers: Optional[Sequence[int]] = None) -> List:
    """Bypass mode for several sets of tuners over one frozen backbone: ``vit``'s frozen blocks run once, and
    each backbone of ``tuned`` (the same frozen weights, its own tuners; ``vit`` itself may be one of them) adds
    its own side stream. Returns each one's tokens after its final norm (with ``layers``: each one's
    ``(final, [tokens after block l: x_l + b_l, normed])``)."""
    n_side = 1 if class_token_only else None
    sides: List[Optional[torch.Tensor]] = [None] * len(tuned)
    wanted = set(layers or ())
    collected: List[dict] = [{} for _ in tuned]
    last = len(vit.blocks) - 1
    for i, blk in enumerate(vit.blocks):
        with torch.no_grad():
            x, contexts = blk.forward_frozen(x, n_out=n_side if i == last else None)
            if n_side is not None and i != last:
                contexts = {op: _rows(ctx, n_side) for op, ctx in contexts.items()}
        for t, other in enumerate(tuned):
            tblk = other.blocks[i]
            side = sides[t]
            if side is not None:
                for tuner in tblk.tuners_at(BYPASS_POINT):
                    side = tuner.carry(side)
            for op in OPS:
                for tuner in tblk.tuners_at(op):
                    d = tuner.delta(contexts[op])
                    side = d if side is None else side + d
            sides[t] = side
            if i in wanted and i != last:
                collected[t][i] = other.norm(x if side is None else x + side)
    x = x if n_side is None else x[:, :n_side]
    finals = [other.norm(x if side is None else x + side) for other, side in zip(tuned, sides)]
    if layers is None:
        return finals
    out = []
    for final, found in zip(finals, collected):
        found[last] = final
        out.append((final, [found[i] for i in layers]))
    return out


def _rows(ctx, n: int):
    from .hooks import OpContext
    q = None if ctx.q is None else ctx.q[:, :, :n].contiguous()
    residual = None if ctx.residual is None else ctx.residual[:, :n].contiguous()
    return OpContext(ctx.op, ctx.h[:, :n].contiguous(), ctx.block, residual, q)
