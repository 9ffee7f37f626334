"""Defaults for the parts of configuration.json a model may leave out, filled before ``cfg_modify_fn`` runs so
that the seed's ``cfg.train.lr_scheduler.T_max = ...`` always has something to edit."""
from __future__ import annotations

from typing import Any, Optional

from modelscope.metainfo import Models
from modelscope.utils.config import Config, ConfigDict

# The head's learning rate when train.optimizer.head_lr is not set: max(lr, this). The top of the linear probe's
# plateau in the learning-rate sweep of benchmarks/accuracy.py (AdamW, 60 steps; DINOv2 ViT-S/14 at 112 px, 10-shot
# Fashion-MNIST): 5e-4 50.4 %, 1e-3 55.0 %, 2e-3 58.2 %, 5e-3 64.0 %, 1e-2 63.8 % - a fresh head under-fits below it.
DEFAULT_HEAD_LR = 1e-2

# Stochastic depth while tuners (or the backbone) train, when neither train.drop_path nor
# model.backbone.drop_path_rate says otherwise (policy.py, rule 8): the rate of the last block, rising linearly from
# 0 at the first (timm's rule; 0.1, a common rate for fine-tuning ViT-S/B). Measured (benchmarks/README.md, DINOv2
# ViT-S/14, 112 px): on 5-shot colour photos (5 seeds) the tri-tuner at lr 5e-4 / 2e-3 / 5e-3 went from 58.7 / 59.6 /
# 58.7 % without it, level with its probe (58.7 %), to 60.2 / 64.8 / 67.7 %; without it the tuners fit the 50
# training images by epoch 7 and their test accuracy stops moving. On 10-shot Fashion-MNIST (3 seeds) the gains at
# 2e-3 / 5e-3 stay (70.4 / 70.4 % vs 70.5 / 72.1 %; probe 64.2 %); at 5e-4 it costs 3 points (63.1 vs 66.3 %).
DEFAULT_DROP_PATH = 0.1
DROP_PATH_KEY = 'train.drop_path'

# A fresh parallel tuner's output grows at least as fast as it does at this learning rate (policy.py, rule 9): with
# an Adam-family optimizer at a lower lr its learned scale starts at PARALLEL_SPEED_LR / lr instead of 1 (8 at 5e-4).
# Measured (benchmarks/README.md, "The parallel scale's start"; DINOv2 ViT-S/14 at 112 px, the tri-tuner minus its
# linear probe at lr 5e-4 / 1e-3 / 2e-3, 3 seeds of 10-shot Fashion-MNIST and 5 of 5-shot colour photos): with the
# scale at 1, -1.1 / +1.7 / +6.2 and +1.5 / +4.2 / +6.1 points; from 2e-3 / lr, +3.2 / +4.9 / +6.2 and +4.4 / +5.7 /
# +6.1; from 4e-3 / lr, +5.9 / +6.6 / +6.5 and +5.7 / +6.4 / +6.5, level with the scale-1 runs at 5e-3 and 1e-2
# (+6.2 / +7.6 and +9.0 / +7.3), which it leaves as they are. Faster than that hurts: the scale at 4 at lr 1e-2 (a
# pace of 4e-2) ended 4.0 points under the probe on the colour photos, and at 2e-2 collapsed.
PARALLEL_SPEED_LR = 4e-3

DEFAULTS = {
    'task': 'vision-efficient-tuning',
    'pipeline': {'type': 'vision-efficient-tuning'},
    'train': {
        'max_epochs': 10,
        'dataloader': {'batch_size_per_gpu': 32, 'workers_per_gpu': 0},
        # Tuners and head: AdamW; no decay on prompts, prefixes, embeddings, norms, biases (see optim.py).
        'optimizer': {'type': 'AdamW', 'lr': 1e-3, 'weight_decay': 1e-4},
        'lr_scheduler': {'type': 'CosineAnnealingLR', 'T_max': 10,
                         'options': {'by_epoch': True}},
    },
    'evaluation': {
        'dataloader': {'batch_size_per_gpu': 64, 'workers_per_gpu': 0, 'shuffle': False},
        'metrics': ['accuracy'],
    },
}


def read_drop_path(value: Any) -> Optional[float]:
    """``train.drop_path``: None for ``'auto'`` (or unset), else the rate; ValueError for anything else."""
    if value is None or value == 'auto':
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{DROP_PATH_KEY}={value!r}: expected 'auto' or a number in [0, 1)")
    return float(value)


def model_configuration(backbone: dict, head: dict, **sections) -> dict:
    """A configuration.json for our model: framework, task, pipeline and the model's backbone / head, plus any
    further top-level sections given (``preprocessor``, ``train``, ``evaluation`` ...)."""
    return {'framework': 'pytorch', 'task': DEFAULTS['task'], 'pipeline': dict(DEFAULTS['pipeline']),
            'model': {'type': Models.vision_efficient_tuning, 'backbone': backbone, 'head': head}, **sections}


def _fill(cfg: ConfigDict, defaults: dict) -> None:
    for key, value in defaults.items():
        if key not in cfg or cfg[key] is None:
            cfg[key] = ConfigDict(value) if isinstance(value, dict) else value
        elif isinstance(value, dict) and isinstance(cfg[key], dict):
            _fill(cfg[key], value)


def apply_defaults(cfg: Config) -> Config:
    """Fill what is missing, never overriding what the configuration says."""
    _fill(cfg, DEFAULTS)
    return cfg
