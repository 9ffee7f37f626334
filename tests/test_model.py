"""VisionEfficientTuningModel (issue 2): construction, trainable flags, freeze_cfg, forward contract, hub
checkpoints (save / reload through ModelScope's Model.from_pretrained), finetune and loading errors."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import modelscope_utuning  # noqa: F401  (registers our model with ModelScope)
from modelscope.models import Model
from modelscope_utuning import VisionEfficientTuningModel
from modelscope_utuning.checkpoint.hub_layout import CHECKPOINT_FILE

TINY = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=4, num_classes=0)
C, K = 32, 3
CLASSES = ['a', 'b', 'c']

SEQUENTIAL = [{'type': 'adapter', 'op': 'ffn', 'form': 'sequential', 'dim': 4},
              {'type': 'prefix', 'op': 'mha', 'form': 'sequential', 'length': 3},
              {'type': 'prompt', 'op': 'block', 'form': 'sequential', 'length': 2},
              {'type': 'lora', 'op': 'mha', 'rank': 2}]
PARALLEL = [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 4},
            {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 4, 'scale': 'input'},
            {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 3, 'scale': 'scalar'},
            {'type': 'prompt', 'op': 'ffn', 'form': 'parallel', 'length': 2},
            {'type': 'lora', 'op': 'ffn', 'rank': 2, 'alpha': 4}]


pytestmark = pytest.mark.usefixtures('one_thread')


def backbone_cfg(tuners=None, **kw):
    cfg = dict(TINY, **kw)
    if tuners is not None:
        cfg['tuners'] = copy.deepcopy(tuners)
    return cfg


def build(tuners=None, num_classes=K, model_dir=None, **kw):
    torch.manual_seed(0)
    bb = kw.pop('backbone', None) or backbone_cfg(tuners)
    return VisionEfficientTuningModel(model_dir=model_dir, backbone=bb, head={'num_classes': num_classes}, **kw)


def imgs(b=2, seed=0):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def randomize_(model, seed=3):
    """Every parameter (frozen ones too) away from its initialisation, so a reload is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def trainable(model):
    return {n for n, p in model.model.named_parameters() if p.requires_grad}


def write_model_dir(folder, model, tuners=None, num_classes=K, extra_model=None, **backbone_kw):
    """configuration.json + pytorch_model.pt, as a ModelScope hub model folder."""
    os.makedirs(folder, exist_ok=True)
    model_cfg = {'type': 'vision-efficient-tuning', 'backbone': backbone_cfg(tuners, **backbone_kw),
                 'head': {'type': 'ClassifierHead', 'dim': C, 'num_classes': num_classes}}
    model_cfg.update(extra_model or {})
    with open(os.path.join(folder, 'configuration.json'), 'w') as f:
        json.dump({'framework': 'pytorch', 'task': 'vision-efficient-tuning',
                   'pipeline': {'type': 'vision-efficient-tuning'}, 'model': model_cfg}, f)
    if model is not None:
        model.save_hub_checkpoint(folder)
    return folder


def scores(model, x=None):
    model.eval()
    with torch.no_grad():
        return model({'imgs': imgs() if x is None else x})['scores']


# -- construction and trainable flags ------------------------------------------------------------------------------
def test_builds_without_model_dir_and_flags():
    m = build(PARALLEL)
    assert isinstance(m.model.backbone.blocks[0].mha_adapter, torch.nn.Module)
    names = trainable(m)
    for n, p in m.model.named_parameters():
        if n.startswith('head.'):
            assert p.requires_grad, n
        elif any(f'.{t}.' in f'.{n}' for t in ('mha_adapter', 'ffn_adapter', 'block_prefix', 'ffn_prompt',
                                                'ffn_lora')):
            assert p.requires_grad, n
        else:
            assert not p.requires_grad, n
    assert names and all(n.startswith('head.') or '_' in n.split('.')[3] for n in names if n.startswith('backbone'))


def test_plain_model_trains_head_only():
    m = build()
    assert trainable(m) == {'head.fc.weight', 'head.fc.bias'}
    t, total = m.trainable_parameters()
    assert t == C * K + K and total == sum(p.numel() for p in m.parameters())


def test_bitfit_biases_trainable():
    m = build([{'type': 'bitfit'}])
    bb = {n for n in trainable(m) if n.startswith('backbone.')}
    assert bb and all(n.endswith('.bias') for n in bb)
    all_biases = {f'backbone.{n}' for n, _ in m.backbone.named_parameters() if n.endswith('.bias')}
    assert bb == all_biases
    m = build([{'type': 'bitfit', 'layers': [1]}])
    bb = {n for n in trainable(m) if n.startswith('backbone.')}
    assert bb and all(n.startswith('backbone.blocks.1.') and n.endswith('.bias') for n in bb)


