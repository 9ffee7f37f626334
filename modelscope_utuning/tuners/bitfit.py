"""BitFit (Ben Zaken et al. 2022): train the backbone's bias terms, nothing else is added.

``{"type": "bitfit", "layers": ...}``: the biases of the selected blocks (norms, qkv, proj, fc1, fc2) train, and
with every layer selected also the biases outside the blocks (patch embedding, final norms). Trainable
parameters: the number of those biases. The tuner itself holds no weights: it names the backbone's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch.nn as nn

from .base import Dims, Tuner, TunerConfig, register_tuner


@dataclass(frozen=True)
class BitFitConfig(TunerConfig):
    pass


@register_tuner
class BitFit(Tuner):
    kind = 'bitfit'
    Config = BitFitConfig
    level = 'network'
    size_required = False

    @classmethod
    def count_trainable(cls, spec, backbone) -> int:
        return sum(p.numel() for p in _biases(backbone, spec.sizes).values())

    def __init__(self, spec, size: int, dims: Dims):
        super().__init__(spec, size, dims)
        self.layers = [i for i, s in enumerate(spec.sizes) if s]
        self.points = ()

    def adapter_params(self, host: nn.Module) -> Dict[str, nn.Parameter]:
        """The selected biases of ``host``'s backbone, named relative to ``host``."""
        sizes = [1 if i in self.layers else 0 for i in range(len(host.backbone.blocks))]
        return {f'backbone.{k}': p for k, p in _biases(host.backbone, sizes).items()}

    def extra_repr(self) -> str:
        return f'layers={self.layers}'


def _biases(backbone: nn.Module, sizes) -> Dict[str, nn.Parameter]:
    """Bias parameters of the frozen backbone (not of its tuners) in the selected blocks, plus those outside the
    blocks when every block is selected; names relative to the backbone."""
    selected = {i for i, s in enumerate(sizes) if s}
    out = {}

    def visit(module: nn.Module, prefix: str, block_index):
        for name, child in module.named_children():
            if isinstance(child, Tuner):
                continue
            index = block_index
            if module is getattr(backbone, 'blocks', None):
                index = int(name)
            visit(child, f'{prefix}{name}.', index)
        for name, p in module.named_parameters(recurse=False):
            if name == 'bias' and (selected == set(range(len(sizes))) if block_index is None
                                   else block_index in selected):
                out[prefix + name] = p

    visit(backbone, '', None)
    return out
