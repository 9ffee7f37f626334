"""``vision-efficient-tuning-miou``: mIoU, per-class IoU and pixel accuracy over a confusion matrix.

For every evaluated image the logits are turned into a class-id map at the mask's size by
:func:`.network.predict_masks` (what the pipeline returns), and every pixel whose mask is not 255 adds one count
to ``confusion[true, predicted]`` (K x K). Then, per class c: ``IoU_c = TP / (TP + FP + FN)``; ``mIoU`` is the
mean over the classes that occur in the masks or the predictions (a class absent from both has no IoU);
``pixel_accuracy = trace / total``. Counts merge across data-parallel ranks by addition.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from modelscope.metrics.base import Metric

from ..registration import register_class
from .network import IGNORE_INDEX, predict_masks


def confusion_matrix(truth: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(K, K)`` int64 counts over the pixels whose truth is not 255; truth ids must be < K."""
    truth, predicted = truth.reshape(-1).long().cpu(), predicted.reshape(-1).long().cpu()
    keep = truth != IGNORE_INDEX
    truth, predicted = truth[keep], predicted[keep]
    if truth.numel() and int(truth.max()) >= num_classes:
        raise ValueError(f'mask holds class id {int(truth.max())} but the model has {num_classes} classes '
                         f'(ids 0 .. {num_classes - 1}, 255 = ignore)')
    return torch.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes) \
        .reshape(num_classes, num_classes)


def scores(confusion: torch.Tensor, classes: Optional[List[str]] = None) -> Dict[str, float]:
    """mIoU, pixel accuracy and ``IoU/<class>`` from a confusion matrix (see the module docstring)."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
    total = confusion.sum()
    out = {'mIoU': float(iou[present].mean()) if bool(present.any()) else 0.0,
           'pixel_accuracy': float(tp.sum() / total) if total > 0 else 0.0}
    for c in range(confusion.shape[0]):
        if bool(present[c]):
            name = classes[c] if classes is not None and c < len(classes) else str(c)
            out[f'IoU/{name}'] = float(iou[c])
    return out


class SegmentationMetric(Metric):

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.confusion: Optional[torch.Tensor] = None
        self.classes: Optional[List[str]] = None

    def add(self, outputs: Dict, inputs: Dict) -> None:
        logits, masks = outputs['logits'], inputs['masks']
        masks = list(masks) if isinstance(masks, (list, tuple)) else list(masks.unbind(0))
        k = logits.shape[1]
        if self.confusion is None:
            self.confusion = torch.zeros(k, k, dtype=torch.long)
            trainer = getattr(self, 'trainer', None)
            model = getattr(trainer, 'model_unwrapped', None) if trainer is not None else None
            self.classes = getattr(model, 'CLASSES', None)
        for mask, predicted in zip(masks, predict_masks(logits, [m.shape[-2:] for m in masks])):
            self.confusion += confusion_matrix(mask, predicted, k)

    def evaluate(self) -> Dict[str, float]:
        if self.confusion is None:
            return {'mIoU': 0.0, 'pixel_accuracy': 0.0}
        return scores(self.confusion, self.classes)

    def merge(self, other: 'SegmentationMetric') -> None:
        if other.confusion is None:
            return
        self.confusion = other.confusion.clone() if self.confusion is None else self.confusion + other.confusion
        self.classes = self.classes or other.classes

    def __getstate__(self):
        return self.confusion, self.classes

    def __setstate__(self, state):
        self.confusion, self.classes = state


register_class(SegmentationMetric)
