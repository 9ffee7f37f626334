"""Many tasks, one frozen backbone (multitask.py): pipeline(model=[...]) gives each model's own results, models on one
backbone hold it once (the very tensors), bypass models share one frozen forward per batch, tuner-only folders
load against a backbone given once, and `predict` prints a column per model."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import modelscope_utuning  # noqa: F401
from modelscope.pipelines import pipeline
from modelscope_utuning import VisionEfficientTuningModel
from modelscope_utuning.backbone.vit import Block, VisionTransformer
from modelscope_utuning.training.defaults import model_configuration
from modelscope_utuning.training.export import export_output

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
TASKS = {  # name -> (tuners, bypass, classes)
    'tri': ([{'type': 'adapter', 'op': 'mha', 'dim': 4}, {'type': 'adapter', 'op': 'ffn', 'dim': 4},
             {'type': 'prefix', 'op': 'block', 'length': 3}], False, ['cat', 'dog', 'fox']),
    'bypass_a': ([{'type': 'adapter', 'op': 'ffn', 'dim': 4}, {'type': 'prefix', 'op': 'block', 'length': 2}],
                 True, ['red', 'green']),
    'bypass_b': ([{'type': 'prompt', 'op': 'mha', 'length': 2}, {'type': 'vertical', 'dim': 3}], True,
                 ['x', 'y', 'z', 'w']),
    'bitfit_lora': ([{'type': 'bitfit'}, {'type': 'lora', 'op': 'ffn', 'rank': 2}], False, ['p', 'q']),
}

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    """A 'pre-trained' backbone file every task starts from."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    vit = VisionTransformer(**VIT)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    path = str(tmp_path_factory.mktemp('base') / 'vit.safetensors')
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    return path


def make_task(folder, name, weights, seed=1):
    tuners, bypass, classes = TASKS[name]
    backbone = dict(VIT, tuners=tuners, pretrained_weights=weights, **({'bypass': True} if bypass else {}))
    torch.manual_seed(seed)
    model = VisionEfficientTuningModel(backbone=backbone, head={'num_classes': len(classes)}, CLASSES=classes)
    with torch.no_grad():  # "trained": every trainable weight moved
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape))
    cfg = model_configuration(backbone, {'num_classes': len(classes)},
                              preprocessor={'type': 'vision-efficient-tuning-preprocessor', 'resize': 32})
    export_output(model, cfg, str(folder))
    return str(folder)


