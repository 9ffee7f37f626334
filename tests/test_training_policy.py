"""``training/policy.py``: the decisions the trainer and the ``train`` / ``eval`` commands share.

Head size from the training data's classes, ``model.finetune`` when a trained folder's head has another size (and
that the model then loads with a fresh head, while without it the checkpoint's head does not fit), ``T_max``
following the epochs, the random-backbone case, the configuration order (defaults, then ``cfg_modify_fn``) the
trainer and the command line both use, the classes a model folder names, and the epoch a run resumes from.
Tiny ViTs (32 px, depth 2) in folders written the way the trainer writes them.
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import modelscope_utuning  # noqa: F401  (registers the plugin)
from modelscope.utils.config import Config
from modelscope_utuning.model import VisionEfficientTuningModel
from modelscope_utuning.training import checkpointing, policy
from modelscope_utuning.training.defaults import DEFAULTS, model_configuration
from modelscope_utuning.training.export import export_output

pytestmark = pytest.mark.usefixtures('one_thread')

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
           tuners=[{'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 4}])
CLASSES = ['bird', 'cat', 'dog']
PREPROCESSOR = {'type': 'vision-efficient-tuning-preprocessor', 'img_size': 32, 'crop_pct': 1.0}


def configuration(num_classes=3, **extra):
    return model_configuration(copy.deepcopy(VIT), {'num_classes': num_classes}, preprocessor=dict(PREPROCESSOR),
                               **extra)


@pytest.fixture(scope='module')
def trained_dir(tmp_path_factory):
    """A trained model folder (the trainer's output layout) with a 3-class head and its class names."""
    cfg = configuration()
    torch.manual_seed(0)
    model = VisionEfficientTuningModel(model_dir=None, backbone=cfg['model']['backbone'], head={'num_classes': 3},
                                       CLASSES=list(CLASSES))
    folder = str(tmp_path_factory.mktemp('trained') / 'model')
    export_output(model, cfg, folder)
    return folder


def config_only_dir(folder, cfg):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'configuration.json'), 'w') as f:
        json.dump(cfg, f)
    return str(folder)


def image_folder(folder, classes):
    rng = np.random.default_rng(0)
    for name in classes:
        os.makedirs(os.path.join(folder, name))
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(folder, name, '0.png'))
    return str(folder)


def cfg_of(folder):
    return Config.from_file(os.path.join(folder, 'configuration.json'))


# -- rule 2: head size from the data -------------------------------------------------------------------------------
def test_head_size_is_the_number_of_classes_the_data_names(tmp_path):
    from modelscope_utuning.data import load_dataset_any
    ds = load_dataset_any(image_folder(tmp_path / 'imgs', ['a', 'b', 'c', 'd', 'e']))
    assert policy.head_size(ds) == 5
    path = os.path.join(str(tmp_path / 'imgs'), 'a', '0.png')
    rows = load_dataset_any([{'image': path, 'label': 0}, {'image': path, 'label': 6}])  # no class names
    assert rows.classes is None and policy.head_size(rows) == 7


def test_fit_head_sizes_the_head_and_leaves_finetune_without_weights():
    cfg = Config(configuration(num_classes=7))
    change = policy.fit_head(cfg, 3, has_weights=False)
    assert change == policy.HeadChange(num_classes=3, previous=7, finetune=False) and change.note is None
    assert cfg.model.head.num_classes == 3 and not cfg.model.get('finetune')


def test_fit_head_creates_a_head_section_when_there_is_none():
    cfg = Config(configuration())
    cfg.model.pop('head')
    change = policy.fit_head(cfg, 4, has_weights=True)  # no configured size: nothing to compare, no finetune
    assert change == policy.HeadChange(4, None, False)
    assert cfg.model.head.num_classes == 4 and not cfg.model.get('finetune')


def test_fit_head_leaves_what_fits_or_what_the_user_set():
    cfg = Config(configuration(num_classes=3))
    assert policy.fit_head(cfg, 3, has_weights=True) is None
    assert policy.fit_head(cfg, 5, has_weights=True, user_keys={'model.head.num_classes'}) is None
    assert cfg.model.head.num_classes == 3 and not cfg.model.get('finetune')
    change = policy.fit_head(cfg, 5, has_weights=True, user_keys={'model.finetune'})
    assert change == policy.HeadChange(5, 3, False)
    assert cfg.model.head.num_classes == 5 and not cfg.model.get('finetune')


