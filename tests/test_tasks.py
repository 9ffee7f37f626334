"""Several bypass tasks trained in one run on one frozen forward per step (issue 22, item 3): training/tasks.py.

What must hold: one frozen pass per step whatever the number of tasks (over the distinct images of their batches);
over the same images in the same order each task ends at the weights of its own single run, bit for bit; each task
writes its own output/ that loads alone and together with the others; a set of tasks that cannot step together is
refused before any step."""
import os

import pytest
import torch
from modelscope.metainfo import Trainers
from modelscope.pipelines import pipeline
from modelscope.trainers import build_trainer

from modelscope_utuning import train_bypass_tasks
from modelscope_utuning.backbone.block import Block

from test_feature_cache import set_train_transform
from test_trainer import FIXTURES, TRI_TUNER, rows, seed_cfg_modify_fn  # noqa: F401  (rows: a fixture)

# three labelings of the same images: one image set with three label columns
RELABEL = {'a': lambda y: y, 'b': lambda y: (y + 1) % 3, 'c': lambda y: 2 - y}


def task_rows(rows, task):  # noqa: F811
    return [dict(r, label=RELABEL[task](r['label'])) for r in rows]


def trainer_for(rows, work_dir, task, shuffle=False, epochs=2, more=None):  # noqa: F811
    def extra(cfg):
        cfg.model.backbone.tuners = TRI_TUNER
        cfg.model.backbone.bypass = True
        cfg.train.dataloader.shuffle = shuffle
        cfg.train.dataloader.workers_per_gpu = 0
        set_train_transform(cfg, {'augment': False})
        if more:
            more(cfg)
    return build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=os.path.join(FIXTURES, 'plain'), work_dir=str(work_dir), train_dataset=task_rows(rows, task),
        cfg_modify_fn=seed_cfg_modify_fn(extra, epochs=epochs)))


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model_unwrapped.model.named_parameters() if p.requires_grad}


@pytest.fixture()
def frozen_calls(monkeypatch):
    calls = []
    original = Block.forward_frozen

    def counting(self, x, *a, **k):
        calls.append(x.shape[0])
        return original(self, x, *a, **k)
    monkeypatch.setattr(Block, 'forward_frozen', counting)
    return calls


@pytest.mark.parametrize('cache', [False, 'auto'])
def test_tasks_end_where_their_own_runs_end_on_one_frozen_pass_per_step(rows, tmp_path, frozen_calls, cache):  # noqa: F811
    """Without the feature cache every step runs one frozen pass for the three tasks; with it (auto: bypass and no
    augmentation) only the first epoch's steps do, and the tasks read it back after, as a single run does."""
    def setting(cfg):
        cfg.train.feature_cache = cache
    joint = {t: trainer_for(rows, tmp_path / 'joint' / t, t, more=setting) for t in RELABEL}
    start = {t: weights(tr) for t, tr in joint.items()}
    outputs = train_bypass_tasks(joint)
    depth = len(joint['a'].model_unwrapped.model.backbone.blocks)
    steps = 3 if cache else 2 * 3  # 2 epochs of 12 images in batches of 4
    assert frozen_calls == [4] * (depth * steps)  # one pass of the 4 distinct images per step, for three tasks
    frozen_calls.clear()
    for t in RELABEL:
        single = trainer_for(rows, tmp_path / 'single' / t, t, more=setting)
        single.train()
        mine, theirs = weights(joint[t]), weights(single)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), t
        assert sum(not torch.equal(mine[k], start[t][k]) for k in mine) > len(mine) // 2  # trained, not left as is
        assert outputs[t] == joint[t].output_dir and os.path.isfile(os.path.join(outputs[t], 'pytorch_model.pt'))
    shared = joint['a'].model_unwrapped.model.backbone.blocks[0].mlp.fc1.weight
    assert joint['c'].model_unwrapped.model.backbone.blocks[0].mlp.fc1.weight is shared  # held once


