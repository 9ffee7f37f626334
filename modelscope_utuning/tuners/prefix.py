"""Prefix tuners (Li & Liang 2021; parallel form: U-Tuning's P-Prefix).

Learnable keys and values ``K_pre, V_pre`` of shape ``(L, C)``, split into H heads of width d = C/H.

- sequential (original; mha OP only, as the built-in computes it): they are concatenated to the MHA's own keys
  and values, ``Attn(Q, [K; K_pre], [V; V_pre])``. Per query this equals
  ``(1 - lambda) Attn(Q, K, V) + lambda Attn(Q, K_pre, V_pre)`` with
  ``lambda = sum_j exp(q k_pre_j / sqrt d) / (sum_i exp(q k_i / sqrt d) + sum_j exp(q k_pre_j / sqrt d))``.
- parallel (P-Prefix, any OP): the mixing weight lambda becomes a free learned scale s and the prefix attention
  runs beside the OP: ``OP'(h) = OP(h) + s * Attn(Q, K_pre, V_pre)``, ``Q = W_q h`` through the block's frozen
  MHA query projection (on the block OP: ``W_q norm1(x)``). No output projection is applied to the prefix
  branch: ``V_pre`` is learned, so a fixed projection would add cost and nothing else. ``V_pre`` starts at zero.

Trainable parameters: ``2 L C`` plus the scale's (parallel only).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from .attention import attend, query_for, split_heads
from .scale import Scale


class Prefix(nn.Module):

    def __init__(self, dim: int, num_heads: int, length: int, op: str, form: str, scale: str = 'channel',
                 scale_init: float = 1.0):
        super().__init__()
        self.op, self.form, self.num_heads = op, form, num_heads
        self.combines_output = form == 'parallel'
        self.key = nn.Parameter(torch.empty(1, length, dim))
        self.value = nn.Parameter(torch.empty(1, length, dim))
        nn.init.xavier_uniform_(self.key)
        if form == 'sequential':
            nn.init.xavier_uniform_(self.value)
        else:
            nn.init.zeros_(self.value)
            self.scale = Scale(scale, dim, scale_init)

    def extra_kv(self, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sequential form: the prefix keys / values as (B, H, L, d), to concatenate inside the MHA."""
        k = split_heads(self.key, self.num_heads).expand(batch, -1, -1, -1)
        v = split_heads(self.value, self.num_heads).expand(batch, -1, -1, -1)
        return k, v

    def forward(self, h: torch.Tensor, y: torch.Tensor, block=None, q=None) -> torch.Tensor:
        """Parallel form: ``y + s * Attn(W_q h, K_pre, V_pre)``."""
        q = query_for(self.op, h, block, q)
        u = attend(q, split_heads(self.key, self.num_heads), split_heads(self.value, self.num_heads))
        return y + self.scale(h, u)
