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
