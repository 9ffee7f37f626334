"""RepAdapter: a linear adapter that re-parameterises into the frozen weights (Luo et al. 2023; VTAB-1K 76.1 with
ViT-B/16).

It sits beside the identity on the OP's input, before the OP's first frozen linear layer (the ``mha.in`` /
``ffn.in`` hook points):

    h' = h + s * U(h),    U(h) = W_up (W_down h + b_down) + b_up

with ``W_down: C -> r`` and a group-wise ``W_up: r -> C`` (``groups`` blocks, block-diagonal), and no activation:
U is linear, so the OP's first linear ``W`` (qkv on mha, fc1 on ffn) absorbs it,

    W h' + b = W (I + s W_up W_down) h + (b + s W (W_up b_down + b_up)),

and :meth:`RepAdapter.merge` folds it in: zero inference overhead. The parallel tuners of the same OP still read
the OP input h. ``W_up`` and ``b_up`` start at zero, so the tuned model starts at the frozen one; h is the
normalised OP input, so the branch is in the units the frozen layer was trained on.

Trainable parameters per layer: ``C r + r + r C / groups + C``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Dims, Tuner, TunerConfig, option, register_tuner


@dataclass(frozen=True)
class RepAdapterConfig(TunerConfig):
    groups: int = option(2, 'block-diagonal groups of W_up (the paper uses 2); dim and the width must divide')
    scaling: float = option(1.0, 'the fixed scale s of the branch')


@register_tuner
class RepAdapter(Tuner):
    kind = 'repadapter'
    Config = RepAdapterConfig
    ops = ('mha', 'ffn')
    default_op = 'ffn'
    size_keys = ('dim',)
    mergeable = True

    @classmethod
    def check(cls, spec) -> None:
        g = spec.groups
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            spec.fail(f'groups must be a positive integer, got {g!r}')
        bad = sorted({s for s in spec.sizes if s and s % g}) + ([spec.embed_dim] if spec.embed_dim % g else [])
        if bad:
            spec.fail(f'groups={g} must divide dim and the backbone width {spec.embed_dim} (not {bad})')
        if isinstance(spec.scaling, bool) or not isinstance(spec.scaling, (int, float)):
            spec.fail(f'scaling must be a number, got {spec.scaling!r}')

    @classmethod
    def num_trainable(cls, spec, size: int, dims: Dims) -> int:
        C = dims.embed_dim
        return C * size + size + size * C // spec.groups + C

    def __init__(self, spec, size: int, dims: Dims):
        super().__init__(spec, size, dims)
        C, g = dims.embed_dim, spec.groups
        self.groups, self.scaling = g, float(spec.scaling)
        self.down = nn.Linear(C, size)
        self.up_weight = nn.Parameter(torch.zeros(g, C // g, size // g))  # block-diagonal W_up
        self.up_bias = nn.Parameter(torch.zeros(C))
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        self.points = (f'{self.op}.in',)

    def up_dense(self) -> torch.Tensor:
        """The block-diagonal ``W_up`` as a dense (C, r) matrix."""
        return torch.block_diag(*self.up_weight.unbind(0))

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        z = self.down(h)
        B, N, r = z.shape
        g = self.groups
        u = torch.einsum('bngr,gcr->bngc', z.view(B, N, g, r // g), self.up_weight).reshape(B, N, -1)
        return u + self.up_bias

    def edit_input(self, point: str, h: torch.Tensor) -> torch.Tensor:
        return h + self.scaling * self.branch(h)

    def modifies(self) -> Tuple[str, ...]:
        return ('q', 'k', 'v') if self.op == 'mha' else ('fc1',)

    @torch.no_grad()
    def merge(self, block) -> None:
        """``W <- W (I + s W_up W_down)``, ``b <- b + s W (W_up b_down + b_up)`` on qkv (mha) or fc1 (ffn)."""
        linear = block.attn.qkv if self.op == 'mha' else block.mlp.fc1
        up = self.up_dense().to(torch.float64)
        offset = self.scaling * (up @ self.down.bias.double() + self.up_bias.double())
        if linear.bias is None and bool(offset.any()):
            raise ValueError(f'layer {block.index}: the RepAdapter before {self.op} has an offset, but the frozen '
                             'linear has no bias to take it (qkv_bias false): it cannot merge')
        w = linear.weight.double()
        if linear.bias is not None:
            linear.bias += F.linear(offset, w).to(linear.bias.dtype)
        linear.weight.copy_((w + self.scaling * (w @ up) @ self.down.weight.double()).to(linear.weight.dtype))

    def extra_repr(self) -> str:
        return f'op={self.op}, dim={self.size}, groups={self.groups}, scaling={self.scaling:g}'
