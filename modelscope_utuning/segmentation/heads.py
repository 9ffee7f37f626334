"""Dense heads on the patch-token maps of a frozen ViT.

- ``linear`` (DINOv2's linear segmentation head): the last layer's patch tokens ``(B, C, h, w)``, BatchNorm, a 1x1
  convolution to K class logits ``(B, K, h, w)``;
- ``multilevel``: the patch tokens of several layers (default the last four, DINOv2's "+ms" recipe),
  concatenated along channels ``(B, L*C, h, w)``, BatchNorm, a 1x1 convolution.

The 1x1 convolution is stored as ``fc`` (a Linear of shape (K, L*C) applied per position), so the hub layout
and the tuner-only files hold the head under ``head.fc.*`` / ``head.bn.*`` like the classifier's. Upsampling to
the image size happens outside the head (:func:`..segmentation.network.upsample_logits`), where the image size
is known.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

HEAD_TYPES = {'linear': 1, 'multilevel': 4}  # type -> default number of layers read


class SegmentationHead(nn.Module):
    """``[maps (B, C, h, w)] * L -> logits (B, K, h, w)``: concat, BatchNorm2d, per-position linear.

    Args:
        dim: channels of one map (the backbone width C).
        num_classes: K.
        num_layers: L, how many maps it reads.
        head_type: 'linear' or 'multilevel', for the configuration it writes.
    """

    def __init__(self, dim: int, num_classes: int, num_layers: int = 1, head_type: str = 'linear'):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f'model.head.num_classes must be >= 1, got {num_classes}')
        self.head_type, self.num_layers, self.num_classes = head_type, num_layers, num_classes
        self.dim = dim * num_layers  # what the classifier head calls dim: the width it reads
        self.bn = nn.BatchNorm2d(self.dim)
        self.fc = nn.Linear(self.dim, num_classes)
        # Zero-initialised like the classifier's fresh head: uniform predictions at step 0, and no random
        # gradient pushed into the tuners by a random head.
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(maps) != self.num_layers:
            raise ValueError(f'the {self.head_type} head reads {self.num_layers} maps, got {len(maps)}')
        x = self.bn(torch.cat(list(maps), dim=1) if len(maps) > 1 else maps[0])
        return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # 1x1 conv: (B, K, h, w)


def resolve_layers(head_type: str, layers, depth: int) -> List[int]:
    """Block indices the head reads: ``layers`` as given (negative counts from the end), else the last
    ``HEAD_TYPES[head_type]`` blocks. Errors name the key."""
    if head_type not in HEAD_TYPES:
        raise ValueError(f'model.head.type={head_type!r}: expected one of {sorted(HEAD_TYPES)}')
    if layers is None:
        n = min(HEAD_TYPES[head_type], depth)
        return list(range(depth - n, depth))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers or \
            not all(isinstance(i, int) and not isinstance(i, bool) and -depth <= i < depth for i in layers):
        raise ValueError(f'model.head.layers={layers!r}: expected block indices in [-{depth}, {depth}) '
                         f'(the backbone has {depth} blocks)')
    out = sorted({i % depth for i in layers})
    if head_type == 'linear' and len(out) != 1:
        raise ValueError(f'model.head.layers={layers!r}: the linear head reads one layer; use type multilevel')
    return out
