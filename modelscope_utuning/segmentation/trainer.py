"""``build_trainer(name='vision-efficient-tuning-segmentation', default_args=dict(model=..., train_dataset=...,
eval_dataset=..., cfg_modify_fn=...))``: the classifier's trainer (defaults, parameter groups, precision, warm-up,
exact resume, data-parallel evaluation, whole ``output/``) with segmentation's model, data, preprocessor, metric.

Data: anything :func:`.data.load_segmentation_dataset` reads; masks are PNGs of class ids (255 = ignore), checked
when the trainer is built (each mask read once: its size must be its image's, its ids below num_classes). Class
names: ``model.CLASSES`` of the configuration, else the data's ``classes.txt``, else ``class_<i>``; they are written
to ``output/configuration.json``. The evaluation metric is ``vision-efficient-tuning-miou`` (mIoU, per-class IoU,
pixel accuracy), computed on the masks at each image's own size, as the pipeline predicts them.
"""
from __future__ import annotations

import os
from typing import Optional

from modelscope.preprocessors.base import Preprocessor
from modelscope.utils.constant import ModeKeys
from PIL import Image

from ..registration import SEG_METRIC, SEG_TASK, SEG_TYPE, register_class
from ..training.trainer import VisionEfficientTuningTrainer
from .data import SegmentationRowsDataset, collate, load_segmentation_dataset
from .model import VisionEfficientTuningSegmentationModel
from .network import IGNORE_INDEX
from .preprocessor import SegmentationPreprocessor
from .transforms import read_mask


class SegmentationTrainer(VisionEfficientTuningTrainer):

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('data_collator', collate)
        super().__init__(*args, **kwargs)

    def rebuild_config(self, cfg):
        cfg = super().rebuild_config(cfg)
        cfg.task = SEG_TASK
        if cfg.safe_get('model.type') != SEG_TYPE:
            cfg.model.type = SEG_TYPE
        metrics = [m for m in (cfg.safe_get('evaluation.metrics') or []) if m not in ('accuracy',)
                   and not str(m).startswith('vision-efficient-tuning-top')]
        cfg.evaluation.metrics = metrics or [SEG_METRIC]
        return cfg

    def build_model(self):
        model = super().build_model()
        if not isinstance(model, VisionEfficientTuningSegmentationModel):
            raise TypeError(f'{self.model_dir}: configuration.json builds {type(model).__name__}; the segmentation '
                            f'trainer needs model.type {SEG_TYPE!r} (task {SEG_TASK!r})')
        return model

    def get_preprocessors(self, preprocessor):
        if preprocessor is not None:
            return super().get_preprocessors(preprocessor)
        cfg = self.cfg.to_dict()
        return (SegmentationPreprocessor.from_config(cfg, ModeKeys.TRAIN),
                SegmentationPreprocessor.from_config(cfg, ModeKeys.EVAL))

    def build_dataset(self, datasets, model_cfg, mode, preprocessor: Optional[Preprocessor] = None, **kwargs):
        if datasets is None:
            return super(VisionEfficientTuningTrainer, self).build_dataset(datasets, model_cfg, mode,
                                                                           preprocessor=preprocessor, **kwargs)
        role = 'training' if mode == ModeKeys.TRAIN else 'evaluation'
        ds = load_segmentation_dataset(datasets).with_transform(preprocessor)  # the caller's object unchanged
        model = self.model_unwrapped
        check_masks(ds, model.head.num_classes, role)
        if model.CLASSES is None or (mode == ModeKeys.TRAIN and ds.classes is not None and not model.head_loaded):
            n = model.head.num_classes
            names = list(ds.classes or [])[:n]
            model.CLASSES = names + [f'class_{i}' for i in range(len(names), n)]
        return ds

    def export_output(self) -> str:
        """``output/`` as the classifier's, with the class names in configuration.json (``model.CLASSES``)."""
        classes = self.model_unwrapped.CLASSES
        if classes is not None:
            self.cfg.model.CLASSES = [str(c) for c in classes]
        return super().export_output()

    def _data_description(self):
        out = {}
        for role, ds in (('train', self.train_dataset), ('eval', self.eval_dataset)):
            if ds is not None:
                out[role] = f'{os.path.basename(str(ds.source).rstrip("/")) or ds.source} ({len(ds)} images)'
        return out


def check_masks(ds: SegmentationRowsDataset, num_classes: int, role: str) -> None:
    """Every mask readable, of its image's size, with ids in [0, num_classes) or 255: a ValueError naming the
    first file that is not (read once, when the trainer is built)."""
    import numpy as np
    for image_path, mask_path in zip(ds.image_paths(), ds.mask_paths()):
        try:
            with Image.open(image_path) as im:
                size = im.size
        except (OSError, SyntaxError) as e:
            raise ValueError(f'{ds.source}: {role} image {image_path!r} cannot be read: {e}') from e
        mask = read_mask(mask_path, size)
        ids = np.unique(mask)
        bad = [int(i) for i in ids if i != IGNORE_INDEX and not 0 <= i < num_classes]
        if bad:
            raise ValueError(f'{ds.source}: {role} mask {mask_path!r} holds class id(s) {bad[:8]}, but '
                             f'model.head.num_classes is {num_classes} (ids 0 .. {num_classes - 1}, 255 = ignore)')


register_class(SegmentationTrainer)
