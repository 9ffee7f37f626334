"""``train.probe_epochs`` (training/schedule.py): the head learns alone for the first epochs, then the tuners join.
Off by default (measured worse on the colour few-shot set, issue #23); as an option it must do exactly that."""
import os

import pytest
import torch
from modelscope.metainfo import Trainers
from modelscope.trainers import build_trainer

from modelscope_utuning.training.schedule import probe_epochs

from test_trainer import FIXTURES, TRI_TUNER, rows, seed_cfg_modify_fn  # noqa: F401  (rows: a fixture)


def test_probe_epochs_setting():
    assert probe_epochs(None, 20, True, False) == 0  # the default: off
    assert probe_epochs('none', 20, True, False) == 0
    assert probe_epochs('auto', 20, True, False) == 10
    assert probe_epochs('auto', 15, True, False) == 7
    assert probe_epochs('auto', 20, False, False) == 0  # a linear probe: nothing waits
    assert probe_epochs('auto', 20, True, True) == 0  # a trained head: nothing to probe
    assert probe_epochs(0.25, 20, True, False) == 5
    assert probe_epochs(3, 20, True, False) == 3
    assert probe_epochs(30, 20, True, False) == 20
    for bad in (1.5, -1, 'half', True):
        with pytest.raises(ValueError, match='train.probe_epochs'):
            probe_epochs(bad, 20, True, False)


def test_a_bad_probe_epochs_is_named_when_the_trainer_is_built(rows, tmp_path):  # noqa: F811
    def extra(cfg):
        cfg.train.probe_epochs = 1.5
    with pytest.raises(Exception, match='probe_epochs'):
        build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
            model=os.path.join(FIXTURES, 'plain'), work_dir=str(tmp_path), train_dataset=rows,
            cfg_modify_fn=seed_cfg_modify_fn(extra)))


def test_head_alone_first_then_tuners(rows, tmp_path):  # noqa: F811
    """2 epochs, probe_epochs 1: after the first epoch the head has moved and no tuner parameter has (no AdamW state
    either); after the second the tuners have moved too and every trainable parameter is trainable again."""
    def extra(cfg):
        cfg.model.backbone.tuners = TRI_TUNER
        cfg.train.probe_epochs = 1
        cfg.train.warmup = 'none'
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=os.path.join(FIXTURES, 'plain'), work_dir=str(tmp_path), train_dataset=rows,
        cfg_modify_fn=seed_cfg_modify_fn(extra, epochs=2)))
    net = trainer.model_unwrapped.model
    roles = net.parameter_roles()
    start = {n: p.detach().clone() for n, p in net.named_parameters() if n in roles}
    seen = {}

    class Snapshot:
        def after_train_epoch(self, tr):
            seen[tr.epoch] = ({n: p.detach().clone() for n, p in net.named_parameters() if n in roles},
                              sum(1 for p in net.parameters() if p in tr.optimizer.state))

    from modelscope.trainers.hooks import Hook
    hook = type('SnapshotHook', (Hook,), dict(Snapshot.__dict__))()
    trainer.register_hook(hook)
    trainer.train()
    first, n_state = seen[0]
    moved = {n for n in roles if not torch.equal(first[n], start[n])}
    assert moved and all(roles[n] == 'head' for n in moved), sorted(moved)[:5]
    assert n_state == sum(1 for n in roles if roles[n] == 'head')
    second, _ = seen[1]
    assert any(roles[n] == 'tuner' and not torch.equal(second[n], first[n]) for n in roles)
    assert all(p.requires_grad for n, p in net.named_parameters() if n in roles)
