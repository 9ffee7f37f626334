"""``build_trainer(name='vision-efficient-tuning-segmentation', default_args=dict(model=..., train_dataset=...,
eval_dataset=..., cfg_modify_fn=...))``: the classifier's trainer (defaults, parameter groups, precision, warm-up,
exact resume, data-parallel evaluation, whole ``output/``) with segmentation's model, data, preprocessor, metric.

Data: anything :func:`.data.load_segmentation_dataset` reads; masks are PNGs of class ids (255 = ignore), checked
when the trainer is built (each image and mask read once: a mask's size must be its image's, its ids below
num_classes). ``train.on_bad_image: skip`` leaves out rows whose image or mask cannot be read at all (named in the
log, ``trainer.skipped_images`` and the model card), as the classifier's trainer does. Class
names: ``model.CLASSES`` of the configuration, else the data's ``classes.txt``, else ``class_<i>``; they are written
to ``output/configuration.json``. The evaluation metric is ``vision-efficient-tuning-miou`` (mIoU, per-class IoU,
pixel accuracy), computed on the masks at each image's own size, as the pipeline predicts them.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from modelscope.preprocessors.base import Preprocessor
from modelscope.utils.constant import ModeKeys

from ..preprocessing.image_io import load_image
from ..registration import SEG_METRIC, SEG_TASK, SEG_TYPE, register_class
from ..training import feature_cache
from ..training.trainer import VisionEfficientTuningTrainer
from .data import SegmentationRowsDataset, collate, load_segmentation_dataset
from .model import VisionEfficientTuningSegmentationModel
from .network import IGNORE_INDEX
from .preprocessor import MASK_KEY, SegmentationPreprocessor
from .transforms import MaskUnreadable, read_mask


class SegmentationTrainer(VisionEfficientTuningTrainer):
    # The classifier's stochastic-depth default was measured on classification only; dense prediction keeps what it
    # was measured with (none) unless train.drop_path or model.backbone.drop_path_rate asks for it.
    default_drop_path = 0.0

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
        on_error = self.on_bad_image(model_cfg)
        ds = load_segmentation_dataset(datasets).with_transform(preprocessor)  # the caller's object unchanged
        model = self.model_unwrapped
        unreadable = check_masks(ds, model.head.num_classes, role, skip_unreadable=on_error == 'skip')
        if on_error == 'skip':
            # as the classifier's trainer: rows the pipeline cannot read are left out of numerator and denominator
            ds = ds.without([i for i, _ in unreadable])
            self.record_skipped(ds.source, role, [path for _, path in unreadable], 'image(s) or mask(s)')
        if model.CLASSES is None or (mode == ModeKeys.TRAIN and ds.classes is not None and not model.head_loaded):
            n = model.head.num_classes
            names = list(ds.classes or [])[:n]
            model.CLASSES = names + [f'class_{i}' for i in range(len(names), n)]
        if mode == ModeKeys.TRAIN:  # the classifier's rules; fixed views need a dataset that draws them (not yet)
            self.feature_cache_plan = feature_cache.plan_for(self, preprocessor)
            if self.feature_cache_plan.views:
                raise ValueError(f'{feature_cache.SETTING}.views={self.feature_cache_plan.views}: fixed augmented '
                                 'views are not supported for segmentation training yet; expected 0')
        return ds

    def export_output(self) -> str:
        """``output/`` as the classifier's, with the class names in configuration.json (``model.CLASSES``)."""
        classes = self.model_unwrapped.CLASSES
        if classes is not None:
            self.cfg.model.CLASSES = [str(c) for c in classes]
        return super().export_output()


def check_masks(ds: SegmentationRowsDataset, num_classes: int, role: str,
                skip_unreadable: bool = False) -> List[Tuple[int, str]]:
    """Every image readable by the pipeline's reader, every mask readable, of its image's size, with ids in
    [0, num_classes) or 255: a ValueError naming the first file that is not (each read once, when the trainer is
    built). ``skip_unreadable``: an image or mask that cannot be read at all is returned as ``(row, path)``
    instead (a mask of the wrong size or with wrong ids is still an error: it is readable, and wrong)."""
    import numpy as np
    unreadable = []
    for index, (image_path, mask_path) in enumerate(zip(ds.image_paths(), ds.mask_paths())):
        try:
            # the preprocessor's own call: what fails here is what the pipeline could not read
            size = load_image({k: v for k, v in ds.rows[index].items() if k != MASK_KEY}).size
        except Exception as e:  # noqa: BLE001  (whatever the pipeline's reader cannot read)
            if skip_unreadable:
                unreadable.append((index, image_path))
                continue
            raise ValueError(f'{ds.source}: {role} image {image_path!r} cannot be read: {e}') from e
        try:
            mask = read_mask(mask_path, size)
        except MaskUnreadable:
            if skip_unreadable:
                unreadable.append((index, mask_path))
                continue
            raise
        ids = np.unique(mask)
        bad = [int(i) for i in ids if i != IGNORE_INDEX and not 0 <= i < num_classes]
        if bad:
            raise ValueError(f'{ds.source}: {role} mask {mask_path!r} holds class id(s) {bad[:8]}, but '
                             f'model.head.num_classes is {num_classes} (ids 0 .. {num_classes - 1}, 255 = ignore)')
    return unreadable


register_class(SegmentationTrainer)
