"""Every configuration mistake is named when the trainer (or the model) is built (issue 19, section 2).

Table-driven: each row is one mistake as a user writes it in ``cfg_modify_fn``; ``build_trainer`` must raise a
ValueError naming the key and the value before any data is read (the training data given is a folder that does
not exist: reading it first would raise FileNotFoundError instead). Before, these failed at iteration 0
(optimizer, scheduler, their options), after the first epoch (a metric), at the first forward (depth 0, patch 0,
negative mlp_ratio) or never (a ``train_part`` that matches nothing, an img_size the patch does not divide).
"""
from __future__ import annotations

import json
import os

import pytest

import modelscope_utuning  # noqa: F401
from modelscope.metainfo import Trainers
from modelscope.models import Model
from modelscope.trainers import build_trainer
from modelscope_utuning.training.defaults import model_configuration

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
           tuners=[{'type': 'adapter', 'op': 'ffn', 'dim': 4}])


def setter(path, value):
    def edit(cfg):
        node = cfg
        *parents, last = path.split('.')
        for part in parents:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        node[last] = value
    return edit


def both(*edits):
    def edit(cfg):
        for e in edits:
            e(cfg)
    return edit


# (id, edit of the configuration, pattern the error must contain: the key and the value)
TRAINER_MISTAKES = [
    ('optimizer type', setter('train.optimizer.type', 'AdamWW'),
     r"train\.optimizer\.type='AdamWW': not an optimizer.*did you mean 'AdamW'"),
    ('scheduler type', setter('train.lr_scheduler.type', 'CosineAnnealingLRR'),
     r"train\.lr_scheduler\.type='CosineAnnealingLRR'.*did you mean 'CosineAnnealingLR'"),
    ('optimizer option', both(setter('train.optimizer.type', 'SGD'), setter('train.optimizer.momentumm', 0.9)),
     r"train\.optimizer\.momentumm: SGD takes no option 'momentumm'.*momentum"),
    ('adamw option', setter('train.optimizer.betas1', 0.9), r"train\.optimizer\.betas1: AdamW takes no option"),
    ('optimizer hook option', setter('train.optimizer.options', {'grad_clipp': {'max_norm': 1.0}}),
     r"train\.optimizer\.options\.grad_clipp: not an option.*grad_clip"),
    ('scheduler option', setter('train.lr_scheduler.T_maxx', 5),
     r"train\.lr_scheduler\.T_maxx: CosineAnnealingLR takes no option 'T_maxx'"),
    ('scheduler hook option', setter('train.lr_scheduler.options', {'by_epochs': True}),
     r"train\.lr_scheduler\.options\.by_epochs: not an option"),
    ('metric name', setter('evaluation.metrics', ['acc']),
     r"evaluation\.metrics\[0\]='acc': not a metric ModelScope knows.*accuracy"),
    ('metric type', setter('evaluation.metrics', [{'type': 'accuracyy'}]), r"evaluation\.metrics\[0\]='accuracyy'"),
    ('hook name', setter('train.hooks', [{'type': 'TensorboardHookk'}]),
     r"train\.hooks\[0\]\.type='TensorboardHookk'.*did you mean 'TensorboardHook'"),
    ('max_epochs', setter('train.max_epochs', 0), r"train\.max_epochs=0: expected an integer >= 1"),
    ('train key', setter('train.max_epoch', 3), r"train\.max_epoch: unknown key, did you mean 'max_epochs'"),
    ('model key', setter('model.finetunee', True), r"model\.finetunee: unknown key, did you mean 'finetune'"),
    ('loss key', setter('model.loss', {'label_smothing': 0.1}), r"model\.loss\.label_smothing: unknown key"),
    ('dataloader key', setter('train.dataloader.batch_size', 4),
     r"train\.dataloader\.batch_size: not a data loader option; did you mean 'batch_size_per_gpu'"),
    ('eval dataloader key', setter('evaluation.dataloader.shuffel', False),
     r"evaluation\.dataloader\.shuffel: not a data loader option; did you mean 'shuffle'"),
    ('checkpoint section', setter('train.checkpoint', {'period': {'intervall': 1}}),
     r"train\.checkpoint\.period\.intervall: unknown key, did you mean 'interval'"),
    ('logging section', setter('train.logging', {'interval': 0}), r"train\.logging\.interval=0: expected an integer"),
    ('evaluation period', setter('evaluation.period', {'interval': 0}), r"evaluation\.period\.interval=0"),
    ('grad_clip option', setter('train.optimizer.options', {'grad_clip': {'max_normm': 1.0}}),
     r"grad_clip\.max_normm: clip_grad_norm_ takes no option 'max_normm'"),
    ('warm-up type', setter('train.lr_scheduler.options', {'warmup': {'type': 'LinearWarmupp', 'warmup_iters': 2}}),
     r"warmup\.type='LinearWarmupp': not a warm-up ModelScope knows \(did you mean 'LinearWarmup'"),
    ('on_bad_image', setter('train.on_bad_image', 'skipp'), r"train\.on_bad_image='skipp'"),
    ('scheduler required option', setter('train.lr_scheduler', {'type': 'StepLR'}),
     r"train\.lr_scheduler\.step_size: StepLR needs this option"),
    ('optimizer type None', setter('train.optimizer.type', None), r"train\.optimizer\.type=None: expected a name"),
    ('head type', setter('model.head.type', 'linearr'), r"model\.head\.type='linearr'"),
    ('train_part', setter('model.freeze_cfg', {'train_part': {'backbone': ['blocks.99.']}}),
     r"model\.freeze_cfg\.train_part\.backbone: 'blocks\.99\.' matches no parameter"),
    ('freeze_part', setter('model.freeze_cfg', {'freeze_part': {'head': ['classifierr']}}),
     r"model\.freeze_cfg\.freeze_part\.head: 'classifierr' matches no parameter"),
    ('depth 0', setter('model.backbone.depth', 0), r"model\.backbone\.depth=0: expected an integer >= 1"),
    ('patch 0', setter('model.backbone.patch_size', 0), r"model\.backbone\.patch_size=0: expected an integer >= 1"),
    ('mlp_ratio', setter('model.backbone.mlp_ratio', -1), r"model\.backbone\.mlp_ratio=-1: expected a number > 0"),
    ('img_size', both(setter('model.backbone.img_size', 100), setter('model.backbone.patch_size', 16)),
     r"model\.backbone\.img_size=100 is not a multiple of model\.backbone\.patch_size=16: the last 4 rows"),
    ('heads', setter('model.backbone.num_heads', 5), r"embed_dim=32 must be divisible by model\.backbone\.num_heads=5"),
    ('drop_path', setter('model.backbone.drop_path_rate', 1.5), r"model\.backbone\.drop_path_rate=1\.5"),
    ('activation', setter('model.backbone.act', 'gelu2'), r"model\.backbone\.act='gelu2'"),
]


