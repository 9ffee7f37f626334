"""The vertical tuner of Res-Tuning-Bypass (Jiang et al. 2023): it carries the bypass stream from layer to layer.

In bypass mode the parallel tuners of layer l read the frozen OP inputs and add their terms to a side stream
(see :mod:`..backbone.bypass`). Without vertical tuners that stream is their plain sum, ``b_l = b_{l-1} +
lateral_l``. A vertical tuner on layer l transforms what arrives from the layer before:

    b_l = V_l(b_{l-1}) + lateral_l,    V_l(b) = b + s * rms(b) * A(b / rms(b))

with ``A`` an adapter (``W_up act(W_down z + b_down) + b_up``, ``W_up`` and ``b_up`` zero at the start, so V
starts as the identity and the model as the lateral-only bypass) and ``rms(b)`` the per-token root-mean-square of
the stream (no gradient through it): V is then homogeneous, ``V(k b) = k V(b)``, so it works on the stream's
composition, whatever its scale. Layer 0 has no stream before it and takes no vertical tuner.

``{"type": "vertical", "dim": 10}`` (with ``model.backbone.bypass: true``). Trainable parameters per layer:
``2 C r + r + C`` plus the scale's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..backbone.vit import ACTIVATIONS, make_activation
from .base import Dims, Tuner, TunerConfig, option, register_tuner
from .scale import SCALES, Scale


@dataclass(frozen=True)
class VerticalConfig(TunerConfig):
    scale: str = option('channel', "the learned scale s: 'none', 'scalar', 'channel' or 'input'", choices=SCALES)
    scale_init: float = option(1.0, "the scale's initial value", init_only=True)
    act: str = option(None, "the hidden activation (default: the backbone's)", choices=tuple(ACTIVATIONS))


@register_tuner
class Vertical(Tuner):
    kind = 'vertical'
    Config = VerticalConfig
    ops = ('block',)
    default_op = 'block'
    size_keys = ('dim',)
    requires_bypass = True

    @classmethod
    def check(cls, spec) -> None:
        if spec.sizes and spec.sizes[0] and ('layers' in spec.source or isinstance(spec.source.get('dim'), list)):
            spec.fail('layer 0 has no bypass stream before it: a vertical tuner starts at layer 1')

    @classmethod
    def resolve(cls, spec, dims: Dims):
        # "all layers" means every layer that has a stream to carry: layer 0 has none.
        return dataclasses.replace(spec, sizes=(0,) + tuple(spec.sizes[1:]),
                                   options=dataclasses.replace(spec.options, act=spec.act or dims.act))

    @classmethod
    def num_trainable(cls, spec, size: int, dims: Dims) -> int:
        C = dims.embed_dim
        return 2 * C * size + size + C + Scale.num_params(spec.scale, C)

    def __init__(self, spec, size: int, dims: Dims):
        super().__init__(spec, size, dims)
        C = dims.embed_dim
        self.down = nn.Linear(C, size)
        self.act = make_activation(spec.act)
        self.up = nn.Linear(size, C)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = Scale(spec.scale, C, spec.scale_init)
        self.points = ('bypass',)

    def carry(self, side: torch.Tensor) -> torch.Tensor:
        rms = side.detach().float().pow(2).mean(-1, keepdim=True).add_(1e-12).sqrt_().to(side.dtype)
        z = side / rms
        return side + rms * self.scale.of_projection(z, self.act(self.down(z)), self.up)