# -- rule 3: finetune when the checkpoint's head has another size -------------------------------------------------
def test_has_trained_weights(trained_dir, tmp_path):
    assert policy.has_trained_weights(trained_dir)
    assert not policy.has_trained_weights(config_only_dir(tmp_path / 'cfg', configuration()))
    assert not policy.has_trained_weights('owner/name')  # a hub id is not a local folder


def test_a_checkpoint_head_of_another_size_is_replaced_by_a_new_one(trained_dir):
    from modelscope.models import Model
    cfg = cfg_of(trained_dir)
    change = policy.fit_head(cfg, 2, policy.has_trained_weights(trained_dir))
    assert change == policy.HeadChange(2, 3, True)
    assert cfg.model.finetune is True and cfg.model.head.num_classes == 2
    assert 'the dataset has 2 classes, the model 3: a new head is trained' in change.note
    model = Model.from_pretrained(trained_dir, cfg_dict=cfg)
    assert model.head.num_classes == 2 and not model.head_loaded  # a fresh head ...
    reference = Model.from_pretrained(trained_dir)
    tuned = [k for k, p in reference.named_parameters() if p.requires_grad and not k.startswith('model.head.')]
    assert tuned
    mine = dict(model.named_parameters())
    assert all(torch.equal(mine[k], p) for k, p in reference.named_parameters() if k in tuned)  # ... the rest kept

    # why the rule exists: the checkpoint's 3-class head does not load into a 2-class head without finetune
    plain = cfg_of(trained_dir)
    plain.model.head.num_classes = 2
    with pytest.raises(ValueError):
        Model.from_pretrained(trained_dir, cfg_dict=plain)


def test_a_checkpoint_head_of_the_same_size_is_kept(trained_dir):
    from modelscope.models import Model
    cfg = cfg_of(trained_dir)
    assert policy.fit_head(cfg, 3, policy.has_trained_weights(trained_dir)) is None
    assert not cfg.model.get('finetune')
    model = Model.from_pretrained(trained_dir, cfg_dict=cfg)
    assert model.head_loaded and model.CLASSES == CLASSES


# -- rules 4, 5 -----------------------------------------------------------------------------------------------------
def test_t_max_follows_the_epochs_unless_set_or_absent():
    cfg = Config(configuration(train=copy.deepcopy(DEFAULTS['train'])))
    assert not policy.follow_epochs(cfg, None)
    assert not policy.follow_epochs(cfg, 4, user_keys={'train.lr_scheduler.T_max'})
    assert cfg.train.lr_scheduler.T_max == 10
    assert policy.follow_epochs(cfg, 4) and cfg.train.lr_scheduler.T_max == 4
    cfg.train.lr_scheduler.pop('T_max')  # another scheduler: nothing to follow
    assert not policy.follow_epochs(cfg, 4) and cfg.safe_get('train.lr_scheduler.T_max') is None


def test_backbone_is_random_without_any_weights():
    cfg = Config(configuration())
    assert policy.backbone_is_random(cfg, has_weights=False)
    assert not policy.backbone_is_random(cfg, has_weights=True)
    cfg.model.backbone.pretrained_weights = '/some/vit.safetensors'
    assert not policy.backbone_is_random(cfg, has_weights=False)


# -- rule 1: the configuration order --------------------------------------------------------------------------------
def test_defaults_come_before_cfg_modify_fn_and_are_checked(tmp_path):
    folder = config_only_dir(tmp_path / 'm', configuration())  # no train section at all
    seen = {}

    def modify(cfg):
        seen['T_max'] = cfg.safe_get('train.lr_scheduler.T_max')  # the defaults are there to edit
        cfg.train.optimizer.lr = 0.05
        return cfg
    cfg = policy.check_configuration(folder, modify)
    assert seen['T_max'] == DEFAULTS['train']['lr_scheduler']['T_max']
    assert cfg.train.optimizer.lr == 0.05 and cfg.train.optimizer.type == 'AdamW'  # the edit is not overwritten

    def bad(cfg):
        cfg.train.max_epochs = 0
        return cfg
    with pytest.raises(ValueError, match='train.max_epochs'):
        policy.check_configuration(folder, bad)


def test_the_trainer_builds_its_configuration_the_same_way(tmp_path):
    from modelscope.metainfo import Trainers
    from modelscope.trainers import build_trainer
    folder = config_only_dir(tmp_path / 'm', configuration())
    data = image_folder(tmp_path / 'data', CLASSES)

    def modify(cfg):
        cfg.train.max_epochs = 2
        cfg.train.dataloader.batch_size_per_gpu = 2
        return cfg
    expected = policy.check_configuration(folder, modify)
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=folder, work_dir=str(tmp_path / 'work'), train_dataset=data, cfg_modify_fn=modify))
    for key in ('train.max_epochs', 'train.dataloader', 'train.optimizer', 'train.lr_scheduler', 'model.head'):
        assert trainer.cfg.safe_get(key) == expected.safe_get(key), key