def test_trainable_parameters_counts():
    m = build([{'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 4, 'scale': 'scalar'}])
    t, total = m.trainable_parameters()
    assert t == 2 * (2 * C * 4 + 4 + C + 1) + C * K + K
    assert total == sum(p.numel() for p in m.parameters())
    assert t == sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_freeze_cfg_part_lists():
    tuners = [{'type': 'adapter', 'op': 'ffn', 'dim': 4}, {'type': 'adapter', 'op': 'mha', 'dim': 4}]
    # train_part alone: the default policy, plus the matching parameters (backbone and head both)
    m = build(tuners, freeze_cfg={'train_part': {'backbone': ['norm1'], 'head': ['fc']}})
    default = trainable(build(tuners))
    norm1 = {f'backbone.{n}' for n, _ in m.backbone.named_parameters() if 'norm1' in n}
    assert norm1 and trainable(m) == default | norm1
    # freeze_part (the built-in's reading): everything trains except the listed substrings, in backbone and
    # head both (the built-in applied only one of the two), then train_part re-enables matches
    m = build(tuners, freeze_cfg={'freeze_part': {'backbone': ['blocks', 'cls_token'], 'head': ['fc.bias']},
                                  'train_part': {'backbone': ['mha_adapter', 'norm1']}})
    want = {n for n, _ in m.model.named_parameters()
            if (n.startswith('head.') and 'fc.bias' not in n)
            or (n.startswith('backbone.') and not any(s in n for s in ('blocks', 'cls_token')))
            or 'mha_adapter' in n or 'norm1' in n}
    assert trainable(m) == want
    assert 'head.fc.weight' in want and 'backbone.pos_embed' in want and 'backbone.cls_token' not in want
    assert not any('ffn_adapter' in n for n in want)
    # train_part wins over freeze_part (applied after it)
    m = build(tuners, freeze_cfg={'freeze_part': {'head': ['fc']}, 'train_part': {'head': ['bias']}})
    assert 'head.fc.bias' in trainable(m) and 'head.fc.weight' not in trainable(m)
    m.apply_freeze_policy(None)  # back to the default policy
    assert trainable(m) == default
    for key in ('freeze_part', 'train_part'):
        with pytest.raises(ValueError, match='unknown part'):
            build(tuners, freeze_cfg={key: {'neck': ['x']}})


def test_freeze_cfg_builtin_bitfit_semantics():
    """The hub BitFit config: freeze_part {'backbone': ['weight', 'cls_token', 'pos_embed']} trains the biases."""
    m = build(freeze_cfg={'freeze_part': {'backbone': ['weight', 'cls_token', 'pos_embed']}})
    want = {f'backbone.{n}' for n, _ in m.backbone.named_parameters() if n.endswith('.bias')} | \
        {'head.fc.weight', 'head.fc.bias'}
    assert trainable(m) == want


# -- forward contract ------------------------------------------------------------------------------------------------
def test_forward_contract():
    m = build(PARALLEL)
    randomize_(m)
    m.train()
    out = m({'imgs': imgs(), 'labels': torch.tensor([0, 2])})
    assert set(out) == {'loss'} and out['loss'].ndim == 0 and out['loss'].requires_grad
    m.eval()
    with torch.no_grad():
        out = m({'imgs': imgs(4)})
    assert set(out) == {'scores', 'labels'}
    assert out['scores'].shape == (4, K)
    torch.testing.assert_close(out['scores'].sum(1), torch.ones(4))
    assert (out['scores'] >= 0).all()
    assert torch.equal(out['labels'], out['scores'].argmax(1))
    # labels in eval mode are accepted and ignored
    with torch.no_grad():
        out2 = m({'imgs': imgs(4), 'labels': torch.zeros(4, dtype=torch.long)})
    assert torch.equal(out2['scores'], out['scores'])


def test_loss_is_cross_entropy():
    m = build()
    m.train()
    x, y = imgs(), torch.tensor([1, 2])
    with torch.no_grad():
        logits = m.model(x)
        loss = m({'imgs': x, 'labels': y})['loss']
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, y))


@pytest.mark.parametrize('bad', [torch.zeros(2, 3, 32, 32), {'images': torch.zeros(2, 3, 32, 32)}, None,
                                 {'imgs': torch.zeros(2, 3, 48, 48)}, {'imgs': torch.zeros(3, 32, 32)}])
def test_bad_input_raises_value_error(bad):
    m = build()
    m.eval()
    with pytest.raises(ValueError):
        m(bad)


def test_train_without_labels_raises():
    m = build()
    m.train()
    with pytest.raises(ValueError, match='labels'):
        m({'imgs': imgs()})


# -- hub checkpoints -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('tuners', [SEQUENTIAL, PARALLEL, None], ids=['sequential', 'parallel', 'plain'])
def test_save_and_from_pretrained_roundtrip(tmp_path, tuners):
    m = build(tuners, CLASSES=CLASSES)
    randomize_(m)
    want = scores(m)
    folder = write_model_dir(str(tmp_path / 'model'), m, tuners)
    ckpt = torch.load(os.path.join(folder, CHECKPOINT_FILE), weights_only=True)
    assert set(ckpt) >= {'backbone_weight', 'head_weight', 'CLASSES'} and ckpt['CLASSES'] == CLASSES
    assert set(ckpt['head_weight']) == {'fc.weight', 'fc.bias'}

    loaded = Model.from_pretrained(folder)
    assert type(loaded) is VisionEfficientTuningModel
    assert loaded.CLASSES == CLASSES
    assert torch.equal(scores(loaded), want)
    for (n1, p1), (n2, p2) in zip(m.model.state_dict().items(), loaded.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert trainable(loaded) == trainable(m)
    # the direct constructor reads the same folder
    direct = VisionEfficientTuningModel(model_dir=folder, backbone=backbone_cfg(tuners), head={'num_classes': K})
    assert torch.equal(scores(direct), want)


def test_sequential_tuners_saved_under_builtin_names(tmp_path):
    m = build(SEQUENTIAL)
    m.save_hub_checkpoint(str(tmp_path))
    keys = set(torch.load(str(tmp_path / CHECKPOINT_FILE), weights_only=True)['backbone_weight'])
    assert {'blocks.0.adapter.ln1.weight', 'blocks.0.adapter.ln2.bias', 'blocks.1.attn.prefix.prefix_key',
            'blocks.1.attn.prefix.prefix_value', 'blocks.0.prompt.prompt_token',
            'blocks.0.attn.lora.lora_a.weight', 'blocks.0.attn.lora.lora_b.weight'} <= keys
    assert not any('_adapter' in k or '_prefix' in k or '_prompt' in k or '_lora' in k for k in keys)
    m = build(PARALLEL)
    m.save_hub_checkpoint(str(tmp_path))
    keys = set(torch.load(str(tmp_path / CHECKPOINT_FILE), weights_only=True)['backbone_weight'])
    assert 'blocks.0.ffn_adapter.up.weight' in keys and 'blocks.0.block_prefix.key' in keys


def test_finetune_unload_head_new_class_count(tmp_path):
    m = build([{'type': 'adapter', 'op': 'ffn', 'dim': 4}], CLASSES=CLASSES)
    randomize_(m)
    folder = write_model_dir(str(tmp_path / 'm'), m, [{'type': 'adapter', 'op': 'ffn', 'dim': 4}])
    new = VisionEfficientTuningModel(model_dir=folder, backbone=backbone_cfg([{'type': 'adapter', 'op': 'ffn',
                                                                                'dim': 4}]),
                                     head={'num_classes': 5}, finetune=True,
                                     pretrained_cfg={'unload_part': {'head': ['fc']}})
    assert new.head.fc.weight.shape == (5, C)
    assert new.CLASSES != CLASSES
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(new.backbone.state_dict()[k], v), k
    assert scores(new).shape == (2, 5)
    # a changed class count alone (finetune, no unload_part) also gives a fresh head
    new2 = VisionEfficientTuningModel(model_dir=folder, backbone=backbone_cfg([{'type': 'adapter', 'op': 'ffn',
                                                                                 'dim': 4}]),
                                      head={'num_classes': 7}, finetune=True)
    assert new2.head.fc.weight.shape == (7, C)
    assert torch.equal(new2.backbone.blocks[1].mlp.fc1.weight, m.backbone.blocks[1].mlp.fc1.weight)
    # finetune with the same class count and no unload keeps the trained head
    same = VisionEfficientTuningModel(model_dir=folder, backbone=backbone_cfg([{'type': 'adapter', 'op': 'ffn',
                                                                                 'dim': 4}]),
                                      head={'num_classes': K}, finetune=True)
    assert torch.equal(same.head.fc.weight, m.head.fc.weight) and same.CLASSES == CLASSES
    # through Model.from_pretrained with the settings in configuration.json
    write_model_dir(str(tmp_path / 'm'), None, [{'type': 'adapter', 'op': 'ffn', 'dim': 4}], num_classes=5,
                    extra_model={'finetune': True, 'pretrained_cfg': {'unload_part': {'head': ['fc']}}})
    via_hub = Model.from_pretrained(folder)
    assert via_hub.head.fc.weight.shape == (5, C)
    assert torch.equal(via_hub.backbone.blocks[0].ffn_adapter.down.weight, m.backbone.blocks[0].ffn_adapter.down.weight)


def test_not_fitting_checkpoint_one_error_listing_problems(tmp_path):
    m = build()
    m.save_hub_checkpoint(str(tmp_path))
    path = str(tmp_path / CHECKPOINT_FILE)
    ckpt = torch.load(path, weights_only=True)
    del ckpt['backbone_weight']['blocks.1.mlp.fc2.weight']
    ckpt['backbone_weight']['blocks.0.attn.proj.bias'] = torch.zeros(C + 1)
    ckpt['backbone_weight']['blocks.0.surprise.weight'] = torch.zeros(2)
    torch.save(ckpt, path)
    with pytest.raises(ValueError) as err:
        build(model_dir=str(tmp_path))
    msg = str(err.value)
    assert 'blocks.1.mlp.fc2.weight' in msg and 'missing' in msg
    assert 'blocks.0.attn.proj.bias' in msg and 'shape' in msg
    assert 'blocks.0.surprise.weight' in msg and 'unexpected' in msg


def test_wrong_architecture_checkpoint(tmp_path):
    m = build()
    m.save_hub_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match='missing weights'):
        build(model_dir=str(tmp_path), backbone=backbone_cfg(depth=3))
    with pytest.raises(ValueError, match='shape'):
        build(model_dir=str(tmp_path), backbone=backbone_cfg(embed_dim=64), num_classes=K)


def test_head_mismatch_without_finetune_is_value_error(tmp_path):
    m = build()
    m.save_hub_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match='head'):
        build(model_dir=str(tmp_path), num_classes=K + 2)


