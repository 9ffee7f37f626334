"""ModelScope's model class for segmentation: ``vision-efficient-tuning-segmentation`` of the task
``semantic-segmentation``. The classifier's shell (:class:`~..model.VisionEfficientTuningModel`: configuration,
checkpoint loading, ``freeze_cfg``, saving) around a :class:`.network.SegmentationNetwork`.

Forward contract (a dict in, a dict out, as ModelScope's trainer and pipeline call it):
- training: ``{'imgs': (B, 3, S, S), 'masks': (B, S, S) int, 255 = ignore}`` -> ``{'loss'}``;
- evaluation / inference: ``{'imgs'}`` -> ``{'logits': (B, K, S/p, S/p)}``; class-id maps at each image's own size
  come from :func:`.network.predict_masks` (the metric and the pipeline both call it).
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from ..model import VisionEfficientTuningModel
from ..registration import register_class
from .network import SegmentationNetwork, segmentation_loss


class VisionEfficientTuningSegmentationModel(VisionEfficientTuningModel):
    """U-Tuning semantic segmentation (see the module docstring); arguments as the classifier's, ``model.head``
    being ``{type: linear | multilevel, num_classes, layers}``."""

    network_class = SegmentationNetwork

    def forward(self, input: Dict[str, Any]) -> Dict[str, torch.Tensor]:  # noqa: A002 - ModelScope's name
        if not isinstance(input, dict) or 'imgs' not in input:
            raise ValueError("model input must be a dict with 'imgs' (B, 3, H, W) and, to train, 'masks' (B, H, W)")
        logits = self.model(input['imgs'])
        if self.training:
            masks = input.get('masks')
            if not isinstance(masks, torch.Tensor):
                raise ValueError("training needs 'masks' (B, H, W) of class ids beside 'imgs'")
            return {'loss': segmentation_loss(logits, masks)}
        return {'logits': logits}


register_class(VisionEfficientTuningSegmentationModel)
