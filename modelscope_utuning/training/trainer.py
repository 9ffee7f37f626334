"""``VisionEfficientTuningTrainer``: ModelScope's EpochBasedTrainer, made to fine-tune U-Tuning models.

What it adds to the base trainer: defaults for everything a configuration.json may leave out, our model,
preprocessor and dataset readers (class names travel to ``CLASSES``), parameter groups (tuner / head learning
rates, no decay on tokens / norms / biases), bf16 autocast, a trainer state that reloads on torch >= 2.6, and a
``work_dir/output`` folder that ``pipeline()`` and ``Model.from_pretrained`` load again.

Configuration keys of ours (all optional): ``train.amp`` ('auto' | 'bf16' | 'fp16' | 'fp32'),
``train.optimizer.head_lr``, ``train.on_bad_image`` ('raise' | 'skip'); ModelScope's own
``train.optimizer.options.{grad_clip, cumulative_iters}`` and ``model.loss.label_smoothing`` work as usual.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
from modelscope.models.base import Model
from modelscope.preprocessors.base import Preprocessor
from modelscope.trainers.trainer import EpochBasedTrainer
from modelscope.utils.config import ConfigDict
from modelscope.utils.constant import ModeKeys, ModelFile
from modelscope.utils.logger import get_logger
from modelscope.utils.torch_utils import is_master

from ..model import VisionEfficientTuningModel
from .defaults import apply_defaults
from .export import export_output
from .metrics import TOPK_METRIC
from .optim import param_groups
from .precision import autocast, resolve_precision

logger = get_logger()
OUR_OPTIMIZER_KEYS = ('head_lr',)


class VisionEfficientTuningTrainer(EpochBasedTrainer):
    """Same arguments as EpochBasedTrainer (``model``, ``work_dir``, ``train_dataset``, ``eval_dataset``,
    ``cfg_modify_fn`` ...), plus ``amp`` and ``on_bad_image`` overriding ``train.amp`` / ``train.on_bad_image``."""

    def __init__(self, *args, amp: Optional[str] = None, on_bad_image: Optional[str] = None, **kwargs):
        self._amp_arg, self._on_bad_image_arg = amp, on_bad_image
        self.dataset_classes = None
        super().__init__(*args, **kwargs)
        device_type = 'cuda' if self.device.type == 'cuda' else 'cpu'
        self.precision = resolve_precision(self._amp_arg or self.cfg.train.get('amp', 'auto'), device_type)
        self._device_type = device_type
        if self.precision == 'fp16':
            self.use_fp16 = True  # ModelScope's TorchAMPOptimizerHook: autocast + GradScaler
        if self.dataset_classes and self.model_unwrapped.CLASSES is None:
            self.model_unwrapped.CLASSES = list(self.dataset_classes)

    # -- configuration -----------------------------------------------------------------------------------
    def rebuild_config(self, cfg):
        cfg = apply_defaults(cfg)
        cfg = super().rebuild_config(cfg)  # the user's cfg_modify_fn
        head = cfg.safe_get('model.head') or {}
        metrics = list(cfg.safe_get('evaluation.metrics') or [])
        if head.get('num_classes', 0) > 5 and 'accuracy' in metrics and TOPK_METRIC not in metrics:
            metrics.append(TOPK_METRIC)
            cfg.evaluation.metrics = metrics
        return cfg

    @property
    def model_unwrapped(self) -> VisionEfficientTuningModel:
        return self.unwrap_module(self.model)

    # -- model, data -------------------------------------------------------------------------------------------
    def build_model(self):
        model = Model.from_pretrained(self.model_dir, cfg_dict=self.cfg, trust_remote_code=self.trust_remote_code)
        if not isinstance(model, VisionEfficientTuningModel):
            raise TypeError(f'{self.model_dir}: configuration.json builds {type(model).__name__}, '
                            'expected a vision-efficient-tuning model')
        trainable, total = model.trainable_parameters()
        logger.info(f'trainable parameters: {trainable:,} / {total:,} ({100.0 * trainable / total:.3f}%)')
        return model

    def get_preprocessors(self, preprocessor):
        if preprocessor is not None:
            return super().get_preprocessors(preprocessor)
        from ..preprocessing.preprocessor import VisionEfficientTuningPreprocessor
        train = VisionEfficientTuningPreprocessor.from_model_dir(self.model_dir, cfg=self.cfg, mode=ModeKeys.TRAIN)
        val = VisionEfficientTuningPreprocessor.from_model_dir(self.model_dir, cfg=self.cfg, mode=ModeKeys.EVAL)
        train.mode, val.mode = ModeKeys.TRAIN, ModeKeys.EVAL
        return train, val

    def build_dataset(self, datasets, model_cfg, mode, preprocessor: Optional[Preprocessor] = None, **kwargs):
        if datasets is None:
            return super().build_dataset(datasets, model_cfg, mode, preprocessor=preprocessor, **kwargs)
        from ..data import load_dataset_any
        ds = load_dataset_any(datasets)
        ds.transform = preprocessor
        ds.on_error = self._on_bad_image_arg or model_cfg.safe_get('train.on_bad_image') or 'raise'
        if mode == ModeKeys.TRAIN and ds.classes:
            self.dataset_classes = list(ds.classes)
        return ds

    # -- optimisation ------------------------------------------------------------------------------------------
    def build_optimizer(self, cfg: ConfigDict, default_args: dict = None):
        cfg = ConfigDict(dict(cfg))
        head_lr = cfg.pop('head_lr', None)
        groups = param_groups(self.unwrap_module(self.model), cfg.get('lr', 1e-3), cfg.get('weight_decay', 0.0),
                              head_lr)
        for g in groups:
            g.pop('names')
        return super().build_optimizer(cfg, default_args={'params': groups, **(default_args or {})})

    def train_step(self, model, inputs):
        with autocast(self.precision, self._device_type):
            return super().train_step(model, inputs)

    def evaluation_step(self, data):
        with autocast(self.precision, self._device_type):
            return super().evaluation_step(data)

    # -- running -----------------------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        trainable, total = self.model_unwrapped.trainable_parameters()
        self.logger.info(f'U-Tuning: training {trainable:,} of {total:,} parameters '
                         f'({100.0 * trainable / total:.3f}%), precision {self.precision}')
        result = super().train(*args, **kwargs)
        if is_master():
            self.export_output()
        return result

    def evaluate(self, *args, **kwargs) -> Dict[str, float]:
        results = super().evaluate(*args, **kwargs)
        self.last_eval = dict(results or {})
        out = self.output_dir
        if is_master() and os.path.isfile(os.path.join(out, 'configuration.json')) and \
                os.path.isfile(os.path.join(out, ModelFile.TORCH_MODEL_FILE)):
            self.export_output()  # refresh the model card with these results
        return results

    @property
    def output_dir(self) -> str:
        return os.path.join(self.work_dir, ModelFile.TRAIN_OUTPUT_DIR)

    def export_output(self) -> str:
        """(Re)write ``work_dir/output``: hub checkpoint, tuner-only weights, configuration, card, curve."""
        model = self.model_unwrapped
        if self.dataset_classes and (model.CLASSES is None or len(model.CLASSES) != model.head.num_classes):
            model.CLASSES = list(self.dataset_classes)
        log_json = os.path.join(self.work_dir, f'{self.timestamp}.log.json')
        results = getattr(self, 'last_eval', None) or self._metric_values or {}
        return export_output(model, self.cfg.to_dict(), self.output_dir, results, log_json)