# -- rule 6: the classes a model folder names ----------------------------------------------------------------------
def test_model_classes_from_the_checkpoint_then_the_configuration(trained_dir, tmp_path):
    assert policy.model_classes(trained_dir) == CLASSES
    cfg = configuration()
    cfg['model']['CLASSES'] = ['x', 'y', 'z']
    assert policy.model_classes(config_only_dir(tmp_path / 'named', cfg)) == ['x', 'y', 'z']
    assert policy.model_classes(config_only_dir(tmp_path / 'unnamed', configuration())) is None
    broken = config_only_dir(tmp_path / 'broken', {})
    with open(os.path.join(broken, 'configuration.json'), 'w') as f:
        f.write('{not json')
    with pytest.raises(ValueError):
        policy.model_classes(broken)

    class Refused(Exception):
        pass

    def read_config(path):
        raise Refused(path)
    with pytest.raises(Refused):  # the caller's reader (the command line's: its own error type)
        policy.model_classes(broken, read_config=read_config)


# -- rule 7: where a run resumes -----------------------------------------------------------------------------------
def test_resume_plan_takes_the_newest_readable_epoch(tmp_path):
    from modelscope_utuning.training.checkpointing import latest_checkpoint
    work = str(tmp_path)
    assert checkpointing.resume_plan(work) == checkpointing.ResumePlan()

    def epoch(n, model=True, state=True):
        if model:
            torch.save({'state_dict': {'w': torch.zeros(2)}}, os.path.join(work, f'epoch_{n}.pth'))
        if state:
            torch.save({'meta': {'epoch': n}}, os.path.join(work, f'epoch_{n}_trainer_state.pth'))
    epoch(1)
    epoch(2)
    epoch(3, state=False)  # killed between its model file and its state
    epoch(4)
    with open(os.path.join(work, 'epoch_4.pth'), 'wb') as f:
        f.write(b'PK\x03\x04 half-written')
    plan = checkpointing.resume_plan(work)
    assert plan.files == ['epoch_1.pth', 'epoch_2.pth', 'epoch_3.pth', 'epoch_4.pth']
    assert plan.checkpoint == os.path.join(work, 'epoch_2.pth') and plan.epoch == 2
    assert plan.skipped == ['epoch_4.pth cannot be read (half-written or damaged)',
                            'epoch_3_trainer_state.pth is missing']
    assert plan.checkpoint == latest_checkpoint(work)  # the trainer-side helper's rule, the same answer

    for n in (1, 2):
        os.remove(os.path.join(work, f'epoch_{n}_trainer_state.pth'))
    plan = checkpointing.resume_plan(work)
    assert plan.checkpoint is None and plan.epoch is None and len(plan.skipped) == 4
    assert latest_checkpoint(work) is None



# -- rule 8: stochastic depth while tuned paths train --------------------------------------------------------------
def trained_rate(trainer):
    """The stochastic-depth rate the trainer set on the backbone."""
    return trainer.model_unwrapped.model.backbone.drop_path_rate


def block_rates(trainer):
    """The drop probability of each block's mha branch (0 where it holds no DropPath)."""
    return [getattr(b.drop_path1, 'p', 0.0) for b in trainer.model_unwrapped.model.backbone.blocks]


def build(tmp_path, name, backbone_edit=None, train_edit=None):
    from modelscope.metainfo import Trainers
    from modelscope.trainers import build_trainer
    cfg = configuration()
    cfg['model']['backbone'].update(backbone_edit or {})
    folder = config_only_dir(tmp_path / name, cfg)

    def modify(c):
        for k, v in (train_edit or {}).items():
            c.train[k] = v
        return c
    return build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=folder, work_dir=str(tmp_path / (name + '_work')), train_dataset=image_folder(tmp_path / (name + '_d'),
                                                                                           CLASSES),
        cfg_modify_fn=modify))


