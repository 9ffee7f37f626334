"""Adapter tuners (Houlsby et al. 2019; parallel form: U-Tuning / AdaptFormer).

``A(z) = W_up act(W_down z + b_down) + b_up`` with ``W_down: C -> r``, ``W_up: r -> C``.

- sequential (the original adapter, as ModelScope's built-in computes it): ``OP'(h) = OP(h) + A(OP(h))``
- parallel (P-Adapter): ``OP'(h) = OP(h) + s * A(h)``; ``W_up`` starts at zero so the tuned model starts
  exactly at the frozen one.

Trainable parameters: ``2 C r + r + C`` plus the scale's (parallel only).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..backbone.vit import make_activation
from .scale import Scale


class Adapter(nn.Module):

    def __init__(self, dim: int, hidden: int, op: str, form: str, act: str = 'gelu', scale: str = 'channel',
                 scale_init: float = 1.0):
        super().__init__()
        self.op, self.form = op, form
        self.down = nn.Linear(dim, hidden)
        self.act = make_activation(act)
        self.up = nn.Linear(hidden, dim)
        if form == 'sequential':
            for lin in (self.down, self.up):  # the built-in's initialisation
                nn.init.xavier_uniform_(lin.weight)
                nn.init.normal_(lin.bias, std=1e-6)
        else:
            nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
            self.scale = Scale(scale, dim, scale_init)

    def adapt(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(z)))

    def forward(self, h: torch.Tensor, y: torch.Tensor, block=None, q=None) -> torch.Tensor:
        """``h``: the OP input, ``y = OP(h)``; both (B, N, C). Returns ``OP'(h)``."""
        if self.form == 'sequential':
            return y + self.adapt(y)
        return y + self.scale(h, self.adapt(h))
