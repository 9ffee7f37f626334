"""The parametrization of the parallel tuners and the trainer's defaults that make training robust (issue 10).

- ``join: residual`` measures a tuner's term in units of the residual stream: a backbone whose residual stream is
  scaled by k (embeddings and every OP output times k; a normalised ViT computes the same function) trains the
  same tuned model, output for output and step for step; in absolute units it does not.
- the adapter branch is averaged over its hidden units; the parallel prompt's tokens start as N(0, 1).
- a fresh head starts at zero; the trainer warms the learning rate up over the first iterations and gives the head
  its own rate; a folder saved by version 0.1 keeps its parametrization.
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

import modelscope_utuning  # noqa: F401
from modelscope_utuning import VisionEfficientTuningModel
from modelscope_utuning.training.warmup import StepWarmup, warmup_iters

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
TRI = [{'type': 'adapter', 'op': 'mha', 'dim': 4}, {'type': 'adapter', 'op': 'ffn', 'dim': 4},
       {'type': 'prefix', 'op': 'block', 'length': 3}, {'type': 'prompt', 'op': 'ffn', 'length': 2}]

pytestmark = pytest.mark.usefixtures('one_thread')


def build(tuners, **backbone):
    torch.manual_seed(0)
    return VisionEfficientTuningModel(backbone=dict(VIT, tuners=copy.deepcopy(tuners), **backbone),
                                      head={'num_classes': 3})


def scale_residual_stream_(model, k: float) -> None:
    """Multiply the residual stream by k: patch embedding, class token, position embedding, and each block's
    attention output projection and MLP output. LayerNorm makes every block and the final norm blind to it."""
    vit = model.backbone
    with torch.no_grad():
        for p in (vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, vit.cls_token, vit.pos_embed):
            p.mul_(k)
        for b in vit.blocks:
            for lin in (b.attn.proj, b.mlp.fc2):
                lin.weight.mul_(k)
                lin.bias.mul_(k)


def train_steps(model, steps=4, lr=1e-2, seed=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    model.train()
    for _ in range(steps):
        loss = model({'imgs': x, 'labels': y})['loss']
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return model({'imgs': x})['scores']


@pytest.mark.parametrize('join', ['residual', 'absolute'])
def test_residual_join_makes_training_blind_to_the_residual_scale(join):
    """Two backbones that compute the same function (one with its residual stream x 50) train to the same tuned
    model under join=residual; under absolute units they do not."""
    tuners = [dict(e, join=join) for e in TRI]
    a, b = build(tuners), build(tuners)
    scale_residual_stream_(b, 50.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the same function before training (the final norm removes k)
        torch.testing.assert_close(a.eval()({'imgs': x})['scores'], b.eval()({'imgs': x})['scores'],
                                   atol=1e-5, rtol=0)
    sa, sb = train_steps(a), train_steps(b)
    moved = (sa - train_steps(build(tuners), steps=0)).abs().max().item()
    assert moved > 1e-2  # training did change the model
    if join == 'residual':
        torch.testing.assert_close(sa, sb, atol=2e-4, rtol=0)
    else:
        assert (sa - sb).abs().max().item() > 1e-2


def test_adapter_branch_is_averaged_over_its_hidden_units():
    """One step moves every entry of W_up by about lr; the branch then moves by lr * mean|act|, whatever r."""
    changes = {}
    for r in (4, 32):
        model = build([{'type': 'adapter', 'op': 'ffn', 'dim': r, 'scale': 'none'}])
        a = model.backbone.blocks[0].ffn_adapter
        h = torch.randn(2, 17, 32)
        with torch.no_grad():
            a.up.weight.fill_(1e-2)  # what one AdamW step of lr 1e-2 does to every entry, signs aligned
            u = a.branch(model.backbone.blocks[0].op_context('ffn', h, None))
            act = a.act(a.down(h))
        changes[r] = (u.abs().mean() / act.abs().mean()).item()
        torch.testing.assert_close(u, 1e-2 * act.sum(-1, keepdim=True).expand_as(u) / r, atol=1e-6, rtol=1e-4)
    assert changes[4] == pytest.approx(changes[32], rel=0.35)


def test_parallel_prompt_tokens_start_standard_normal_and_silent():
    model = build([{'type': 'prompt', 'op': 'mha', 'length': 64}])
    tokens = model.backbone.blocks[0].mha_prompt.tokens
    assert abs(tokens.std().item() - 1.0) < 0.1 and abs(tokens.mean().item()) < 0.1
    assert torch.count_nonzero(model.backbone.blocks[0].mha_prompt.scale.weight) == 0  # silent through s = 0


def test_fresh_head_starts_at_zero_loaded_head_kept(tmp_path):
    model = build(TRI)
    assert torch.count_nonzero(model.head.fc.weight) == 0 and torch.count_nonzero(model.head.fc.bias) == 0
    with torch.no_grad():
        model.head.fc.weight.normal_()
    model.save_hub_checkpoint(str(tmp_path))
    again = VisionEfficientTuningModel(model_dir=str(tmp_path), backbone=dict(VIT, tuners=TRI),
                                       head={'num_classes': 3})
    assert torch.equal(again.head.fc.weight, model.head.fc.weight)


# -- warm-up --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('setting,total,own,want', [
    ('auto', 60, False, 6), (None, 7, False, 1), ('auto', 60, True, 0), ('none', 60, False, 0), (0, 60, False, 0),
    (12, 60, False, 12), (0.25, 60, False, 15), (0.01, 60, False, 1)])
def test_warmup_iters(setting, total, own, want):
    assert warmup_iters(setting, total, own) == want


@pytest.mark.parametrize('bad', [-1, 1.5, 'fast', True, [3]])
def test_warmup_bad_setting_names_the_key(bad):
    with pytest.raises(ValueError, match='train.warmup'):
        warmup_iters(bad, 60, False)


def test_step_warmup_scales_each_step_and_restores_the_schedule():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    t = {'i': 0}
    seen = []
    warm = StepWarmup(opt, 4, lambda: t['i'])
    for i in range(6):
        t['i'] = i
        p.grad = torch.ones(3)
        before = p.detach().clone()
        opt.step()
        seen.append(round((before - p.detach())[0].item(), 6))  # the rate this step used
        assert opt.param_groups[0]['lr'] == 0.5 ** i  # the schedule's own value, untouched
        sched.step()
    assert seen == [1.0 * 0.1, 0.5 * 0.325, 0.25 * 0.55, 0.125 * 0.775, 0.0625, 0.03125]
    warm.remove()


# -- the trainer's defaults -------------------------------------------------------------------------------------------
def _trainer(tmp_path, edit):
    from PIL import Image
    from modelscope.metainfo import Trainers
    from modelscope.trainers import build_trainer
    from modelscope_utuning.training.defaults import model_configuration
    data = tmp_path / 'data'
    rng = np.random.default_rng(0)
    for c in ('a', 'b', 'c'):
        os.makedirs(data / c, exist_ok=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / c / f'{i}.png')
    model_dir = tmp_path / 'model'
    os.makedirs(model_dir, exist_ok=True)
    with open(model_dir / 'configuration.json', 'w') as f:
        json.dump(model_configuration(dict(VIT, tuners=TRI), {'num_classes': 3},
                                      preprocessor={'type': 'vision-efficient-tuning-preprocessor', 'resize': 32}), f)

    def cfg_modify_fn(cfg):
        cfg.train.max_epochs = 2
        cfg.train.dataloader.batch_size_per_gpu = 4
        edit(cfg)
        return cfg
    return build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=str(model_dir), work_dir=str(tmp_path / 'work'), train_dataset=str(data), cfg_modify_fn=cfg_modify_fn))


def test_trainer_default_head_lr_and_warmup(tmp_path):
    def edit(cfg):
        cfg.train.optimizer.lr = 2e-3
        cfg.train.amp = 'fp32'
    trainer = _trainer(tmp_path, edit)
    trainer.train()  # 3 iterations per epoch, 2 epochs: a warm-up of ceil(0.1 * 6) = 1 iteration
    lrs = {g['initial_lr'] for g in trainer.optimizer.param_groups}
    head = {id(p) for p in trainer.model_unwrapped.head.parameters()}
    head_lrs = {g['initial_lr'] for g in trainer.optimizer.param_groups if any(id(p) in head for p in g['params'])}
    assert head_lrs == {1e-2} and lrs == {2e-3, 1e-2}
    assert trainer.warmup.iters == 1 and trainer.warmup.factor(0) == pytest.approx(0.1)


def test_trainer_respects_a_configured_head_lr_and_warmup(tmp_path):
    def edit(cfg):
        cfg.train.optimizer.lr = 2e-3
        cfg.train.optimizer.head_lr = 5e-4
        cfg.train.warmup = 'none'
        cfg.train.amp = 'fp32'
    trainer = _trainer(tmp_path, edit)
    trainer.train()
    assert {g['initial_lr'] for g in trainer.optimizer.param_groups} == {2e-3, 5e-4}
    assert getattr(trainer, 'warmup', None) is None


# -- models saved by version 0.1 ---------------------------------------------------------------------------------------
def test_version_0_1_folder_keeps_its_parametrization(tmp_path):
    """A parallel tuner saved by 0.1 (no 'join' in its entry, utuning.version 0.1.0) loads as join=absolute, with
    the same outputs that version computed (its adapter had no 1/r factor)."""
    old_v01 = build([dict(e, join='absolute') for e in TRI])
    with torch.no_grad():
        for p in old_v01.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    old_v01.save_hub_checkpoint(str(tmp_path))
    cfg = {'framework': 'pytorch', 'task': 'vision-efficient-tuning', 'pipeline': {'type': 'vision-efficient-tuning'},
           'model': {'type': 'vision-efficient-tuning', 'backbone': dict(VIT, tuners=TRI), 'head': {'num_classes': 3}},
           'utuning': {'package': 'modelscope-utuning', 'import': 'modelscope_utuning', 'version': '0.1.0'}}
    with open(tmp_path / 'configuration.json', 'w') as f:
        json.dump(cfg, f)
    from modelscope.models import Model
    loaded = Model.from_pretrained(str(tmp_path))
    assert all(s.join == 'absolute' for s in loaded.specs if s.form == 'parallel')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()({'imgs': x})['scores'], old_v01.eval()({'imgs': x})['scores'])
    cfg['utuning']['version'] = '0.2.0'  # the same folder under this version's defaults means something else
    with open(tmp_path / 'configuration.json', 'w') as f:
        json.dump(cfg, f)
    assert all(s.join == 'residual' for s in Model.from_pretrained(str(tmp_path)).specs if s.form == 'parallel')


def test_validate_config_reads_modelscope_configs():
    from modelscope.utils.config import Config
    from modelscope_utuning.training.validate import validate_config
    cfg = Config({'train': {'max_epochs': 'abc', 'optimizer': {'lr': 0}}, 'model': {'head': {'num_classes': 2}}})
    with pytest.raises(ValueError, match=r"train.max_epochs='abc'.*train.optimizer.lr=0"):
        validate_config(cfg)


# -- LoRA+: A learns slower than B ------------------------------------------------------------------------------------
@pytest.mark.parametrize('entry,factor', [({'lora_length': 4}, 1 / 16),
                                          ({'tuners': [{'type': 'lora', 'op': 'ffn', 'rank': 4, 'lr_ratio': 4}]}, 1 / 4),
                                          ({'tuners': [{'type': 'lora', 'op': 'mha', 'rank': 4, 'lr_ratio': 1}]}, 1.0)])
def test_lora_a_learns_at_the_tuner_lr_over_lr_ratio(entry, factor):
    """Only the optimizer changes: A (every ``*_a`` of every layer) at lr / lr_ratio, B and the head as before."""
    from modelscope_utuning import VisionEfficientTuningModel
    from modelscope_utuning.training.optim import param_groups
    model = VisionEfficientTuningModel(backbone=dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=4,
                                                     **entry), head={'num_classes': 3})
    groups = param_groups(model, 1e-2, 1e-4, head_lr=5e-2)
    lr_of = {n: g['lr'] for g in groups for n in g['names']}
    a = [n for n in lr_of if n.split('.')[-2].endswith('_a')]
    b = [n for n in lr_of if n.split('.')[-2].endswith('_b')]
    pairs_per_layer = 2 if "'op': 'ffn'" in repr(entry) else 1  # ffn: fc1 and fc2; mha: the fused qkv
    assert len(a) == len(b) == 2 * pairs_per_layer
    assert all(lr_of[n] == pytest.approx(1e-2 * factor) for n in a)
    assert all(lr_of[n] == 1e-2 for n in b)
    assert all(lr_of[n] == 5e-2 for n in lr_of if n.startswith('head.'))
    assert sorted(lr_of) == sorted(n for n, p in model.model.named_parameters() if p.requires_grad)


def test_lora_lr_ratio_must_be_positive():
    from modelscope_utuning import VisionEfficientTuningModel
    with pytest.raises(ValueError, match='lr_ratio'):
        VisionEfficientTuningModel(backbone=dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=4,
                                                 tuners=[{'type': 'lora', 'rank': 2, 'lr_ratio': 0}]),
                                   head={'num_classes': 3})