def test_finetune_unload_backbone_part(tmp_path):
    m = build()
    randomize_(m)
    m.save_hub_checkpoint(str(tmp_path))
    new = build(model_dir=str(tmp_path), finetune=True, pretrained_cfg={'unload_part': {'backbone': ['norm.']}})
    assert torch.equal(new.backbone.blocks[0].attn.qkv.weight, m.backbone.blocks[0].attn.qkv.weight)
    assert not torch.equal(new.backbone.norm.weight, m.backbone.norm.weight)


def test_tuners_absent_from_checkpoint_start_fresh(tmp_path):
    m = build()
    randomize_(m)
    m.save_hub_checkpoint(str(tmp_path))
    tuned = build(PARALLEL, model_dir=str(tmp_path))
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(tuned.backbone.state_dict()[k], v), k
    assert torch.equal(tuned.head.fc.weight, m.head.fc.weight)
    # parallel tuners start at the frozen model: identical scores
    assert torch.equal(scores(tuned), scores(m))
    assert torch.equal(tuned.backbone.blocks[0].mha_adapter.up.weight, torch.zeros(C, 4))


def test_pos_embed_of_another_grid_loads(tmp_path):
    m = build(backbone=backbone_cfg(img_size=64))   # 4x4 grid
    m.save_hub_checkpoint(str(tmp_path))
    small = build(model_dir=str(tmp_path))            # 2x2 grid
    assert small.backbone.pos_embed.shape == (1, 5, C)
    assert torch.equal(small.backbone.pos_embed[:, 0], m.backbone.pos_embed[:, 0])
    assert scores(small).shape == (2, K)


