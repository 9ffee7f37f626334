"""Training on a real pre-trained backbone at a high learning rate: every parallel tuner kind on every OP must train.

DINOv2 ViT-S/14 (real weights, made offline by ``../shared/tools/real_backbone.py``; ``.ci/run`` builds it and
points ``UTUNING_REAL_BACKBONE`` at it), 56 px, real images (the Fashion-MNIST subset shipped with the package),
8 per class, a plain AdamW loop at lr 1e-2 for the tuners and the head alike, no warm-up, 16 steps of 20 images.
The loss must fall well below log(10) and the training images must be mostly right.

Version 0.1's parametrization (``join: absolute``: the tuner's output in absolute units; a random fresh head)
fails this: the parallel adapter and prefix end at chance (10 %) with a loss above 2.7, because one AdamW step
moves DINOv2's small residual stream (RMS 0.05-0.5) by tens of per cent through them.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modelscope_utuning import VisionEfficientTuningModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(os.path.dirname(ROOT), 'shared', 'tools', 'real_backbone.py')
DEFAULT_PATH = os.path.join(os.path.expanduser('~'), '.cache', 'modelscope_utuning', 'dinov2_vits14.safetensors')
DATA = os.path.join(ROOT, 'modelscope_utuning', 'demo_data', 'fashion_mnist_subset.npz')
DINOV2_S14 = {'patch_size': 14, 'embed_dim': 384, 'depth': 12, 'num_heads': 6, 'init_values': 1.0, 'img_size': 56}
KINDS = [(kind, op) for kind in ('adapter', 'prefix', 'prompt') for op in ('mha', 'ffn', 'block')] + \
    [('lora', 'mha'), ('lora', 'ffn')]  # LoRA: plain AdamW at 1e-2 ended at chance before A learnt at lr / 16


@pytest.fixture(scope='module')
def real_weights():
    path = os.environ.get('UTUNING_REAL_BACKBONE', DEFAULT_PATH)
    if not os.path.isfile(path) and os.path.isfile(TOOL):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        subprocess.run([sys.executable, TOOL, path], check=True, capture_output=True, timeout=600)
    if not os.path.isfile(path):
        if os.environ.get('UTUNING_REQUIRE_REAL_BACKBONE'):
            pytest.fail(f'the real backbone {path} is missing and {TOOL} could not make it')
        pytest.skip(f'no real backbone: set UTUNING_REAL_BACKBONE or provide {TOOL}')
    return path


@pytest.fixture(scope='module')
def few_shot():
    """8 images of each of the 10 classes, 56 px, ImageNet-normalised (DINOv2's training statistics)."""
    z = np.load(DATA)
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(z['labels'] == c), 8, replace=False) for c in range(10)])
    x = torch.from_numpy(z['images'][idx]).float().div(255)[:, None].expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(56, 56), mode='bilinear', align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return x, torch.from_numpy(z['labels'][idx])


@pytest.mark.parametrize('kind,op', KINDS, ids=[f'{k}-{o}' for k, o in KINDS])
def test_parallel_tuner_trains_on_a_real_backbone_at_lr_1e_2(real_weights, few_shot, kind, op):
    x, y = few_shot
    torch.manual_seed(0)
    size = {'dim': 10} if kind == 'adapter' else {'rank': 10} if kind == 'lora' else {'length': 10}
    model = VisionEfficientTuningModel(backbone=dict(DINOV2_S14, pretrained_weights=real_weights,
                                                     tuners=[dict(type=kind, op=op, **size)]),
                                       head={'num_classes': 10})
    from modelscope_utuning.training.optim import param_groups  # the trainer's groups (the tuners' lr factors)
    opt = torch.optim.AdamW(param_groups(model, 1e-2, 1e-4), lr=1e-2, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(16):
        i = torch.randperm(len(y), generator=g)[:20]
        loss = model({'imgs': x[i], 'labels': y[i]})['loss']
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model({'imgs': x})['labels'] == y).float().mean().item()
    assert all(np.isfinite(losses)), losses
    assert np.mean(losses[-3:]) < 0.45 * np.log(10), losses
    assert accuracy >= 0.6, (accuracy, losses)


