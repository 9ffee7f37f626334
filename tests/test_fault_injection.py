"""What a run writes is right or absent: SIGKILL a training process at random moments and at the moments that
matter (inside a checkpoint write, between an epoch's two files, inside the final export), then check that

- ``work_dir/output`` is absent, or loads as the fully trained model (its weights are the uninterrupted run's);
- no ``epoch_N.pth`` that exists is half-written (every one loads);
- a resume from the newest readable epoch file (``checkpointing.latest_checkpoint``) ends with exactly the
  weights of the uninterrupted run.

Each training runs in its own process (fp32, one thread, a tiny ViT on generated images, 3 epochs).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

TRAIN = textwrap.dedent('''
    import os, sys, torch
    torch.set_num_threads(1)
    import modelscope_utuning
    from modelscope.metainfo import Trainers
    from modelscope.trainers import build_trainer
    from modelscope_utuning.training.checkpointing import latest_checkpoint
    model_dir, data, work_dir, resume = sys.argv[1:5]

    def cfg_modify_fn(cfg):
        cfg.train.max_epochs = 3
        cfg.train.lr_scheduler.T_max = 3
        cfg.train.amp = 'fp32'
        cfg.train.dataloader.batch_size_per_gpu = 4
        cfg.train.checkpoint = {'period': {'interval': 1}}
        return cfg
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=model_dir, work_dir=work_dir, train_dataset=data, cfg_modify_fn=cfg_modify_fn, seed=7))
    start = latest_checkpoint(work_dir) if resume == '1' else None
    print('resume from', start, flush=True)
    trainer.train(checkpoint_path=start)
    print('done', flush=True)
''')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    from PIL import Image
    from modelscope_utuning.training.defaults import model_configuration
    root = tmp_path_factory.mktemp('fault')
    rng = np.random.default_rng(0)
    for c in ('cat', 'dog', 'fox'):
        os.makedirs(root / 'data' / c)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / 'data' / c / f'{i}.png')
    os.makedirs(root / 'model')
    cfg = model_configuration(
        dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
             tuners=[{'type': 'adapter', 'op': 'mha', 'dim': 4}, {'type': 'prefix', 'op': 'block', 'length': 3}]),
        {'num_classes': 3}, preprocessor={'type': 'vision-efficient-tuning-preprocessor', 'resize': 32})
    with open(root / 'model' / 'configuration.json', 'w') as f:
        json.dump(cfg, f)
    (root / 'train.py').write_text(TRAIN)
    ref = _run(root, root / 'reference', resume=False)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return root, _weights(root / 'reference' / 'output')


def _env(fault=None):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    env.pop('UTUNING_FAULT', None)
    if fault:
        env['UTUNING_FAULT'] = fault
    return env


def _args(root, work_dir, resume):
    return [sys.executable, str(root / 'train.py'), str(root / 'model'), str(root / 'data'), str(work_dir),
            '1' if resume else '0']


def _run(root, work_dir, resume, fault=None):
    """The training script, its output in a file (not a pipe another process could hold open)."""
    log = str(work_dir) + ('.resume' if resume else '') + '.log'
    with open(log, 'w') as f:
        proc = subprocess.run(_args(root, work_dir, resume), stdout=f, stderr=subprocess.STDOUT, timeout=600,
                              env=_env(fault))
    proc.stderr = open(log).read()
    return proc


def _weights(folder):
    from modelscope_utuning import load_model
    model = load_model(str(folder))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _check_after_kill(root, work_dir, reference):
    out = work_dir / 'output'
    if out.exists():  # present: the whole trained model, nothing less
        got = _weights(out)
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k]) for k in reference), 'output/ holds another model'
    from modelscope_utuning.training.checkpointing import epoch_files, readable
    for n, (model_file, state_file) in epoch_files(str(work_dir)).items():
        assert readable(model_file), f'{model_file} is half-written'
        if os.path.exists(state_file):
            assert readable(state_file), f'{state_file} is half-written'
    resumed = _run(root, work_dir, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _weights(out)
    assert all(torch.equal(got[k], reference[k]) for k in reference), 'the resumed run ended elsewhere'
    # what the kill interrupted (a temporary file, an unfinished output folder) is cleared by the next run
    assert not [p for p in os.listdir(work_dir) if p.startswith(('.tmp-', '.output.tmp-')) or '.old-' in p]


# Targeted moments: the n-th time the process reaches a fault point (see fileio.fault_point).
TARGETED = ['atomic_write:1', 'atomic_write:4', 'between_state_and_model:2', 'atomic_write:7',
            'export_ready:1']


@pytest.mark.parametrize('fault', TARGETED)
def test_killed_at_a_write_leaves_nothing_half_done(setup, tmp_path, fault):
    root, reference = setup
    killed = _run(root, tmp_path / 'work', resume=False, fault=fault)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    _check_after_kill(root, tmp_path / 'work', reference)


def test_killed_between_the_renames_of_a_second_export(setup, tmp_path):
    """A work_dir that already has an output/: killed after moving it aside, before the new one is in place."""
    root, reference = setup
    work = tmp_path / 'work'
    first = _run(root, work, resume=False)
    assert first.returncode == 0, first.stderr[-2000:]
    killed = _run(root, work, resume=False, fault='export_between_renames:1')
    assert killed.returncode == -signal.SIGKILL
    assert not (work / 'output').exists()  # absent, not half of two models
    _check_after_kill(root, work, reference)


@pytest.mark.parametrize('trial', range(5))
def test_killed_at_a_random_moment(setup, tmp_path, trial):
    """SIGKILL from outside after a random delay across the whole run (start, epochs, checkpoints, export)."""
    root, reference = setup
    work = tmp_path / 'work'
    delay = random.Random(trial).uniform(2.0, 9.0)
    with open(str(work) + '.log', 'w') as f:
        proc = subprocess.Popen(_args(root, work, False), stdout=f, stderr=subprocess.STDOUT, env=_env())
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    os.makedirs(work, exist_ok=True)
    _check_after_kill(root, work, reference)