class _Payload:
    def __reduce__(self):
        return (os.makedirs, (os.environ['UTUNING_TEST_MARKER'],))


def test_checkpoint_loading_is_weights_only(tmp_path, monkeypatch):
    marker = str(tmp_path / 'executed')
    monkeypatch.setenv('UTUNING_TEST_MARKER', marker)
    folder = tmp_path / 'evil'
    folder.mkdir()
    path = str(folder / CHECKPOINT_FILE)
    torch.save({'backbone_weight': {}, 'head_weight': {}, 'CLASSES': ['x'], 'extra': _Payload()}, path)
    with pytest.raises(ValueError) as err:
        build(model_dir=str(folder))
    assert path in str(err.value)
    assert not os.path.exists(marker)


def test_not_a_hub_checkpoint(tmp_path):
    torch.save([1, 2, 3], str(tmp_path / CHECKPOINT_FILE))
    with pytest.raises(ValueError, match=str(tmp_path)):
        build(model_dir=str(tmp_path))
    torch.save({'foo': torch.zeros(1)}, str(tmp_path / CHECKPOINT_FILE))
    with pytest.raises(ValueError, match='backbone_weight'):
        build(model_dir=str(tmp_path))


def test_model_dir_without_checkpoint_starts_fresh(tmp_path):
    folder = write_model_dir(str(tmp_path / 'fresh'), None, SEQUENTIAL)
    m = Model.from_pretrained(folder)
    assert type(m) is VisionEfficientTuningModel
    assert scores(m).shape == (2, K)


