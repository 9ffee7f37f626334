"""Side-tuning (Zhang et al. 2019): a small trainable side network beside the frozen backbone.

``f(x) = sigmoid(alpha) * f_backbone(x) + (1 - sigmoid(alpha)) * f_side(x)`` on the pooled feature (B, C);
``f_side`` is FCN4 (four 3x3 conv + GroupNorm + ReLU stages, global average pool, Linear(64, C)). It lives on the
network (it reads the images) at its ``features`` point. No downloads: the AlexNet variant of the built-in needs
torchvision weights and is not offered.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from .base import Dims, Tuner, TunerConfig, option, register_tuner

FCN4_PARAMS_WITHOUT_FC = 9 * (3 * 16 + 16 * 16 + 16 * 32 + 32 * 64) + 2 * (16 + 16 + 32 + 64)


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


@dataclass(frozen=True)
class SideConfig(TunerConfig):
    net: str = option('fcn4', "the side network: 'fcn4' (the only one that needs no downloaded weights)")


@register_tuner
class SideTuner(Tuner):
    kind = 'side'
    Config = SideConfig
    level = 'network'
    size_keys = ('dim', 'length')
    size_required = False
    hub_names = (('sidetune.side.', 'side.net.', None), ('sidetune.alpha', 'side.alpha', None))
    legacy_keys = ('sidetune_length', 'sidetune_type')

    @classmethod
    def check(cls, spec) -> None:
        dim = spec.sizes[0] if spec.source.keys() & set(cls.size_keys) else spec.embed_dim
        if dim != spec.embed_dim:
            spec.fail(f'the side network output must equal the backbone width {spec.embed_dim}, got {dim}')
        if str(spec.net).lower() != 'fcn4':
            spec.fail(f"net={spec.net!r} is not supported offline; expected 'fcn4'")

    @classmethod
    def resolve(cls, spec, dims: Dims):
        # One side network per model; its width is the backbone's (checked above), not a per-layer size.
        return dataclasses.replace(spec, sizes=(1,) * len(spec.sizes),
                                   options=dataclasses.replace(spec.options, net=str(spec.net).lower()))

    @classmethod
    def count_trainable(cls, spec, backbone) -> int:
        return FCN4_PARAMS_WITHOUT_FC + 64 * backbone.embed_dim + backbone.embed_dim + 1

    @classmethod
    def legacy_entry(cls, backbone_cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        if backbone_cfg.get('sidetune_type') is None:
            return None
        entry = {'type': 'side', 'net': backbone_cfg['sidetune_type']}
        if backbone_cfg.get('sidetune_length') is not None:
            entry['dim'] = backbone_cfg['sidetune_length']
        return entry

    def __init__(self, spec, size: int, dims: Dims):
        super().__init__(spec, size, dims)
        self.net = FCN4(dims.embed_dim)
        self.alpha = nn.Parameter(torch.tensor(0.0))
        self.points = ('features',)

    def no_weight_decay(self) -> set:
        return {'alpha'}

    def edit_features(self, images: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """The network's ``features`` point: the pooled feature (B, C) mixed with the side network's."""
        a = torch.sigmoid(self.alpha)
        return a * feature + (1 - a) * self.net(images.to(feature.dtype))

    def extra_repr(self) -> str:
        return 'net=fcn4'
