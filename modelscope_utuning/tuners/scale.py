"""Learned output scales ``s`` of the parallel U-Tuners: ``OP'(h) = OP(h) + s * U(h)``.

- ``none``:    s = 1 (no parameter)
- ``scalar``:  s in R (1 parameter)
- ``channel``: s in R^C, broadcast over tokens (C parameters; the default)
- ``input``:   s(h) = h w + b in R^{B x N x 1}, input dependent (C + 1 parameters)
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

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

    def of_projection(self, h: torch.Tensor, a: torch.Tensor, up: nn.Linear, factor: float = 1.0) -> torch.Tensor:
        """``s(h) * factor * up(a)`` for a tuner whose output is a projection ``up`` of a small activation ``a``
        (B, N, r), r << C (an adapter's bottleneck); (B, N, C).

        Why not ``self(h, factor * up(a))``: the gradient of a learned scale s needs ``u = up(a)``, so autograd
        would hold a (B, N, C) tensor per tuner until the backward pass, the largest item of a tuned model's
        training memory (DINOv2 ViT-S/14 at 224 px, batch 8, tri-tuner: 142 of 565 MB; in bypass mode 142 of
        319 MB). In training, the product is recomputed in the backward pass from ``a`` (one r x C matmul per
        tuner), so only ``a`` is held. Same values and gradients; eval and export take the plain path.
        """
        if self.kind in ('channel', 'scalar') and self.training and torch.is_grad_enabled():
            return checkpoint(self._scaled_projection, a, up, factor, use_reentrant=False, preserve_rng_state=False)
        u = up(a)
        return self(h, u if factor == 1.0 else u * factor)

    def _scaled_projection(self, a: torch.Tensor, up: nn.Linear, factor: float) -> torch.Tensor:
        u = up(a)
        return self.weight * (u if factor == 1.0 else u * factor)

    @staticmethod
    def num_params(kind: str, dim: int) -> int:
        return {'none': 0, 'scalar': 1, 'channel': dim, 'input': dim + 1}[kind]
