"""Prompt tuners (VPT, Jia et al. 2022; parallel form: U-Tuning's P-Prompt).

Learnable prompt tokens ``P`` of shape ``(L, C)``.

- sequential (original VPT-deep, block OP only, as the built-in computes it): the tokens join the sequence in
  front of the block; the first prompted layer appends them at the end of the sequence, each later prompted
  layer replaces the previous layer's prompt tokens with its own. They are then processed like image tokens.
- parallel (P-Prompt, any OP): the prompts go through the block's frozen key / value projections and are
  attended by the frozen queries of the OP input:
  ``OP'(h) = OP(h) + s * Attn(W_q h, W_k P + b_k, W_v P + b_v)`` (on the block OP ``W_q norm1(x)``).
  The sequence length never changes, so it composes with any other tuner. ``s`` starts at zero.

Trainable parameters: ``L C`` plus the scale's (parallel only).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from .attention import attend, query_for
from .scale import Scale


class Prompt(nn.Module):

    def __init__(self, dim: int, length: int, op: str, form: str, scale: str = 'channel',
                 scale_init: float = 0.0):
        super().__init__()
        self.op, self.form, self.length = op, form, length
        self.combines_output = form == 'parallel'
        self.tokens = nn.Parameter(torch.empty(1, length, dim))
        nn.init.xavier_uniform_(self.tokens)
        if form == 'parallel':
            self.scale = Scale(scale, dim, scale_init)

    def insert(self, x: torch.Tensor, n_prompt: int) -> Tuple[torch.Tensor, int]:
        """Sequential form: ``(B, N, C) -> (B, N - n_prompt + L, C)``, replacing the previous prompts."""
        if n_prompt:
            x = x[:, :-n_prompt]
        return torch.cat((x, self.tokens.expand(x.shape[0], -1, -1).to(x.dtype)), dim=1), self.length

    def forward(self, h: torch.Tensor, y: torch.Tensor, block=None, q=None) -> torch.Tensor:
        """Parallel form: ``y + s * Attn(W_q h, W_k P, W_v P)``."""
        q = query_for(self.op, h, block, q)
        tokens = self.tokens.to(h.dtype)
        k, v = block.attn.project(tokens, 'k'), block.attn.project(tokens, 'v')
        return y + self.scale(h, attend(q, k, v))
