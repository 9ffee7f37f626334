"""SSF: scaling and shifting the frozen features (Lian et al., NeurIPS 2022; VTAB-1K 75.7 with ViT-B/16).

Every frozen linear layer of the OP gets a learned per-channel scale and shift of its output:
``y' = gamma * y + beta`` with ``y = W x + b``:

- on the mha OP: the query, key / value (the ``q`` and ``kv`` hook points) and output projections (``proj``);
- on the ffn OP: ``fc1`` and ``fc2``;
- on the block OP: all five.

(The paper also scales and shifts after the LayerNorms; their own affine parameters already do that and train with
BitFit-style selection.) ``gamma`` starts at 1 and ``beta`` at 0, so the tuned model starts at the frozen one;
``init_std`` > 0 draws them around those values as the paper does (``N(1, std)``, ``N(0, std)``).

Merging: ``W' = diag(gamma) W``, ``b' = gamma * b + beta``: zero inference overhead. Trainable parameters per
layer: ``2 (3C + C)`` on mha, ``2 (F + C)`` on ffn (F the MLP width), their sum on the block OP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn as nn

from .base import Dims, Tuner, TunerConfig, option, register_tuner

POINTS = {'mha': ('q', 'kv', 'proj'), 'ffn': ('fc1', 'fc2')}
POINTS['block'] = POINTS['mha'] + POINTS['ffn']


def _widths(dims: Dims) -> Dict[str, int]:
    C = dims.embed_dim
    return {'q': C, 'kv': 2 * C, 'proj': C, 'fc1': dims.mlp_hidden, 'fc2': C}


@dataclass(frozen=True)
class SSFConfig(TunerConfig):
    init_std: float = option(0.0, 'spread of the initial scale (around 1) and shift (around 0); 0: the frozen '
                                  'model at the start, the paper uses 0.02', init_only=True)


@register_tuner
class SSF(Tuner):
    kind = 'ssf'
    Config = SSFConfig
    ops = ('mha', 'ffn', 'block')
    default_op = 'block'
    size_required = False
    mergeable = True

    @classmethod
    def num_trainable(cls, spec, size: int, dims: Dims) -> int:
        widths = _widths(dims)
        return sum(2 * widths[p] for p in POINTS[spec.op])

    def __init__(self, spec, size: int, dims: Dims):
        super().__init__(spec, size, dims)
        self.points = POINTS[self.op]
        std = float(spec.init_std)
        widths = _widths(dims)
        self.scale = nn.ParameterDict({p: nn.Parameter(1.0 + std * torch.randn(widths[p])) for p in self.points})
        self.shift = nn.ParameterDict({p: nn.Parameter(std * torch.randn(widths[p])) for p in self.points})

    def edit_linear(self, point: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale[point] + self.shift[point]

    def modifies(self) -> Tuple[str, ...]:
        out = []
        for p in self.points:
            out += ['q'] if p == 'q' else ['k', 'v'] if p == 'kv' else [p]
        return tuple(out)

    @torch.no_grad()
    def merge(self, block) -> None:
        """``W <- diag(gamma) W``, ``b <- gamma b + beta`` on each linear (qkv rows for q / kv)."""
        C = block.attn.qkv.in_features
        targets = {'q': (block.attn.qkv, slice(0, C)), 'kv': (block.attn.qkv, slice(C, 3 * C)),
                   'proj': (block.attn.proj, slice(None)), 'fc1': (block.mlp.fc1, slice(None)),
                   'fc2': (block.mlp.fc2, slice(None))}
        for p in self.points:
            linear, rows = targets[p]
            if linear.bias is None and bool(self.shift[p].any()):
                raise ValueError(f'layer {block.index}: SSF on {p} has a shift, but the frozen linear has no bias '
                                 'to take it (qkv_bias false): it cannot merge')
        for p in self.points:
            linear, rows = targets[p]
            gamma, beta = self.scale[p].to(linear.weight.dtype), self.shift[p].to(linear.weight.dtype)
            linear.weight[rows] *= gamma[:, None]
            if linear.bias is not None:
                linear.bias[rows] = linear.bias[rows] * gamma + beta

    def no_weight_decay(self) -> set:
        return {n for n, _ in self.named_parameters()}

    def extra_repr(self) -> str:
        return f'op={self.op}, points={self.points}'
