"""The segmentation preprocessor (``vision-efficient-tuning-segmentation-preprocessor``).

Input: a row ``{'img_path:FILE' | 'image': ..., 'mask_path:FILE': ...}`` (training / evaluation) or anything the
classifier's pipeline accepts as an image (inference; read by the same reader,
:func:`~..preprocessing.image_io.load_image`). Output:
- train: ``{'imgs': (3, S, S), 'masks': (S, S) int64}`` after :func:`.transforms.random_scale_crop_flip`;
- eval: ``{'imgs': (3, S, S), 'masks': (H, W) int64}`` (the whole image resized; the mask at the image's size);
- inference: ``{'imgs': (3, S, S), 'size': (H, W)}``.
S is ``preprocessor.img_size`` (default ``model.backbone.img_size``); ``mean`` / ``std`` as the classifier's.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import numpy as np
import torch
from modelscope.preprocessors.base import Preprocessor
from modelscope.utils.constant import ModeKeys

from ..preprocessing.image_io import load_image
from ..preprocessing.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..registration import register_class
from .transforms import normalize, random_scale_crop_flip, read_mask, resize_image

MASK_KEY = 'mask_path:FILE'
KEYS = ('img_size', 'mean', 'std', 'scale_range', 'flip', 'type')


class SegmentationPreprocessor(Preprocessor):

    def __init__(self, mode: str = ModeKeys.INFERENCE, img_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, scale_range: Sequence[float] = (0.5, 2.0), flip: bool = True,
                 **kwargs):
        kwargs.pop('type', None)
        kwargs.pop('model_dir', None)
        if kwargs:
            raise ValueError(f'preprocessor: unknown key(s) {sorted(kwargs)}; expected {KEYS}')
        super().__init__(mode)
        if isinstance(img_size, (list, tuple)):
            if len(set(img_size)) != 1:
                raise ValueError(f'preprocessor.img_size={img_size}: segmentation takes square inputs')
            img_size = img_size[0]
        if not isinstance(img_size, int) or img_size < 1:
            raise ValueError(f'preprocessor.img_size={img_size!r}: expected a positive integer')
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f'preprocessor.scale_range={scale_range!r}: expected [low, high] with 0 < low <= high')
        self.img_size, self.mean, self.std = img_size, tuple(mean), tuple(std)
        self.scale_range, self.flip = (float(scale_range[0]), float(scale_range[1])), bool(flip)

    @classmethod
    def from_config(cls, cfg: Dict[str, Any], mode: str) -> 'SegmentationPreprocessor':
        """From a whole configuration.json dict: its ``preprocessor`` section, ``img_size`` defaulting to the
        backbone's."""
        section = dict(cfg.get('preprocessor') or {})
        backbone = (cfg.get('model') or {}).get('backbone') or {}
        section.setdefault('img_size', backbone.get('img_size', 224))
        return cls(mode=mode, **section)

    @property
    def output_size(self) -> Tuple[int, int]:
        return self.img_size, self.img_size

    def train_is_random(self) -> bool:
        """Whether training gives one image two inputs: always (a random scale, crop position and flip each
        time), which is what ``train.feature_cache`` asks."""
        return True

    def __call__(self, data: Any) -> Dict[str, Any]:
        row = data if isinstance(data, dict) else None
        if row is not None and MASK_KEY in row and self.mode in (ModeKeys.TRAIN, ModeKeys.EVAL):
            image = load_image({k: v for k, v in row.items() if k != MASK_KEY})
            mask = read_mask(row[MASK_KEY], image.size)
            if self.mode == ModeKeys.TRAIN:
                crop, mask, (h, w) = random_scale_crop_flip(image, mask, self.img_size, self.scale_range, self.flip)
                imgs = torch.zeros(3, self.img_size, self.img_size)  # padding: the mean colour after normalising
                imgs[:, :h, :w] = normalize(crop, self.mean, self.std)
                return {'imgs': imgs, 'masks': torch.from_numpy(np.ascontiguousarray(mask))}
            return {'imgs': normalize(resize_image(image, self.img_size), self.mean, self.std),
                    'masks': torch.from_numpy(mask)}
        image = load_image(data)
        return {'imgs': normalize(resize_image(image, self.img_size), self.mean, self.std),
                'size': (image.size[1], image.size[0])}


register_class(SegmentationPreprocessor)