def test_drop_path_rule_in_every_case():
    from modelscope_utuning.training.defaults import DEFAULT_DROP_PATH
    tuned, probe = {'blocks.0.ffn_adapter.up.weight': 'tuner', 'head.weight': 'head'}, {'head.weight': 'head'}
    cfg = Config(configuration())
    assert policy.drop_path_rate(cfg, tuned, bypass=False) == (DEFAULT_DROP_PATH, 'the default while tuners or the '
                                                                                  'backbone train')
    assert policy.drop_path_rate(cfg, {'blocks.0.attn.qkv.weight': 'backbone', **probe}, False)[0] == DEFAULT_DROP_PATH
    assert policy.drop_path_rate(cfg, probe, bypass=False)[0] == 0.0
    assert policy.drop_path_rate(cfg, tuned, bypass=True)[0] == 0.0
    assert policy.drop_path_rate(cfg, tuned, False, default=0.0) == (0.0, 'no stochastic depth by default for this '
                                                                          'task')
    cfg.model.backbone.drop_path_rate = 0.0  # the model's own rate wins over the default, 0 included
    assert policy.drop_path_rate(cfg, tuned, False) == (0.0, 'model.backbone.drop_path_rate')
    cfg.train = {'drop_path': 0.3}  # and train.drop_path over both, for a probe too
    assert policy.drop_path_rate(cfg, probe, False) == (0.3, 'train.drop_path')
    cfg.train.drop_path = 'auto'
    assert policy.drop_path_rate(cfg, tuned, False) == (0.0, 'model.backbone.drop_path_rate')
    cfg.train.drop_path = 0.2
    with pytest.raises(ValueError, match=r"train\.drop_path=0\.2: bypass mode runs the frozen blocks whole"):
        policy.drop_path_rate(cfg, tuned, bypass=True)
    cfg.train.drop_path = 0
    assert policy.drop_path_rate(cfg, tuned, bypass=True) == (0.0, 'train.drop_path')


def test_the_trainer_trains_tuners_with_stochastic_depth_and_a_probe_without(tmp_path):
    trainer = build(tmp_path, 'tuned')
    assert trained_rate(trainer) == 0.1 and block_rates(trainer) == [0.0, 0.1]  # linear in depth, timm's rule
    net = trainer.model_unwrapped.model
    x = torch.randn(16, 3, 32, 32)
    net.train()
    for t in net.tuner_parameters().values():  # tuners away from silence, so that a dropped branch shows
        torch.nn.init.normal_(t, std=0.5)
    torch.manual_seed(0)
    a = net.pre_logits(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, net.pre_logits(x))  # training draws which samples drop a branch ...
    net.eval()
    assert torch.equal(net.pre_logits(x), net.pre_logits(x))  # ... evaluation never does

    probe = build(tmp_path, 'probe', backbone_edit={'tuners': []})
    assert trained_rate(probe) == 0.0 and block_rates(probe) == [0.0, 0.0]
    own = build(tmp_path, 'own', backbone_edit={'drop_path_rate': 0.4})
    assert trained_rate(own) == 0.4 and block_rates(own) == [0.0, pytest.approx(0.4)]
    off = build(tmp_path, 'off', train_edit={'drop_path': 0})
    assert trained_rate(off) == 0.0 and block_rates(off) == [0.0, 0.0]
    bypass = build(tmp_path, 'bypass', backbone_edit={'bypass': True})
    assert trained_rate(bypass) == 0.0


@pytest.mark.parametrize('value, message', [
    (1.5, r"train\.drop_path=1\.5: .*expected 'auto' or a number in \[0, 1\)"),
    ('on', r"train\.drop_path='on': .*expected 'auto' or a number in \[0, 1\)"),
    (True, r"train\.drop_path=True: .*expected 'auto' or a number in \[0, 1\)"),
])
def test_a_bad_drop_path_is_refused_when_the_trainer_is_built(tmp_path, value, message):
    with pytest.raises(ValueError, match=message):
        build(tmp_path, 'bad', train_edit={'drop_path': value})
    with pytest.raises(ValueError, match=r"train\.drop_path=0\.2: bypass mode"):
        build(tmp_path, 'bypass_bad', backbone_edit={'bypass': True}, train_edit={'drop_path': 0.2})


