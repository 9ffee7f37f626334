"""LoRA (Hu et al. 2021): a low-rank update of frozen weights, ``W' = W + (alpha / r) B A``.

- on the mha OP: ``qkv += (alpha/r) B A h`` with ``A: C -> r``, ``B: r -> 3C`` (the built-in's layout,
  one pair for q, k and v together); ``2*... = r C + 3 C r`` parameters.
- on the ffn OP: fc1 and fc2 each get a pair: ``r C + r F`` and ``r F + r C`` (F the MLP width).

``B`` starts at zero. :meth:`merge_into` folds the update into the frozen weights for inference.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def _pair(d_in: int, d_out: int, rank: int):
    a = nn.Linear(d_in, rank, bias=False)
    b = nn.Linear(rank, d_out, bias=False)
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    nn.init.zeros_(b.weight)
    return a, b


class LoRA(nn.Module):
    combines_output = False

    def __init__(self, dim: int, rank: int, op: str, mlp_hidden: int = 0, alpha: float = None):
        super().__init__()
        self.op, self.form, self.rank = op, 'parallel', rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        if op == 'mha':
            self.lora_a, self.lora_b = _pair(dim, 3 * dim, rank)
        else:
            self.fc1_a, self.fc1_b = _pair(dim, mlp_hidden, rank)
            self.fc2_a, self.fc2_b = _pair(mlp_hidden, dim, rank)

    def delta_qkv(self, h: torch.Tensor) -> torch.Tensor:
        return self.lora_b(self.lora_a(h)) * self.scaling

    def delta_fc1(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc1_b(self.fc1_a(h)) * self.scaling

    def delta_fc2(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2_b(self.fc2_a(z)) * self.scaling

    @torch.no_grad()
    def merge_into(self, block) -> None:
        """Add ``(alpha/r) B A`` to the frozen weights of ``block``; the tuner then must be removed."""
        pairs = ([(block.attn.qkv, self.lora_a, self.lora_b)] if self.op == 'mha' else
                 [(block.mlp.fc1, self.fc1_a, self.fc1_b), (block.mlp.fc2, self.fc2_a, self.fc2_b)])
        for linear, a, b in pairs:
            linear.weight += (b.weight @ a.weight).to(linear.weight.dtype) * self.scaling
