"""Defaults for the parts of configuration.json a model may leave out, filled before ``cfg_modify_fn`` runs so
that the seed's ``cfg.train.lr_scheduler.T_max = ...`` always has something to edit."""
from __future__ import annotations

from modelscope.metainfo import Models
from modelscope.utils.config import Config, ConfigDict

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


def add_warmup(cfg: Config) -> Config:
    """Linear warm-up over the first tenth of the epochs, from 10% of the learning rate; none for runs of fewer
    than 5 epochs, where it would eat most of the training."""
    epochs = int(cfg.safe_get('train.max_epochs') or 0)
    if epochs >= 5:
        options = cfg.train.lr_scheduler.setdefault('options', ConfigDict())
        options.setdefault('warmup', ConfigDict(type='LinearWarmup', warmup_iters=max(1, epochs // 10),
                                                warmup_ratio=0.1))
    return cfg