# -- rule 9: the parallel scale's start ----------------------------------------------------------------------------
def scale_cfg(lr, optimizer='AdamW'):
    """A configuration holding one entry of every case rule 9 tells apart, trained with ``optimizer`` at ``lr``."""
    cfg = Config(configuration())
    cfg.model.backbone.tuners = [
        {'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 4},  # 0: P-Adapter
        {'type': 'adapter', 'op': 'ffn', 'dim': 4},                      # 1: the kind's default form (parallel)
        {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 2},  # 2: P-Prefix
        {'type': 'adapter', 'op': 'ffn', 'form': 'sequential', 'dim': 4},    # 3: no scale at all
        {'type': 'prompt', 'op': 'ffn', 'form': 'parallel', 'length': 2},    # 4: its scale itself starts at 0
        {'type': 'lora', 'op': 'mha', 'rank': 2},                            # 5: not a parallel kind
        {'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 4, 'scale_init': 0.5},  # 6: the user's choice
        {'type': 'no-such-kind'},                                            # 7: left for validation to name
    ]
    cfg.train = {'optimizer': {'type': optimizer, 'lr': lr}}
    return cfg


def scale_inits(cfg):
    return [entry.get('scale_init') for entry in cfg.model.backbone.tuners]


@pytest.mark.parametrize('lr, start', [(5e-4, 8.0), (1e-3, 4.0), (2e-3, 2.0), (3e-4, 13.3333), (1e-5, 400.0)])
def test_a_slow_lr_starts_fresh_parallel_scales_at_the_pace_of_4e_3(lr, start):
    cfg = scale_cfg(lr)
    assert policy.start_parallel_scales(cfg) == start
    assert scale_inits(cfg) == [start, start, start, None, None, None, 0.5, None]


@pytest.mark.parametrize('lr, optimizer', [(4e-3, 'AdamW'), (1e-2, 'Adam'), (5e-4, 'SGD'), (0, 'AdamW'),
                                           ('fast', 'AdamW'), (True, 'AdamW')])
def test_the_parallel_scales_stay_at_1_from_4e_3_up_and_for_other_optimizers(lr, optimizer):
    cfg = scale_cfg(lr, optimizer)
    assert policy.start_parallel_scales(cfg) is None
    assert scale_inits(cfg) == [None] * 6 + [0.5, None]


def test_without_tuners_or_with_every_scale_chosen_nothing_changes():
    cfg = scale_cfg(5e-4)
    cfg.model.backbone.tuners = [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 4, 'scale_init': 1.0}]
    assert policy.start_parallel_scales(cfg) is None and scale_inits(cfg) == [1.0]
    cfg.model.backbone.pop('tuners')
    assert policy.start_parallel_scales(cfg) is None and 'tuners' not in cfg.model.backbone


def adapter_scales(trainer):
    """Every parallel tuner's learned scale values in the trainer's network, flattened."""
    net = trainer.model_unwrapped.model
    return torch.cat([p.detach().flatten() for n, p in net.named_parameters() if n.endswith('scale.weight')])


@pytest.mark.parametrize('lr, start', [(5e-4, 8.0), (1e-3, 4.0), (5e-3, 1.0)])
def test_the_trainer_builds_fresh_tuners_with_the_scale_rule_9_gives(tmp_path, lr, start):
    trainer = build(tmp_path, 'fresh', train_edit={'optimizer': {'type': 'AdamW', 'lr': lr}})
    scales = adapter_scales(trainer)
    assert scales.numel() == VIT['embed_dim'] * VIT['depth'] and torch.all(scales == start)
    # the configuration the run saves says how the scale started, and parses back to the same tuners
    saved = trainer.model_unwrapped.model.resolved_backbone_config()['tuners']
    assert [e['scale_init'] for e in saved] == [start]
    assert trainer.cfg.model.backbone.tuners[0].get('scale_init') == (None if start == 1.0 else start)


def test_trained_scales_are_kept_whatever_the_lr(tmp_path):
    """A folder whose weights hold trained tuners: rule 9 only sets where fresh tuners start, the checkpoint's scale
    is what the run continues from, also when the folder's configuration names no scale_init."""
    cfg = configuration()
    torch.manual_seed(0)
    model = VisionEfficientTuningModel(model_dir=None, backbone=cfg['model']['backbone'], head={'num_classes': 3},
                                       CLASSES=list(CLASSES))
    for name, p in model.model.named_parameters():
        if name.endswith('scale.weight'):
            torch.nn.init.constant_(p, 3.0)
    folder = str(tmp_path / 'trained')
    export_output(model, cfg, folder)
    with open(os.path.join(folder, 'configuration.json')) as f:
        written = json.load(f)
    for entry in written['model']['backbone']['tuners']:
        entry.pop('scale_init', None)  # as a hand-written configuration would say it
    with open(os.path.join(folder, 'configuration.json'), 'w') as f:
        json.dump(written, f)
    from modelscope.metainfo import Trainers
    from modelscope.trainers import build_trainer

    def modify(c):
        c.train.optimizer.lr = 5e-4
        return c
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=folder, work_dir=str(tmp_path / 'work'), train_dataset=image_folder(tmp_path / 'd', CLASSES),
        cfg_modify_fn=modify))
    assert trainer.cfg.model.backbone.tuners[0].scale_init == 8.0  # what a fresh tuner would start at ...
    assert torch.all(adapter_scales(trainer) == 3.0)  # ... but these are trained