def test_legacy_config_from_pretrained(tmp_path):
    """A hub-style legacy config (type strings, *_length keys) builds the original-form tuners."""
    legacy = dict(type='VitB16_UTuning', prompt_length=2, prompt_type=None, prefix_length=3, prefix_type=None,
                  adapter_length=4, adapter_type=None)
    src = VisionEfficientTuningModel(model_dir=None, backbone=backbone_cfg(**legacy), head={'num_classes': K},
                                     CLASSES=CLASSES)
    randomize_(src)
    folder = write_model_dir(str(tmp_path / 'legacy'), src, None, **legacy)
    m = Model.from_pretrained(folder)
    assert torch.equal(scores(m), scores(src))
    b = m.backbone.blocks[1]
    assert b.ffn_adapter.form == b.mha_prefix.form == b.block_prompt.form == 'sequential'
    assert trainable(m) == {n for n, _ in m.model.named_parameters()
                            if n.startswith('head.') or any(t in n for t in ('_adapter', '_prefix', '_prompt'))}


def test_sequential_adapter_weights_do_not_load_into_a_parallel_adapter():
    """The built-in's adapter names mean a sequential adapter; a parallel one of the same slot starts fresh."""
    import os
    import modelscope_utuning  # noqa: F401
    from modelscope.models import Model
    here = os.path.join(os.path.dirname(__file__), 'fixtures', 'builtin', 'adapter')
    seq = Model.from_pretrained(here)
    par = Model.from_pretrained(here, backbone={'img_size': 224, 'patch_size': 16, 'embed_dim': 32, 'depth': 2,
                                                'num_heads': 4, 'num_classes': 0,
                                                'tuners': [{'type': 'adapter', 'op': 'ffn', 'form': 'parallel',
                                                            'dim': 10}]})
    assert par.backbone.blocks[0].ffn_adapter.form == 'parallel'
    assert torch.count_nonzero(par.backbone.blocks[0].ffn_adapter.up.weight) == 0  # fresh: zero-initialised
    assert torch.equal(par.backbone.blocks[0].attn.qkv.weight, seq.backbone.blocks[0].attn.qkv.weight)


def test_finetune_with_another_tuner_size_starts_those_tuners_fresh():
    import os
    import modelscope_utuning  # noqa: F401
    from modelscope.models import Model
    here = os.path.join(os.path.dirname(__file__), 'fixtures', 'builtin', 'adapter')
    cfg = {'img_size': 224, 'patch_size': 16, 'embed_dim': 32, 'depth': 2, 'num_heads': 4, 'num_classes': 0,
           'adapter_length': 4}
    with pytest.raises(ValueError, match='ffn_adapter.down.weight: checkpoint'):
        Model.from_pretrained(here, backbone=dict(cfg))
    tuned = Model.from_pretrained(here, backbone=dict(cfg), finetune=True)
    assert tuned.backbone.blocks[0].ffn_adapter.down.weight.shape == (4, 32)


def test_as_network_unwraps_every_form_of_our_model_and_names_anything_else():
    import torch.nn as nn
    from modelscope_utuning.network import as_network
    model = VisionEfficientTuningModel(model_dir=None, backbone=dict(
        type='VitB16_UTuning', img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, num_classes=0),
        head={'num_classes': 3})

    class Wrapper(nn.Module):  # what DistributedDataParallel looks like from outside: the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    net = model.model
    assert as_network(net) is net and as_network(model) is net and as_network(Wrapper(model)) is net
    with pytest.raises(TypeError, match='got Linear'):
        as_network(nn.Linear(2, 2))
    with pytest.raises(TypeError, match='got str'):
        as_network('model')
