"""Shared attention arithmetic of the prefix and prompt tuners (heads split as (B, H, N, d))."""
from __future__ import annotations

import torch

from ..backbone import kernels


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, L, C) -> (B, H, L, C/H)``."""
    B, L, C = t.shape
    return t.view(B, L, num_heads, C // num_heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, d) -> (B, N, H*d)``."""
    B, H, N, d = t.shape
    return t.transpose(1, 2).reshape(B, N, H * d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` per head, merged back to ``(B, N, C)``.

    k, v may have batch size 1 (shared learned tokens); they are broadcast over the batch of q.
    """
    if k.shape[0] != q.shape[0]:
        k = k.expand(q.shape[0], -1, -1, -1)
        v = v.expand(q.shape[0], -1, -1, -1)
    return merge_heads(kernels.attention(q, k.to(q.dtype), v.to(q.dtype)))
