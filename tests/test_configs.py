"""The shipped configuration.json and presets: they build, train what they say, and drive the trainer."""
import glob
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import modelscope_utuning  # noqa: F401
from modelscope.metainfo import Trainers
from modelscope.trainers import build_trainer
from modelscope_utuning.model import VisionEfficientTuningModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, 'modelscope_utuning', 'configs', '*.json')))
SMALL = {'embed_dim': 48, 'depth': 2, 'num_heads': 4}  # same structure, test-sized


def small_model(path):
    cfg = json.load(open(path))['model']
    backbone = dict(cfg['backbone'], **SMALL)
    if backbone.get('sidetune_length'):
        backbone['sidetune_length'] = SMALL['embed_dim']
    head = dict(cfg['head'], dim=SMALL['embed_dim'])
    return VisionEfficientTuningModel(backbone=backbone, head=head, freeze_cfg=cfg.get('freeze_cfg'))


def test_every_preset_is_shipped():
    names = {os.path.basename(p)[:-5] for p in PRESETS}
    assert {'utuning_seed', 'utuning_single', 'utuning_dual', 'utuning_tri', 'utuning_tri_bypass', 'adapter',
            'prefix', 'prompt', 'lora', 'bitfit', 'sidetune', 'linear_probe'} <= names


@pytest.mark.parametrize('path', PRESETS + [os.path.join(ROOT, 'configuration.json')], ids=os.path.basename)
def test_preset_builds_and_trains_what_it_says(path):
    model = small_model(path)
    trainable, total = model.trainable_parameters()
    head = sum(p.numel() for p in model.head.parameters())
    tuners = sum(s.kind.count_trainable(s, model.backbone) for s in model.specs)
    if 'bitfit' in path:
        biases = sum(p.numel() for n, p in model.backbone.named_parameters() if n.endswith('bias'))
        assert trainable == biases + head
    else:
        assert trainable == tuners + head
    assert 0 < trainable < total


def test_root_configuration_is_the_seed_instantiation():
    cfg = json.load(open(os.path.join(ROOT, 'configuration.json')))
    backbone = cfg['model']['backbone']
    assert (backbone['embed_dim'], backbone['depth'], backbone['patch_size']) == (768, 12, 16)
    assert backbone['prompt_length'] == backbone['prefix_length'] == backbone['adapter_length'] == 10
    assert cfg['model']['head']['num_classes'] == 100
    assert cfg['pipeline']['type'] == cfg['task'] == 'vision-efficient-tuning'


def test_root_configuration_drives_the_trainer(tmp_path):
    """A model folder holding only the root configuration.json (fresh weights) trains through build_trainer."""
    model_dir = tmp_path / 'model'
    model_dir.mkdir()
    shutil.copy(os.path.join(ROOT, 'configuration.json'), model_dir / 'configuration.json')
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        path = str(tmp_path / f'{i}.png')
        Image.fromarray((rng.random((36, 36, 3)) * 255).astype('uint8')).save(path)
        rows.append({'img_path:FILE': path, 'label': i % 2})

    def cfg_modify_fn(cfg):
        cfg.model.backbone.update(SMALL, img_size=32, patch_size=8)
        cfg.model.head.dim = SMALL['embed_dim']
        cfg.model.head.num_classes = 2
        cfg.model.finetune = True
        cfg.preprocessor.img_size = 32
        cfg.preprocessor.resize = 36
        cfg.train.max_epochs = 1
        cfg.train.lr_scheduler.T_max = 1
        cfg.train.dataloader.workers_per_gpu = 0
        cfg.evaluation.dataloader.workers_per_gpu = 0
        return cfg
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=str(model_dir), work_dir=str(tmp_path / 'work'), train_dataset=rows, eval_dataset=rows,
        cfg_modify_fn=cfg_modify_fn))
    trainer.train()
    assert 'accuracy' in trainer.evaluate()
    assert os.path.isfile(tmp_path / 'work' / 'output' / 'pytorch_model.pt')