def test_int8_calibration_brings_a_real_backbone_closer_to_fp32(real_weights, few_shot):
    """DINOv2's linears have outlier input channels: smoothing from ranges calibrated on 40 images brings the int8
    features of 40 others closer to fp32 (measured: relative error 5.5 % -> 3.8 %, min cosine 0.9956 -> 0.9982)."""
    from modelscope_utuning.backbone import int8
    from modelscope_utuning.backbone.linear import quantize_frozen_linears
    x, _ = few_shot
    model = VisionEfficientTuningModel(backbone=dict(DINOV2_S14, pretrained_weights=real_weights),
                                       head={'num_classes': 10}).eval()
    backbone = model.backbone
    with torch.no_grad():
        exact = backbone.forward_features(x[40:])
        assert quantize_frozen_linears(model) == 48
        plain = backbone.forward_features(x[40:])
        with int8.calibrating(model):
            backbone.forward_features(x[:40])
        smoothed = backbone.forward_features(x[40:])

    def error(f):
        return float((f - exact).norm() / exact.norm())
    assert 0 < error(smoothed) < 0.8 * error(plain), (error(smoothed), error(plain))
    assert error(smoothed) < 0.05


# -- never worse than the probe: real colour photos at the trainer's defaults -----------------------------------
COLOUR_TOOL = os.path.join(os.path.dirname(ROOT), 'shared', 'tools', 'colour_objects.py')
STAMPS = os.environ.get('UTUNING_TUXPAINT_STAMPS', '/usr/share/tuxpaint/stamps')
TRI = [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 10},
       {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 10},
       {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 10}]


@pytest.fixture(scope='module')
def colour_few_shot(tmp_path_factory):
    """Real colour photographs and drawings of 10 object classes (Debian's Tux Paint stamps, GPL-2, made here by the
    team's tool, never stored in the repository): 5 per class to train, the other 109 to test, 64 px files."""
    if not (os.path.isdir(os.path.join(STAMPS, 'animals')) and os.path.isfile(COLOUR_TOOL)):
        message = (f'no Tux Paint stamps under {STAMPS} (apt-get install -y tuxpaint-stamps-default) or no '
                   f'{COLOUR_TOOL}')
        if os.environ.get('UTUNING_REQUIRE_REAL_BACKBONE'):
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp('colour')
    subprocess.run([sys.executable, COLOUR_TOOL, str(root / 'made'), '--stamps', STAMPS, '--size', '64'],
                   check=True, capture_output=True, timeout=300)
    return split_colour_set(str(root / 'made'), str(root), shots=5, seed=0)


def split_colour_set(made: str, root: str, shots: int, seed: int):
    """``shots`` images per class (drawn with ``seed``) in ``root/train``, the rest in ``root/test``."""
    import shutil
    rng = np.random.default_rng(seed)
    for c in sorted(os.listdir(os.path.join(made, 'train'))):
        files = sorted(os.path.join(made, s, c, n) for s in ('train', 'test')
                       for n in os.listdir(os.path.join(made, s, c)))
        files = [files[i] for i in rng.permutation(len(files))]
        for split, part in (('train', files[:shots]), ('test', files[shots:])):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for f in part:
                shutil.copy(f, os.path.join(root, split, c))
    return os.path.join(root, 'train'), os.path.join(root, 'test')