def write_model(root, backbone=None):
    os.makedirs(root, exist_ok=True)
    cfg = model_configuration(dict(backbone or VIT), {'num_classes': 3},
                              preprocessor={'type': 'vision-efficient-tuning-preprocessor', 'resize': 32})
    with open(os.path.join(root, 'configuration.json'), 'w') as f:
        json.dump(cfg, f)
    return str(root)


@pytest.mark.parametrize('edit,pattern', [m[1:] for m in TRAINER_MISTAKES], ids=[m[0] for m in TRAINER_MISTAKES])
def test_mistake_is_named_when_the_trainer_is_built(tmp_path, edit, pattern):
    def cfg_modify_fn(cfg):
        edit(cfg)
        return cfg
    missing = str(tmp_path / 'no-such-data')  # reading the data before checking would raise FileNotFoundError
    with pytest.raises(ValueError, match=pattern):
        build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
            model=write_model(tmp_path / 'model'), work_dir=str(tmp_path / 'work'), train_dataset=missing,
            eval_dataset=missing, cfg_modify_fn=cfg_modify_fn))


def test_the_defaults_and_every_shipped_preset_pass_the_checks():
    """The checks refuse only mistakes: every configuration we ship passes them as it is."""
    import glob
    from modelscope.utils.config import Config
    from modelscope_utuning.backbone_config import split_backbone_config
    from modelscope_utuning.training.defaults import apply_defaults
    from modelscope_utuning.training.validate import validate_config
    presets = glob.glob(os.path.join(os.path.dirname(modelscope_utuning.__file__), 'configs', '*.json'))
    assert len(presets) >= 10
    for path in presets:
        cfg = apply_defaults(Config.from_file(path))
        validate_config(cfg)
        split_backbone_config(cfg.model.backbone.to_dict())


@pytest.mark.parametrize('key,value,pattern', [
    ('depth', 0, r'model\.backbone\.depth=0'),
    ('img_size', 100, r'model\.backbone\.img_size=100 is not a multiple'),
    ('mlp_ratio', 0, r'model\.backbone\.mlp_ratio=0'),
])
def test_backbone_mistake_is_named_by_model_from_pretrained(tmp_path, key, value, pattern):
    model_dir = write_model(tmp_path / 'model', {**VIT, key: value, **({'patch_size': 16} if key == 'img_size' else {})})
    with pytest.raises(ValueError, match=pattern):
        Model.from_pretrained(model_dir)
