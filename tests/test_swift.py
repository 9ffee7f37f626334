"""ms-swift tuners through ModelScope's flow (its tests/trainers/test_finetune_vision_efficient_tuning_swift.py):
``build_trainer(..., efficient_tuners=LoRAConfig(r=10, target_modules=['qkv'], use_merged_linear=True,
enable_lora=[True]))`` with the model's own LoRA off (``lora_length = 0``) trains swift's LoRA and our head, and the
trained output/ loads in pipeline() / Model.from_pretrained with the same predictions (swift's LoRA carried over as
ours). The carry-over is exact for swift's MergedLinear with any enable_lora mask and for peft-style layers;
without ms-swift the trainer says what to install."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from swift.tuners import LoRAConfig

import modelscope_utuning  # noqa: F401  (registers the plugin)
from modelscope.metainfo import Trainers
from modelscope.models import Model
from modelscope.pipelines import pipeline
from modelscope.trainers import build_trainer
from modelscope_utuning.backbone.linear import QKVLinear
from modelscope_utuning.model import VisionEfficientTuningModel
from modelscope_utuning.training.swift_tuners import apply_swift_tuners, fold_swift_lora, lora_layers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trainer import (CLASS_NAMES, FIXTURES, NUM_CLASSES, ms_dataset, seed_cfg_modify_fn,  # noqa: E402
                          write_images)

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
pytestmark = pytest.mark.usefixtures('one_thread')


def lora_off(cfg):
    cfg.model.backbone.lora_length = 0  # as ModelScope's swift test: the model's own LoRA off


def test_modelscope_swift_lora_flow_trains_saves_and_reloads(tmp_path):
    (tmp_path / 'images').mkdir()
    rows = write_images(str(tmp_path / 'images'))
    work_dir = str(tmp_path / 'work')
    lora_config = LoRAConfig(r=10, target_modules=['qkv'], use_merged_linear=True, enable_lora=[True])
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=os.path.join(FIXTURES, 'lora'), work_dir=work_dir, train_dataset=ms_dataset(rows),
        eval_dataset=ms_dataset(rows[:6]), cfg_modify_fn=seed_cfg_modify_fn(lora_off),
        efficient_tuners=lora_config))
    model = trainer.model_unwrapped
    assert isinstance(model, VisionEfficientTuningModel) and trainer.swift_model is not None
    layers = lora_layers(model)
    assert sorted(layers) == ['backbone.blocks.0.attn.qkv', 'backbone.blocks.1.attn.qkv']
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert {f'{n}.lora_{x}' for n in layers for x in 'AB'} | {'head.fc.weight', 'head.fc.bias'} == trainable
    qkv_before = [blk.attn.qkv.weight.detach().clone() for blk in model.backbone.blocks]

    trainer.train()
    result = trainer.evaluate()
    assert 0.0 <= result['accuracy'] <= 1.0
    assert f'{trainer.timestamp}.log.json' in os.listdir(work_dir) and 'epoch_1.pth' in os.listdir(work_dir)
    for blk, before in zip(model.backbone.blocks, qkv_before):
        assert torch.equal(blk.attn.qkv.weight.detach(), before)  # the frozen qkv did not move
        assert blk.attn.qkv.lora_B.abs().sum() > 0  # swift's LoRA trained (B starts at zero)

    output = os.path.join(work_dir, 'output')
    with open(os.path.join(output, 'configuration.json')) as f:
        backbone = json.load(f)['model']['backbone']
    lora = [e for e in backbone['tuners'] if e['type'] == 'lora']  # saved resolved: every option written out
    assert [{k: e[k] for k in ('type', 'op', 'rank')} for e in lora] == [{'type': 'lora', 'op': 'mha',
                                                                          'rank': [10, 10]}]
    assert lora[0]['form'] == 'parallel' and lora[0]['alpha'] is None  # alpha null: the rank (scaling 1)
    imgs = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        expected = model({'imgs': imgs})['scores']
    reloaded = Model.from_pretrained(output).eval()
    assert all(isinstance(blk.attn.qkv, QKVLinear) for blk in reloaded.backbone.blocks)
    with torch.no_grad():
        got = reloaded({'imgs': imgs})['scores']
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert reloaded.CLASSES == CLASS_NAMES

    image = rows[1]['img_path:FILE']
    shown = pipeline('vision-efficient-tuning', output, device='cpu')(image, topk=NUM_CLASSES)
    live = pipeline('vision-efficient-tuning', model=model, device='cpu')(image, topk=NUM_CLASSES)
    assert shown['labels'] == live['labels']
    np.testing.assert_allclose(shown['scores'], live['scores'], atol=1e-5, rtol=0)


@pytest.mark.parametrize('config', [
    lambda: [LoRAConfig(r=4, target_modules=['qkv'], use_merged_linear=True, enable_lora=[True])],  # a list
    lambda: LoRAConfig(r=3, target_modules=['qkv'], use_merged_linear=True, enable_lora=[True, False, True]),
    # peft's own LoRA layer (ms-swift 4.6's non-merged LoRAConfig fails inside swift with this peft: its Linear
    # misses peft's new `config` argument), through the same entry point
    lambda: __import__('peft').LoraConfig(r=4, lora_alpha=8, target_modules=['qkv']),
], ids=['merged_linear', 'merged_linear_q_v_only', 'peft_linear'])
def test_carry_over_is_exact(config):
    torch.manual_seed(0)
    model = VisionEfficientTuningModel(model_dir=None, backbone=dict(VIT, tuners=[
        {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 4}]), head={'num_classes': 3}).eval()
    apply_swift_tuners(model, config())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = model.model(x)
    assert fold_swift_lora(model) == [0, 1]
    assert not lora_layers(model) and all(isinstance(b.attn.qkv, QKVLinear) for b in model.backbone.blocks)
    with torch.no_grad():
        after = model.model(x)
    carried = [t for b in model.backbone.blocks for _, t in b.tuners() if t.kind == 'lora']
    assert len(carried) == 2 and all(t.lora_b.weight.abs().sum() > 0 for t in carried)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert {s.type for s in model.specs} == {'adapter', 'lora'}


def test_other_targets_are_refused_before_training():
    model = VisionEfficientTuningModel(model_dir=None, backbone=dict(VIT), head={'num_classes': 3})
    with pytest.raises(ValueError, match=r"only target_modules=\['qkv'\]"):
        apply_swift_tuners(model, LoRAConfig(r=4, target_modules=['fc1'], use_merged_linear=True,
                                             enable_lora=[True]))


def test_without_ms_swift_the_trainer_says_what_to_install(tmp_path):
    code = ('import sys; sys.modules["swift"] = None\n'
            'import modelscope_utuning\n'
            'from modelscope.trainers import build_trainer\n'
            'from modelscope_utuning.extras import MissingExtraError\n'
            'try:\n'
            f'    build_trainer(name="vision-efficient-tuning", default_args=dict(model={os.path.join(FIXTURES, "lora")!r},'
            f' work_dir={str(tmp_path)!r}, train_dataset=[], efficient_tuners=object()))\n'
            'except MissingExtraError as e:\n'
            '    print(e); sys.exit(3)\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "pip install 'modelscope-utuning[swift]'" in proc.stdout and 'swift' in proc.stdout
