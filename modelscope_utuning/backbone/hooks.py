"""The contract between a :class:`~.vit.Block` and the tuners attached to it.

A block computes, for tokens ``x`` of shape ``(B, N, C)`` (brackets: the hook points)::

    [tokens]   x  -> x'            before the block: may change N (VPT-deep prompts; run by VisionTransformer.forward_blocks)
    h1 = norm1(x)
    [mha.in]   h1 -> h1'           the input the frozen attention sees (RepAdapter)
    q  = W_q h1'   [q]  q  -> q'   a frozen projection's output (LoRA, SSF); kv = W_kv h1' [kv] likewise
    [extra_kv] (k, v) += (K_pre, V_pre)   extra keys and values (the original prefix)
    o  = W_o Attn(q, k, v)  [proj] o -> o'
    [mha]      m = ls1(o') -> m'   the mha OP's output (parallel tuners: m + s U(h1); sequential adapter)
    y  = x + m'
    h2 = norm2(y)  [ffn.in]  h2 -> h2'
    z  = fc1 h2'  [fc1] ;  f = fc2 act(z)  [fc2]
    [ffn]      f = ls2(f) -> f'    the ffn OP's output
    out = y + f'
    [block]    out -> out'         the block OP's output (tuners on the whole block, reading x)

In bypass mode the frozen block runs alone and :mod:`.bypass` calls ``delta`` of the tuners at the OP points and
``carry`` of those at ``bypass`` (see :mod:`.bypass`).

Each hook point has one method on :class:`TunerHooks` (the tuner base class implements the ones it uses and
lists them in ``points``). The block calls the tuners registered at a point in the order they were attached;
it never asks what kind of tuner it holds. An OP combiner gets an :class:`OpContext`: the OP input, the residual
stream the output joins, the attention's query when it is the frozen ``W_q norm1(x)``, and the frozen parts of the
block a tuner may borrow (the attention's projections, ``norm1``, the OP's layer scale), passed in by the block
(:meth:`~.block.Block.op_context`). This module imports nothing of the backbone: it is the contract both sides
read.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Tuple

import torch

OPS = ('mha', 'ffn', 'block')
LINEAR_POINTS = ('q', 'kv', 'proj', 'fc1', 'fc2')
INPUT_POINTS = ('mha.in', 'ffn.in')
POINTS = ('tokens',) + INPUT_POINTS + LINEAR_POINTS + ('extra_kv',) + OPS + ('bypass',)
# Points whose tuners change what the frozen attention computes: the attention's own q is then not W_q h.
CHANGES_QUERY = ('mha.in', 'q')


class OpContext:
    """What an OP combiner may read.

    - ``op``: 'mha', 'ffn' or 'block'; ``h`` (B, n, C): the OP input (on the block OP the block input x);
    - ``residual`` (B, n, C): the stream the OP output is added to (x for mha / block, y for ffn), or None when
      the OP runs alone;
    - ``q`` (B, H, n, d): the attention's query, on the mha OP the OP's own however the tuners computed it, on the
      block OP only when it is the frozen ``W_q norm1(x)``, else None;
    - ``project(t, which)``: the block's frozen attention projection ``which`` in 'q', 'k', 'v' of normalised
      tokens t (B, L, C) -> (B, H, L, d); ``norm``: the block's ``norm1``; ``gamma`` (C,): the OP's layer scale,
      or None (no layer scale, or the block OP).

    Rows: the n rows the block is computing."""

    __slots__ = ('op', 'h', 'residual', 'q', 'project', 'norm', 'gamma', '_rms')

    def __init__(self, op: str, h: torch.Tensor, residual: Optional[torch.Tensor], q: Optional[torch.Tensor],
                 project: Callable[[torch.Tensor, str], torch.Tensor], norm: Callable[[torch.Tensor], torch.Tensor],
                 gamma: Optional[torch.Tensor] = None):
        self.op, self.h, self.residual, self.q = op, h, residual, q
        self.project, self.norm, self.gamma = project, norm, gamma
        self._rms = None

    def query(self) -> torch.Tensor:
        """The MHA query of the OP input split into heads (B, H, n, d): on the mha OP the attention's own q; on the
        others the frozen ``W_q h`` (on the block OP of ``norm1(x)``, since the projection was trained on normalised
        tokens), reusing the attention's q when it is exactly that."""
        if self.q is not None and self.op in ('mha', 'block'):
            return self.q
        return self.project(self.norm(self.h) if self.op == 'block' else self.h, 'q')

    def residual_rms(self) -> torch.Tensor:
        """Per-token root-mean-square of the residual stream, ``(B, n, 1)``, without gradient (computed once);
        1 when the OP runs alone, without a residual stream."""
        if self.residual is None:
            return torch.ones((), dtype=self.h.dtype, device=self.h.device)
        if self._rms is None:
            r = self.residual.detach()
            self._rms = r.float().pow(2).mean(-1, keepdim=True).add_(1e-12).sqrt_().to(r.dtype)
        return self._rms

    def layer_scale(self) -> Optional[torch.Tensor]:
        """The OP's layer-scale ``gamma`` (C,), or None (no layer scale, or the block OP)."""
        return self.gamma