@pytest.fixture(scope='module')
def folders(tmp_path_factory, base):
    root = tmp_path_factory.mktemp('tasks')
    out = {name: make_task(root / name, name, base, seed=i + 1) for i, name in enumerate(TASKS)}
    # a task on another backbone: no sharing, still right
    from safetensors.torch import load_file, save_file
    other = {k: v + 0.01 for k, v in load_file(base).items()}
    other_path = str(root / 'other.safetensors')
    save_file(other, other_path)
    out['other'] = make_task(root / 'other', 'tri', other_path, seed=9)
    return out


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp('img')
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        p = str(root / f'{i}.png')
        Image.fromarray(rng.integers(0, 255, (40 + i, 36, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def assert_same(got, want):
    assert got['labels'] == want['labels']
    np.testing.assert_allclose(got['scores'], want['scores'], atol=1e-5, rtol=0)


def test_every_model_answers_as_its_own_pipeline(folders, images):
    order = ['tri', 'bypass_a', 'other', 'bypass_b', 'bitfit_lora']
    many = pipeline('vision-efficient-tuning', [folders[n] for n in order], device='cpu')
    singles = [pipeline('vision-efficient-tuning', folders[n], device='cpu') for n in order]
    one = many(images[0])
    assert isinstance(one, list) and len(one) == len(order)
    for got, single in zip(one, singles):
        assert_same(got, single(images[0]))
    batch = many(images, batch_size=2)
    assert len(batch) == len(images) and all(len(row) == len(order) for row in batch)
    for img, row in zip(images, batch):
        for got, single in zip(row, singles):
            assert_same(got, single(img))
    assert [r['labels'][0] in TASKS[n][2] for r, n in zip(one, ['tri', 'bypass_a', 'tri', 'bypass_b',
                                                                 'bitfit_lora'])] == [True] * 5


def test_models_on_one_backbone_hold_it_once(folders):
    many = pipeline('vision-efficient-tuning', [folders[n] for n in ('tri', 'bypass_a', 'bypass_b', 'bitfit_lora',
                                                                     'other')], device='cpu')
    tri, a, b, bitfit, other = [m.backbone for m in many.models]
    for vit in (a, b, bitfit):  # the very tensors of the first model on that backbone
        assert vit.blocks[1].mlp.fc1.weight is tri.blocks[1].mlp.fc1.weight
        assert vit.pos_embed is tri.pos_embed and vit.patch_embed.proj.weight is tri.patch_embed.proj.weight
    # what a task trains is its own: BitFit's biases, every tuner
    assert bitfit.blocks[0].attn.qkv.bias is not tri.blocks[0].attn.qkv.bias
    assert bitfit.blocks[0].attn.qkv.weight is tri.blocks[0].attn.qkv.weight
    assert other.blocks[0].attn.qkv.weight is not tri.blocks[0].attn.qkv.weight  # another backbone
    assert len(many.group.sharing()) == 2
    shared = {p.data_ptr() for m in many.models[:4] for p in m.backbone.parameters()}
    alone = {p.data_ptr() for p in many.models[0].backbone.parameters()}
    tuner_params = {p.data_ptr() for m in many.models[:4] for p in m.model.tuner_parameters().values()}
    assert shared - alone <= tuner_params  # besides the first backbone, only tuner parameters


def test_bypass_models_share_one_frozen_forward_per_batch(folders, images, monkeypatch):
    many = pipeline('vision-efficient-tuning', [folders['bypass_a'], folders['bypass_b'], folders['tri']],
                    device='cpu')
    calls = {'frozen': 0, 'forward': 0}
    frozen, forward = Block.forward_frozen, Block.forward

    def count_frozen(self, *a, **k):
        calls['frozen'] += 1
        return frozen(self, *a, **k)

    def count_forward(self, *a, **k):
        calls['forward'] += 1
        return forward(self, *a, **k)
    monkeypatch.setattr(Block, 'forward_frozen', count_frozen)
    monkeypatch.setattr(Block, 'forward', count_forward)
    many(images[:4], batch_size=4)
    depth = VIT['depth']
    assert calls['frozen'] == depth       # both bypass models: one frozen pass through the depth blocks
    assert calls['forward'] == depth      # the standard model: its own tuned pass


def test_tuner_only_folders_load_against_a_backbone_given_once(folders, images, tmp_path, base, capsys):
    from modelscope_utuning.cli import main
    small = {}
    for name in ('tri', 'bypass_b'):
        out = tmp_path / name
        assert main(['export', folders[name], str(out), '--tuner-only']) == 0
        assert 'pytorch_model.pt' not in os.listdir(out)
        small[name] = str(out)
    capsys.readouterr()
    with pytest.raises(ValueError, match='holds only tuners: pass the frozen backbone'):
        pipeline('vision-efficient-tuning', [small['tri']], device='cpu')
    many = pipeline('vision-efficient-tuning', [small['tri'], small['bypass_b']], device='cpu', backbone=base)
    for got, name in zip(many(images[1]), ('tri', 'bypass_b')):
        assert_same(got, pipeline('vision-efficient-tuning', folders[name], device='cpu')(images[1]))
    assert many.models[1].backbone.blocks[0].attn.qkv.weight is many.models[0].backbone.blocks[0].attn.qkv.weight
    one = pipeline('vision-efficient-tuning', small['tri'], device='cpu', backbone=base)  # a single one: a dict
    assert_same(one(images[1]), pipeline('vision-efficient-tuning', folders['tri'], device='cpu')(images[1]))
    # the CLI: a column per model
    code = main(['predict', f'{folders["tri"]},{small["bypass_b"]}', images[0], images[1], '--backbone', base])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and len(out) == 3 and folders['tri'] in out[0] and small['bypass_b'] in out[0]
    assert all(len(line.split()) == 5 for line in out[1:])  # image, (label score) x 2
