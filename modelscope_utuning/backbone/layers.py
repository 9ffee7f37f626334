"""The frozen ViT's parts below the block: activations, patch embedding, layer scale, stochastic depth, attention
and MLP (timm's names, so timm / ModelScope checkpoints load by name)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import kernels
from .linear import FrozenFastLinear, QKVLinear, linear


class QuickGELU(nn.Module):
    """CLIP's activation: ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {'gelu': nn.GELU, 'quick_gelu': QuickGELU, 'relu': nn.ReLU, 'silu': nn.SiLU}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f'act={name!r} is not supported; expected one of {sorted(ACTIVATIONS)}')
    return ACTIVATIONS[name]()



class PatchEmbed(nn.Module):
    """``(B, 3, H, W) -> (B, H/p * W/p, C)`` by a stride-p convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f'images of shape (B, 3, {self.img_size[0]}, {self.img_size[1]}) expected, '
                             f'got {tuple(x.shape)}')
        return self.proj(x).flatten(2).transpose(1, 2)


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` (CaiT / DINOv2)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p, rescale the rest by 1/(1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    ``q, k, v = split(W_qkv h + b)`` per head (B, H, N, d); ``Attn = softmax(q k^T / sqrt(d)) v``; output
    ``W_o concat_h(Attn) + b_o``. The block drives it step by step (:meth:`Block.attention`) so that tuners can
    act between the steps; :meth:`project` lets parallel tuners borrow the frozen projections.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed_dim={dim} must be divisible by num_heads={num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = QKVLinear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = FrozenFastLinear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, N, C) -> (B, H, N, d)``."""
        B, N, _ = t.shape
        return t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def project_qkv(self, h: torch.Tensor, n_query: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(q (B, n, C), kv (B, N, 2C))`` for the first ``n_query`` rows as queries (all by default).

        ``self.qkv`` is our :class:`QKVLinear` (two products, see there) unless another library replaced it with a
        wrapper of its own (ms-swift's LoRA ``MergedLinear``, a peft LoRA layer), which computes the fused
        ``(B, N, 3C)`` as any linear does; that output is split here.
        """
        if isinstance(self.qkv, QKVLinear):
            return self.qkv.split(h, n_query)
        fused = self.qkv(h)
        C = self.num_heads * self.head_dim
        n = h.shape[1] if n_query is None else n_query
        return fused[:, :n, :C], fused[:, :, C:]

    def project(self, h: torch.Tensor, which: str) -> torch.Tensor:
        """Frozen projection ``W_which h + b_which`` for which in q / k / v, split into heads."""
        i = 'qkv'.index(which)
        C = self.num_heads * self.head_dim
        return self.split_heads(linear(h, self.qkv.weight, self.qkv.bias, rows=slice(i * C, (i + 1) * C)))

    def attend(self, q: torch.Tensor, kv: torch.Tensor,
               extra_kv: Sequence[Tuple[torch.Tensor, torch.Tensor]] = ()) -> Tuple[torch.Tensor, torch.Tensor]:
        """``q`` (B, n, C), ``kv`` (B, N, 2C) -> (attention output (B, n, C) before ``proj``, q (B, H, n, d)).
        ``extra_kv``: further (k, v) pairs of shape (B, H, L, d) appended to the keys and values."""
        B, n, C = q.shape
        q = self.split_heads(q)
        k, v = kv.view(B, kv.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if extra_kv:
            k = torch.cat([k] + [e[0] for e in extra_kv], dim=2)
            v = torch.cat([v] + [e[1] for e in extra_kv], dim=2)
        out = kernels.attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, n, C), q

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The plain frozen attention, ``(B, N, C) -> (B, N, C)``."""
        q, kv = self.project_qkv(h)
        return self.proj_drop(self.proj(self.attend(q, kv)[0]))


class Mlp(nn.Module):
    """``fc2(act(fc1 h))``."""

    def __init__(self, dim: int, hidden: int, act: str, drop: float = 0.0):
        super().__init__()
        self.fc1 = FrozenFastLinear(dim, hidden)
        self.act = make_activation(act)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = FrozenFastLinear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(h)))))
