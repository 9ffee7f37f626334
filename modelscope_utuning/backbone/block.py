"""A pre-norm Transformer block whose steps are the hook points of tuners (:mod:`.hooks`), and its frozen step for
bypass mode (:class:`FrozenStep`)."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from .hooks import CHANGES_QUERY, HookTable, OpContext, TokenState
from .layers import Attention, DropPath, LayerScale, Mlp


class Block(nn.Module):
    """Pre-norm Transformer block whose steps are hook points for tuners (see :mod:`.hooks`).

    Tuners are child modules (named by whoever attaches them, e.g. ``mha_adapter``) registered at the hook points
    they declare in ``tuner.points``; the block calls them there, in attachment order, and knows nothing else
    about them. The three OPs::

        mha(h)   = ls1(Attn(h))            with h = norm1(x)
        ffn(h)   = ls2(MLP(h))             with h = norm2(y)
        block(x) = the whole residual block
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 init_values: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, act: str = 'gelu', norm_eps: float = 1e-6, index: int = 0):
        super().__init__()
        self.index = index
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act, drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.set_drop_path(drop_path)
        self.hooks = HookTable()

    def set_drop_path(self, p: float) -> None:
        """Stochastic depth with probability ``p`` on the mha and ffn branches (the OP with its tuners); 0: none."""
        self.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
        self.drop_path2 = DropPath(p) if p > 0 else nn.Identity()

    # -- tuners ---------------------------------------------------------------------------------------------------
    def attach(self, name: str, tuner: nn.Module) -> None:
        """Add ``tuner`` as child ``name`` and register it at the hook points it declares."""
        if name in self._modules:
            raise ValueError(f'layer {self.index}: a tuner named {name!r} is already attached')
        self.add_module(name, tuner)
        self.hooks.add(name, tuner.points)

    def detach(self, name: str) -> nn.Module:
        """Remove the tuner ``name`` (e.g. after merging it into the frozen weights); returns it."""
        tuner = self._modules.pop(name)
        self.hooks.remove(name)
        return tuner

    def tuners(self):
        """``(name, tuner)`` of every attached tuner, in attachment order."""
        return [(n, self._modules[n]) for n in self.hooks.names]

    def tuners_at(self, point: str) -> list:
        """The tuners registered at ``point``, in attachment order."""
        return [self._modules[n] for n in self.hooks.at(point)]

    def _edit_linear(self, point: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for t in self.tuners_at(point):
            y = t.edit_linear(point, x, y)
        return y

    def _combine(self, ctx: OpContext, y: torch.Tensor) -> torch.Tensor:
        for t in self.tuners_at(ctx.op):
            y = t.combine(ctx, y)
        return y

    def edit_tokens(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        """The ``tokens`` point, before the block: may change the number of tokens."""
        for t in self.tuners_at('tokens'):
            x = t.edit_tokens(x, state)
        return x

    def rows_dropped(self, state: TokenState) -> int:
        """How many trailing rows the ``tokens`` point of this block will discard from its input."""
        return max((t.drops_rows(state) for t in self.tuners_at('tokens')), default=0)

    # -- the computation --------------------------------------------------------------------------------------------
    def attention(self, h: torch.Tensor, n: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``Attn(h)`` through the ``q``, ``kv``, ``extra_kv`` and ``proj`` points, for the first n rows as queries
        (every row is a key / value) -> (output (B, n, C), the query (B, H, n, d))."""
        N = h.shape[1]
        n = N if n is None else n
        q, kv = self.attn.project_qkv(h, n)
        if self.hooks.at('q'):
            q = self._edit_linear('q', h if n == N else h[:, :n].contiguous(), q)
        if self.hooks.at('kv'):
            kv = self._edit_linear('kv', h, kv)
        extra = [t.extra_kv(h.shape[0]) for t in self.tuners_at('extra_kv')]
        out, q = self.attn.attend(q, kv, extra)
        o = self.attn.proj(out)
        if self.hooks.at('proj'):
            o = self._edit_linear('proj', out, o)
        return self.attn.proj_drop(o), q

    def mlp_out(self, h: torch.Tensor) -> torch.Tensor:
        """``MLP(h)`` through the ``fc1`` and ``fc2`` points."""
        mlp = self.mlp
        z = mlp.fc1(h)
        if self.hooks.at('fc1'):
            z = self._edit_linear('fc1', h, z)
        a = mlp.drop1(mlp.act(z))
        f = mlp.fc2(a)
        if self.hooks.at('fc2'):
            f = self._edit_linear('fc2', a, f)
        return mlp.drop2(f)

    def _input(self, point: str, h: torch.Tensor) -> torch.Tensor:
        for t in self.tuners_at(point):
            h = t.edit_input(point, h)
        return h

    def op_context(self, op: str, h: torch.Tensor, residual: Optional[torch.Tensor],
                   q: Optional[torch.Tensor] = None) -> OpContext:
        """What a tuner on ``op`` reads (:class:`~.hooks.OpContext`): the OP input ``h``, the ``residual`` stream,
        the query ``q``, and the frozen parts of this block it may borrow."""
        ls = {'mha': self.ls1, 'ffn': self.ls2}.get(op)
        return OpContext(op, h, residual, q, self.attn.project, self.norm1, getattr(ls, 'gamma', None))

    def _frozen_q(self, q: torch.Tensor) -> Optional[torch.Tensor]:
        return None if self.hooks.any(CHANGES_QUERY) else q

    def forward(self, x: torch.Tensor, n_out: Optional[int] = None) -> torch.Tensor:
        """``(B, N, C) -> (B, n_out, C)``: the outputs of the first ``n_out`` tokens (all by default).

        Every token still serves as key / value, so the kept rows equal the full block's rows; the others skip
        the query, attention output, projection, FFN and tuners.
        """
        h1 = self.norm1(x)
        out, q = self.attention(self._input('mha.in', h1), n_out)
        x_n = x if n_out is None else x[:, :n_out].contiguous()
        m = self.ls1(out)
        if self.hooks.at('mha'):  # tuners on the mha OP read the OP's own query, whatever computed it
            h1_n = h1 if n_out is None else h1[:, :n_out].contiguous()
            m = self._combine(self.op_context('mha', h1_n, x_n, q), m)
        q = self._frozen_q(q)
        y = x_n + self.drop_path1(m)
        h2 = self.norm2(y)
        f = self.ls2(self.mlp_out(self._input('ffn.in', h2)))
        if self.hooks.at('ffn'):
            f = self._combine(self.op_context('ffn', h2, y), f)
        out = y + self.drop_path2(f)
        if self.hooks.at('block'):
            out = self._combine(self.op_context('block', x_n, x_n, q), out)
        return out

    def forward_frozen(self, x: torch.Tensor, n_out: Optional[int] = None) -> FrozenStep:
        """The frozen block alone (no hook is called): its output for the first ``n_out`` tokens and the OP inputs
        that tuners running beside the backbone read (bypass mode), as a :class:`FrozenStep`."""
        h1 = self.norm1(x)
        q, kv = self.attn.project_qkv(h1, n_out)
        out, q = self.attn.attend(q, kv)
        x_n = x if n_out is None else x[:, :n_out].contiguous()
        y = x_n + self.ls1(self.attn.proj(out))
        h2 = self.norm2(y)
        out = y + self.ls2(self.mlp(h2))
        h1_n = h1 if n_out is None else h1[:, :n_out].contiguous()
        return FrozenStep(x_n, h1_n, q, y, h2, out)

    def frozen_path_is_random(self, training: Optional[bool] = None) -> bool:
        """Whether :meth:`forward_frozen` draws random numbers (dropout) in training mode (``training=True``), in
        evaluation mode (False) or in the mode it is in now (None)."""
        if not (self.training if training is None else training):
            return False
        return self.attn.attn_drop > 0 or any(m.p > 0 for m in self.mlp.modules() if isinstance(m, nn.Dropout))


class FrozenStep(NamedTuple):
    """One frozen block's results in bypass mode, for the ``n`` rows the side stream reads.

    ``x`` (B, n, C) the block input (the residual of the mha and block OPs, the block OP's input); ``h1 = norm1(x)``
    the mha OP's input; ``q`` (B, H, n, d) the frozen query ``W_q h1``; ``y = x + mha(h1)`` the ffn OP's residual;
    ``h2 = norm2(y)`` the ffn OP's input; ``out`` the block output (the next block's input, all its rows). A step
    read back from a feature cache holds only the fields its readers need; the others are None."""
    x: Optional[torch.Tensor]
    h1: Optional[torch.Tensor]
    q: Optional[torch.Tensor]
    y: Optional[torch.Tensor]
    h2: Optional[torch.Tensor]
    out: Optional[torch.Tensor]

    def context(self, op: str, block: 'Block') -> OpContext:
        """The :class:`OpContext` a tuner on ``op`` reads."""
        if op == 'mha':
            return block.op_context('mha', self.h1, self.x, self.q)
        if op == 'ffn':
            return block.op_context('ffn', self.h2, self.y)
        return block.op_context('block', self.x, self.x, self.q)

    def rows(self, n: int) -> 'FrozenStep':
        """The first ``n`` rows of every OP input (``out`` kept whole: the next block reads all of it)."""
        def cut(t, dim=1):
            return None if t is None else t.narrow(dim, 0, n).contiguous()
        return FrozenStep(cut(self.x), cut(self.h1), cut(self.q, 2), cut(self.y), cut(self.h2), self.out)


# The fields of a FrozenStep that the tuners on each OP read.
OP_FIELDS = {'mha': ('h1', 'x', 'q'), 'ffn': ('h2', 'y'), 'block': ('x', 'q')}