def test_each_output_loads_alone_and_together(rows, tmp_path):  # noqa: F811
    joint = {t: trainer_for(rows, tmp_path / t, t, shuffle=True, epochs=1) for t in RELABEL}
    outputs = train_bypass_tasks(joint)
    images = [r['img_path:FILE'] for r in rows[:5]]
    alone = {t: pipeline('vision-efficient-tuning', outputs[t], device='cpu')(images) for t in RELABEL}
    together = pipeline('vision-efficient-tuning', [outputs[t] for t in RELABEL], device='cpu')(images)
    for i in range(len(images)):
        for j, t in enumerate(RELABEL):
            assert together[i][j]['labels'] == alone[t][i]['labels']
            assert torch.allclose(torch.tensor(together[i][j]['scores']), torch.tensor(alone[t][i]['scores']),
                                  atol=1e-5)
    # three tasks, three sets of tuners (not one set shared). Their values may well be equal: the tasks' labels are
    # permutations of each other, and with a zero-started head a permutation of the classes changes no gradient
    # that reaches the tuners, so only rounding could tell them apart (it did in fp32; in bf16 it did not).
    a, c = (joint[t].model_unwrapped.model.tuner_parameters() for t in ('a', 'c'))
    assert a.keys() == c.keys() and all(a[k].data_ptr() != c[k].data_ptr() for k in a)


def test_shuffled_tasks_over_the_same_images_share_each_batch(rows, tmp_path, frozen_calls):  # noqa: F811
    def no_cache(cfg):
        cfg.train.feature_cache = False
    joint = {t: trainer_for(rows, tmp_path / t, t, shuffle=True, epochs=2, more=no_cache) for t in RELABEL}
    train_bypass_tasks(joint)
    assert len(frozen_calls) == 2 * 3 * len(joint['a'].model_unwrapped.model.backbone.blocks)
    assert set(frozen_calls) == {4}  # one shuffle order for the three tasks: each step's images are shared


def test_tasks_over_different_images_step_together(rows, tmp_path, frozen_calls):  # noqa: F811
    def no_cache(cfg):
        cfg.train.feature_cache = False
    first = trainer_for(rows[:8], tmp_path / 'x', 'a', more=no_cache)
    second = trainer_for(rows[4:], tmp_path / 'y', 'b', more=no_cache)
    train_bypass_tasks({'x': first, 'y': second})
    depth = len(first.model_unwrapped.model.backbone.blocks)
    assert frozen_calls == [8] * (depth * 2 * 2)  # each step: both batches of 4 in one frozen pass


@pytest.mark.parametrize('change, match', [
    (lambda cfg: setattr(cfg.model.backbone, 'bypass', False), 'not in bypass mode'),
    (lambda cfg: setattr(cfg.train, 'max_epochs', 3), 'max_epochs'),
])
def test_tasks_that_cannot_step_together_are_refused_before_any_step(rows, tmp_path, frozen_calls, change,  # noqa: F811
                                                                      match):
    good = trainer_for(rows, tmp_path / 'good', 'a')
    bad = trainer_for(rows, tmp_path / 'bad', 'b', more=change)
    with pytest.raises(ValueError, match=match):
        train_bypass_tasks({'good': good, 'bad': bad})
    assert not frozen_calls


def test_tasks_on_other_frozen_weights_are_refused(rows, tmp_path, frozen_calls):  # noqa: F811
    good, bad = trainer_for(rows, tmp_path / 'good', 'a'), trainer_for(rows, tmp_path / 'bad', 'b')
    with torch.no_grad():
        bad.model_unwrapped.model.backbone.blocks[1].attn.proj.weight.mul_(1.01)  # another pre-trained backbone
    with pytest.raises(ValueError, match="task 'bad': its frozen backbone differs"):
        train_bypass_tasks({'good': good, 'bad': bad})
    assert not frozen_calls


def test_different_numbers_of_batches_are_refused(rows, tmp_path, frozen_calls):  # noqa: F811
    with pytest.raises(ValueError, match='numbers of batches'):
        train_bypass_tasks({'x': trainer_for(rows, tmp_path / 'x', 'a'), 'y': trainer_for(rows[:8], tmp_path / 'y', 'b')})
    assert not frozen_calls
