"""Seeing a run: output/training_curve.png from a real 3-epoch run with an evaluation after each epoch (the series
plotted are the log's, at the right epochs; the evaluation panel is not blank), the Pillow fallback, and
ModelScope's TensorboardHook through the configuration writing event files."""
from __future__ import annotations

import glob
import os
import sys

import numpy as np
import pytest
from PIL import Image

import modelscope_utuning  # noqa: F401  (registers the plugin)
from modelscope.metainfo import Trainers
from modelscope.trainers import build_trainer
from modelscope_utuning.extras import MissingExtraError
from modelscope_utuning.training.curve import curve_data, read_log, write_training_curve
from modelscope_utuning.training.export import model_card

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trainer import FIXTURES, ms_dataset, seed_cfg_modify_fn, set_tri_tuner, write_images  # noqa: E402

EPOCHS = 3
ITERS = 3  # 12 images, batch 4

pytestmark = pytest.mark.usefixtures('one_thread')


def with_tensorboard(cfg):
    set_tri_tuner(cfg)
    cfg.train.hooks = list(cfg.train.hooks) + [{'type': 'TensorboardHook', 'interval': 1}]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A 3-epoch tri-tuner run evaluated after every epoch, with TensorBoard logging on."""
    rows = write_images(str(tmp_path_factory.mktemp('images')))
    work_dir = str(tmp_path_factory.mktemp('work'))
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=os.path.join(FIXTURES, 'plain'), work_dir=work_dir, train_dataset=ms_dataset(rows),
        eval_dataset=ms_dataset(rows[:6]), cfg_modify_fn=seed_cfg_modify_fn(with_tensorboard, epochs=EPOCHS)))
    trainer.train()
    return work_dir, os.path.join(work_dir, f'{trainer.timestamp}.log.json')


def colored_fraction(img: Image.Image, box) -> float:
    """Share of pixels in ``box`` that are clearly coloured (not white / grey / black: lines, markers)."""
    a = np.asarray(img.convert('RGB').crop(box), dtype=np.int16)
    return float(((a.max(axis=2) - a.min(axis=2)) > 60).mean())


def test_curve_plots_the_logged_loss_and_every_eval_metric_per_epoch(run, tmp_path):
    work_dir, log = run
    rows = read_log(log)
    evals = [r for r in rows if r.get('mode') == 'eval']
    assert [r['epoch'] for r in evals] == [1, 2, 3] and all('evaluation/accuracy' in r for r in evals)
    train = [r for r in rows if r.get('mode') == 'train']
    assert len(train) == EPOCHS * ITERS

    curve = write_training_curve(rows, str(tmp_path / 'curve.png'), iters_per_epoch=ITERS)
    assert curve.backend == 'matplotlib'
    xs, losses = curve.data.train
    np.testing.assert_allclose(xs, [e + i / ITERS for e in range(EPOCHS) for i in range(1, ITERS + 1)])
    assert losses == [r['loss'] for r in train]
    assert curve.data.eval == {'accuracy': ([1.0, 2.0, 3.0], [r['evaluation/accuracy'] for r in evals])}
    # the same series without being told the iterations per epoch (read from the log)
    assert curve_data(rows) == curve.data

    loss_ax, eval_ax = curve.figure.axes
    (loss_line,) = loss_ax.lines
    np.testing.assert_allclose(loss_line.get_xdata(), xs)
    np.testing.assert_allclose(loss_line.get_ydata(), losses)
    assert [line.get_label() for line in eval_ax.lines] == ['accuracy']
    np.testing.assert_allclose(eval_ax.lines[0].get_xdata(), [1, 2, 3])
    for ax in (loss_ax, eval_ax):
        assert ax.get_xlabel() == 'epoch' and ax.get_legend() is not None
        assert [t for t in ax.get_xticks() if 0 <= t <= EPOCHS] == [0, 1, 2, 3]

    # the trainer's own output: the eval panel (right half) has lines in it, as has the loss panel
    img = Image.open(os.path.join(work_dir, 'output', 'training_curve.png'))
    w, h = img.size
    assert colored_fraction(img, (w // 2 + 60, 30, w - 10, h - 50)) > 0.002
    assert colored_fraction(img, (60, 30, w // 2 - 10, h - 50)) > 0.002
    with open(os.path.join(work_dir, 'output', 'README.md')) as f:
        card = f.read()
    assert '![training curve](training_curve.png)' in card and 'basic drawing' not in card


def test_pillow_fallback_reads_the_same_series_and_draws_the_eval_panel(run, tmp_path):
    _, log = run
    curve = write_training_curve(read_log(log), str(tmp_path / 'basic.png'), iters_per_epoch=ITERS,
                                 backend='pillow')
    assert curve.backend == 'pillow' and list(curve.data.eval) == ['accuracy']
    img = Image.open(curve.path)
    w, h = img.size
    assert colored_fraction(img, (w // 2 + 50, 40, w - 20, h - 50)) > 0.001  # the eval panel is not empty
    card = model_card(type('M', (), {'CLASSES': ['a']})(), {}, {}, 1, 2, curve_backend='pillow')
    assert "pip install 'modelscope-utuning[plot]'" in card


def test_tensorboard_hook_writes_event_files(run):
    work_dir, _ = run
    events = glob.glob(os.path.join(work_dir, 'tensorboard_output', 'events.out.tfevents.*'))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    tags = acc.Tags()['scalars']
    assert 'loss' in tags and len(acc.Scalars('loss')) == EPOCHS * ITERS
    assert any('accuracy' in t for t in tags), tags


def test_tensorboard_hook_without_tensorboard_says_what_to_install(tmp_path):
    """The check runs while the configuration is read, before anything trains (sys.modules[...] = None is
    Python's own way to make an import fail)."""
    saved = {k: sys.modules.get(k) for k in ('tensorboard', 'torch.utils.tensorboard')}
    sys.modules['tensorboard'] = None
    try:
        with pytest.raises(MissingExtraError, match=r"pip install 'modelscope-utuning\[tensorboard\]'"):
            build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
                model=os.path.join(FIXTURES, 'plain'), work_dir=str(tmp_path),
                train_dataset=write_images(str(tmp_path)), cfg_modify_fn=seed_cfg_modify_fn(with_tensorboard)))
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    assert not glob.glob(os.path.join(str(tmp_path), '*.pth'))