def trained_accuracy(weights: str, data, work_dir: str, tuners, overrides=None, img_size: int = 56,
                     epochs: int = 20, seed: int = 0) -> float:
    """Top-1 on the test folder after ``build_trainer(...).train()`` at the trainer's defaults (AdamW, lr, head lr,
    warm-up, schedule, probe-first epochs ...) except the run's length (20 epochs of batch 10, the issue's), the
    tuners and ``overrides`` (dotted key -> value)."""
    import json
    from modelscope.metainfo import Trainers
    from modelscope.trainers import build_trainer
    from modelscope_utuning.training.defaults import model_configuration
    train_dir, test_dir = data
    model_dir = os.path.join(work_dir, 'model')
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, 'configuration.json'), 'w') as f:
        json.dump(model_configuration(
            backbone=dict(DINOV2_S14, img_size=img_size, pretrained_weights=weights),
            head={'num_classes': 10},
            preprocessor={'type': 'vision-efficient-tuning-preprocessor', 'img_size': img_size,
                          'interpolation': 'bilinear', 'val': {'resize': img_size},
                          'train': {'scale': [0.75, 1.0], 'ratio': [0.9, 1.1], 'hflip': 0.5}}), f)

    def cfg_modify_fn(cfg):
        if tuners:
            cfg.model.backbone.tuners = tuners
        cfg.train.max_epochs = epochs
        cfg.train.lr_scheduler.T_max = epochs
        cfg.train.dataloader.batch_size_per_gpu = 10
        cfg.evaluation.dataloader.batch_size_per_gpu = 128
        cfg.evaluation.period = {'interval': epochs}
        cfg.train.checkpoint = {'period': {'interval': epochs}}
        for dotted, value in (overrides or {}).items():
            node = cfg
            *parents, last = dotted.split('.')
            for k in parents:
                node = node[k]
            node[last] = value
        return cfg

    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=model_dir, work_dir=os.path.join(work_dir, 'work'), train_dataset=train_dir, eval_dataset=test_dir,
        cfg_modify_fn=cfg_modify_fn, seed=seed))
    trainer.train()
    return float((trainer.metric_values or trainer.evaluate())['accuracy'])


@pytest.fixture(scope='module')
def colour_probe(real_weights, colour_few_shot, tmp_path_factory):
    """The linear probe's test accuracy on the colour set (seed 0), trained once: it trains the head alone, at the
    head's own rate max(lr, 1e-2), so it is the same probe for every tuner lr of the test below."""
    accuracy = trained_accuracy(real_weights, colour_few_shot, str(tmp_path_factory.mktemp('probe')), None)
    assert accuracy > 0.3, accuracy  # the probe itself learnt (chance: 10 %)
    return accuracy


@pytest.mark.parametrize('lr', [None, 5e-4], ids=['default-lr', 'lr-5e-4'])
def test_tuned_model_is_not_worse_than_its_probe_on_colour_photos(real_weights, colour_few_shot, colour_probe,
                                                                  tmp_path, lr):
    """Every parallel tuner starts silent, so a tuned model starts as its linear probe: at the trainer's defaults,
    training the tri-tuner with the head must not end below training the head alone on the same images, at the
    trainer's default lr (1e-3) nor at 5e-4, where 100 steps under-trained the tuners before policy rule 9.

    Measured at these settings (56 px, 5 shots, 20 epochs of batch 10; issue #23), seeds 0 / 1 / 2, probe 52.3 / 53.2
    / 59.6 %:
    - the defaults (stochastic depth 0.1; rule 9: the parallel scale starts at 4e-3 / lr, 4 at 1e-3, 8 at 5e-4):
      57.8 / 58.7 / 60.6 % at lr 1e-3, 55.0 % at 5e-4 (seed 0);
    - the scale starting at 1 (before rule 9): 54.1 / 60.6 / 63.3 % at 1e-3, 51.4 / 58.7 / 63.3 % at 5e-4, below the
      probe at seed 0;
    - no stochastic depth either (``train.drop_path: 0``, the defaults before that): 50.5 / 56.9 / 61.5 % at 1e-3,
      below the probe at seed 0, the regression the issue reported.
    This test runs seed 0, where the margins are smallest. Training the head first (LP-FT, ``train.probe_epochs:
    auto``), a candidate fix that measured worse, ends at 45.9 % at seed 0 and lr 1e-3."""
    overrides = None if lr is None else {'train.optimizer.lr': lr}
    tuned = trained_accuracy(real_weights, colour_few_shot, str(tmp_path / 'tri'), TRI, overrides)
    assert tuned >= colour_probe, (tuned, colour_probe)
