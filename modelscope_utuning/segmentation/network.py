"""The segmentation network: :class:`~..network.VisionEfficientTuning` (frozen ViT, tuners on its OPs, weights in
both saved formats) with a dense head in place of the classifier.

Shapes: images ``(B, 3, H, W)`` with H = W = the backbone's img_size -> ``forward`` -> logits ``(B, K, H/p, W/p)``;
:func:`upsample_logits` -> ``(B, K, H', W')`` at any requested size; :func:`predict_masks` -> class ids.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..network import VisionEfficientTuning
from ..tuners.base import Tuner
from .heads import HEAD_TYPES, SegmentationHead, resolve_layers

HEAD_KEYS = ('type', 'num_classes', 'layers', 'dim')
IGNORE_INDEX = 255  # mask value of pixels that count nowhere (unlabelled, padding)


class SegmentationNetwork(VisionEfficientTuning):
    """Backbone + tuners + dense head (``model.head``: ``{type: linear | multilevel, num_classes, layers}``)."""

    def build_head(self, head_cfg: Dict[str, Any]) -> nn.Module:
        head = dict(head_cfg or {})
        unknown = sorted(set(head) - set(HEAD_KEYS))
        if unknown:
            raise ValueError(f'model.head: unknown key(s) {unknown}; expected {HEAD_KEYS}')
        if 'num_classes' not in head:
            raise ValueError('model.head.num_classes is required')
        head_type = head.get('type') or 'linear'
        self.head_layers = resolve_layers(head_type, head.get('layers'), self.backbone.depth)
        width = self.backbone.embed_dim * len(self.head_layers)
        if head.get('dim') not in (None, width):
            raise ValueError(f'model.head.dim={head["dim"]}: the {head_type} head reads {width} channels')
        side = [name for name, m in self.named_children() if isinstance(m, Tuner) and 'features' in m.points]
        if side:
            raise ValueError(f'tuner(s) {side} act on the pooled classification feature; a segmentation model has '
                             'none: use tuners on the OPs (mha / ffn / block) instead')
        return SegmentationHead(self.backbone.embed_dim, int(head['num_classes']), len(self.head_layers), head_type)

    def head_config(self) -> Dict[str, Any]:
        return {'type': self.head.head_type, 'num_classes': self.head.num_classes, 'layers': list(self.head_layers)}

    def head_layers_needed(self) -> List[int]:
        return list(self.head_layers)

    def logits_from_tokens(self, final: torch.Tensor, levels: Dict[int, torch.Tensor],
                           images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, h, w)`` from the tokens of the head's layers (``levels``: block index -> tokens)."""
        return self.head([self.backbone.patch_grid(levels[i]) for i in self.head_layers])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits at the patch grid ``(B, K, H/p, W/p)``, from one pass of the tuned backbone."""
        final, levels = self.backbone.forward_intermediates(images, self.head_layers)
        return self.logits_from_tokens(final, dict(zip(self.head_layers, levels)), images)


def upsample_logits(logits: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of ``(B, K, h, w)`` logits to ``size`` (in fp32)."""
    return F.interpolate(logits.float(), size=tuple(int(s) for s in size), mode='bilinear', align_corners=False)


def predict_masks(logits: torch.Tensor, sizes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
    """Class-id maps ``(H_i, W_i)`` (int64), one per image, each at its own size: the one rule that both the
    pipeline's output and the evaluation metric use, so their numbers agree."""
    return [upsample_logits(logits[i:i + 1], size)[0].argmax(dim=0) for i, size in enumerate(sizes)]


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits upsampled to the masks' size ``(B, H, W)``; pixels at 255 count nowhere."""
    return F.cross_entropy(upsample_logits(logits, masks.shape[-2:]), masks.long().to(logits.device),
                           ignore_index=IGNORE_INDEX)


__all__ = ['HEAD_TYPES', 'IGNORE_INDEX', 'SegmentationNetwork', 'predict_masks', 'segmentation_loss',
           'upsample_logits']