class TokenState:
    """Carried from block to block by ``forward_blocks``: how many trailing rows the last ``tokens`` edit appended."""

    __slots__ = ('appended',)

    def __init__(self):
        self.appended = 0


class TunerHooks:
    """The hook methods; a tuner overrides those named in its ``points`` (the defaults are never called)."""

    points: Tuple[str, ...] = ()

    def edit_tokens(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        """``tokens``: ``(B, N, C) -> (B, N', C)``; update ``state.appended``."""
        raise NotImplementedError

    def drops_rows(self, state: TokenState) -> int:
        """``tokens``: how many trailing rows of its input :meth:`edit_tokens` will discard (``forward_blocks`` then
        skips computing them in the block before)."""
        return 0

    def edit_input(self, point: str, h: torch.Tensor) -> torch.Tensor:
        """``mha.in`` / ``ffn.in``: the frozen OP's input ``h -> h'``."""
        raise NotImplementedError

    def edit_linear(self, point: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``q`` / ``kv`` / ``proj`` / ``fc1`` / ``fc2``: a frozen linear's output ``y = W x + b -> y'``."""
        raise NotImplementedError

    def extra_kv(self, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``extra_kv``: keys and values ``(B, H, L, d)`` appended to the attention's own."""
        raise NotImplementedError

    def combine(self, ctx: OpContext, y: torch.Tensor) -> torch.Tensor:
        """``mha`` / ``ffn`` / ``block``: the OP output ``y -> y'``."""
        raise NotImplementedError

    def carry(self, side: torch.Tensor) -> torch.Tensor:
        """``bypass`` (bypass mode only): the side stream from the layer before, ``b_{l-1} -> V_l(b_{l-1})``."""
        raise NotImplementedError

    def delta(self, ctx: OpContext) -> torch.Tensor:
        """Bypass mode: this tuner's additive term ``s U(h)`` alone (only tuners whose ``combine`` is
        ``y + delta``)."""
        raise NotImplementedError


class HookTable:
    """Point -> names of the block's child tuners registered there, in attachment order."""

    def __init__(self):
        self._points = {p: [] for p in POINTS}
        self.names: List[str] = []  # every registered tuner, in attachment order

    def add(self, name: str, points: Iterable[str]) -> None:
        self.names.append(name)
        for p in points:
            if p not in self._points:
                raise ValueError(f'unknown hook point {p!r}; expected one of {POINTS}')
            self._points[p].append(name)

    def remove(self, name: str) -> None:
        self.names = [n for n in self.names if n != name]
        for names in self._points.values():
            while name in names:
                names.remove(name)

    def at(self, point: str) -> List[str]:
        return self._points[point]

    def any(self, points: Iterable[str]) -> bool:
        return any(self._points[p] for p in points)
