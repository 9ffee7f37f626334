"""Learned output scales ``s`` of the parallel U-Tuners: ``OP'(h) = OP(h) + s * U(h)``.

- ``none``:    s = 1 (no parameter)
- ``scalar``:  s in R (1 parameter)
- ``channel``: s in R^C, broadcast over tokens (C parameters; the default)
- ``input``:   s(h) = h w + b in R^{B x N x 1}, input dependent (C + 1 parameters)
"""
from __future__ import annotations

import torch
import torch.nn as nn

SCALES = ('none', 'scalar', 'channel', 'input')


class Scale(nn.Module):

    def __init__(self, kind: str, dim: int, init: float = 1.0):
        super().__init__()
        if kind not in SCALES:
            raise ValueError(f'scale={kind!r}: expected one of {SCALES}')
        self.kind = kind
        if kind == 'scalar':
            self.weight = nn.Parameter(torch.full((1,), float(init)))
        elif kind == 'channel':
            self.weight = nn.Parameter(torch.full((dim,), float(init)))
        elif kind == 'input':
            self.gate = nn.Linear(dim, 1)
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, float(init))

    def forward(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``s(h) * u`` for tuner input ``h`` and tuner output ``u`` (both (B, N, C))."""
        if self.kind == 'none':
            return u
        if self.kind == 'input':
            return self.gate(h) * u
        return self.weight * u

    @staticmethod
    def num_params(kind: str, dim: int) -> int:
        return {'none': 0, 'scalar': 1, 'channel': dim, 'input': dim + 1}[kind]
