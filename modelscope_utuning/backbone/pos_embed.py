"""Resampling of absolute position embeddings when a checkpoint's patch grid differs from the model's."""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F


def resample_abs_pos_embed(pos_embed: torch.Tensor, new_grid: Tuple[int, int], num_prefix_tokens: int = 1,
                           mode: str = 'bicubic') -> torch.Tensor:
    """``(1, P + g*g, C) -> (1, P + H'*W', C)``: prefix (class) tokens kept, the square grid interpolated."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f'pos_embed of shape (1, N, C) expected, got {tuple(pos_embed.shape)}')
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = grid.shape[1]
    side = int(math.isqrt(n))
    if side * side != n:
        raise ValueError(f'pos_embed has {n} grid tokens after {num_prefix_tokens} prefix tokens; '
                         'a square grid is expected')
    if (side, side) == tuple(new_grid):
        return pos_embed
    C = grid.shape[-1]
    grid = grid.reshape(1, side, side, C).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, align_corners=False, antialias=mode != 'nearest')
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], C).to(pos_embed.dtype)
    return torch.cat((prefix, grid), dim=1)
