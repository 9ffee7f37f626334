"""Tiny colour runs shared by the tests of several rooms (trainer, labels, run outputs, data, preprocessing,
pipeline, registration, export, CLI): image folders with one solid colour per class, a tiny ViT model folder, a
trainer built on them through ``build_trainer``, and ``trained``, a model trained on four colour classes until it is
always right (a module-scoped fixture: a test module imports it and gets its own).

Not a test module (no ``test_`` prefix); imported as ``from colour_runs import ...`` like the helpers other test
modules share (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

import modelscope_utuning  # noqa: F401
from modelscope.metainfo import Trainers
from modelscope.pipelines import pipeline
from modelscope.trainers import build_trainer
from modelscope_utuning.training.defaults import model_configuration

COLORS = {'a': (230, 20, 20), 'b': (20, 230, 20), 'c': (20, 20, 230), 'd': (230, 230, 230)}
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
           tuners=[{'type': 'adapter', 'op': 'ffn', 'dim': 4}])


def write_folder(root, classes, n=6, seed=0):
    """Solid-colour images, a little noise: a class per colour, trivially learnt."""
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            img = np.clip(np.array(COLORS[c]) + rng.normal(0, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, c, f'{i}.png'))
    return str(root)


def model_dir(root, num_classes=4, **extra):
    os.makedirs(root, exist_ok=True)
    cfg = model_configuration(dict(VIT), {'num_classes': num_classes},
                              preprocessor={'type': 'vision-efficient-tuning-preprocessor', 'resize': 32}, **extra)
    with open(os.path.join(root, 'configuration.json'), 'w') as f:
        json.dump(cfg, f)
    return str(root)


def train(model, work_dir, train_data, eval_data=None, epochs=12, extra=None, **kw):
    def cfg_modify_fn(cfg):
        cfg.train.max_epochs = epochs
        cfg.train.lr_scheduler.T_max = epochs
        cfg.train.optimizer.lr = 1e-2
        cfg.train.amp = 'fp32'
        cfg.train.dataloader.batch_size_per_gpu = 8
        cfg.train.logging = {'interval': 1}  # a loss row per step: the run has a curve to draw
        if extra:
            extra(cfg)
        return cfg
    return build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=model, work_dir=str(work_dir), train_dataset=train_data, eval_dataset=eval_data,
        cfg_modify_fn=cfg_modify_fn, seed=0, **kw))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A model trained on four colour classes until it is always right, and its work_dir."""
    root = tmp_path_factory.mktemp('rel')
    data = write_folder(root / 'train', 'abcd')
    trainer = train(model_dir(root / 'model'), root / 'work', data)
    trainer.train()
    out = str(root / 'work' / 'output')
    p = pipeline('vision-efficient-tuning', out, device='cpu')
    for c in 'abcd':
        assert p(os.path.join(data, c, '0.png'))['labels'][0] == c  # always right
    return root, out
