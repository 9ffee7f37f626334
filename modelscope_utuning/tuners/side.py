"""Side-tuning (Zhang et al. 2019): a small trainable side network beside the frozen backbone.

``f(x) = sigmoid(alpha) * f_backbone(x) + (1 - sigmoid(alpha)) * f_side(x)`` on the pooled feature (B, C);
``f_side`` is FCN4 (four 3x3 conv + GroupNorm + ReLU stages, global average pool, Linear(64, C)). No
downloads: the AlexNet variant of the built-in needs torchvision weights and is not offered.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _stage(c_in: int, c_out: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=padding, bias=False),
                         nn.GroupNorm(2, c_out), nn.ReLU())


class FCN4(nn.Module):
    """``(B, 3, H, W) -> (B, out_dim)``."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.conv1 = _stage(3, 16, 1, 1)
        self.conv2 = _stage(16, 16, 2, 0)
        self.conv3 = _stage(16, 32, 2, 0)
        self.conv4 = _stage(32, 64, 1, 0)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv4(self.conv3(self.conv2(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


class SideTuner(nn.Module):

    def __init__(self, dim: int, net: str = 'fcn4'):
        super().__init__()
        if net.lower() != 'fcn4':
            raise ValueError(f"side-tuning net={net!r} is not supported; expected 'fcn4'")
        self.net = FCN4(dim)
        self.alpha = nn.Parameter(torch.tensor(0.0))

    def forward(self, images: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.alpha)
        return a * feature + (1 - a) * self.net(images.to(feature.dtype))
