"""Export formats: tuner-only files (adapter_model.safetensors + adapter_config.json) and LoRA merged for
inference; a trained run's tuner-only files without their base refuse to build a random backbone."""
import json
import os

import pytest
import torch

from modelscope_utuning.backbone.vit import VisionTransformer
from modelscope_utuning.checkpoint import tuner_only
from modelscope_utuning.checkpoint.tuner_only import CONFIG_FILE, WEIGHTS_FILE
from modelscope_utuning.model import (VisionEfficientTuningModel, has_lora, load_tuners, merge_lora,
                                      model_from_tuners, save_tuners)

from colour_runs import trained  # noqa: F401  (a fixture)

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
TRI_TUNER = [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 4},
             {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 4},
             {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 3, 'scale': 'channel', 'layers': 'all'}]


@torch.no_grad()
def randomize_(params, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope='module')
def base_weights(tmp_path_factory):
    """A 'pre-trained' backbone file (timm layout) every model here starts from."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    vit = VisionTransformer(**VIT)
    randomize_(vit.parameters(), seed=1, std=0.1)
    path = str(tmp_path_factory.mktemp('base') / 'vit_tiny.safetensors')
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    return path


def build(base, tuners=None, classes=None, **backbone):
    cfg = dict(VIT, pretrained_weights=base, **backbone)
    if tuners is not None:
        cfg['tuners'] = tuners
    return VisionEfficientTuningModel(model_dir=None, backbone=cfg, head={'num_classes': 3}, CLASSES=classes)


def train_(model, seed=2):
    """Stand-in for training: perturb every trainable weight (tuners, BitFit biases, head)."""
    randomize_([p for p in model.parameters() if p.requires_grad], seed=seed)
    return model


def imgs(size=32, n=4):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(9))


@torch.no_grad()
def scores(model, x):
    return model.eval()({'imgs': x})['scores']


# ---------------------------------------------------------------------------------------------------------------
# tuner-only export
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('tuners, legacy', [
    (TRI_TUNER + [{'type': 'lora', 'op': 'ffn', 'rank': 2}, {'type': 'bitfit', 'layers': [1]}], {}),
    ([{'type': 'prompt', 'op': 'mha', 'form': 'parallel', 'length': 3, 'scale': 'input'}],
     {'adapter_length': 4, 'prompt_length': [2, 0], 'prefix_length': 3, 'lora_length': 2}),
])
def test_tuner_only_roundtrip(base_weights, tmp_path, tuners, legacy):
    a = train_(build(base_weights, tuners, classes=['cat', 'dog', 'fox'], **legacy))
    folder = str(tmp_path / 'export')
    paths = save_tuners(a, folder)
    assert sorted(os.listdir(folder)) == sorted([WEIGHTS_FILE, CONFIG_FILE])  # nothing else, no temp files
    assert paths == {'weights': os.path.join(folder, WEIGHTS_FILE), 'config': os.path.join(folder, CONFIG_FILE)}

    from safetensors.torch import load_file
    saved = load_file(paths['weights'])
    trainable = {n[len('model.'):] for n, p in a.named_parameters() if p.requires_grad}
    assert set(saved) == trainable  # exactly the tuners, the BitFit biases and the head
    assert sum(v.numel() for v in saved.values()) == a.trainable_parameters()[0]

    cfg = json.load(open(paths['config']))
    assert cfg['format_version'] == 2 and cfg['CLASSES'] == ['cat', 'dog', 'fox']
    assert cfg['backbone_fingerprint'] == a.model.backbone_fingerprint()
    assert cfg['head'] == {'num_classes': 3, 'dim': 32}
    assert cfg['base']['embed_dim'] == 32 and cfg['base']['pretrained_weights'] == base_weights
    assert not set(cfg['base']) & {'tuners', 'adapter_length', 'prompt_length', 'prefix_length', 'lora_length'}
    assert cfg['tuners'] == [s.to_entry() for s in a.specs]  # every option written out
    if legacy:  # legacy keys are written as the entries they mean
        written = [{k: e[k] for k in ('type', 'op', 'form', 'dim', 'length') if k in e} for e in cfg['tuners']]
        assert {'type': 'adapter', 'op': 'ffn', 'form': 'sequential', 'dim': 4} in written
        assert {'type': 'prompt', 'op': 'block', 'form': 'sequential', 'length': [2, 0]} in written

    b = build(base_weights, tuners, **legacy)  # fresh tuners and head on the same base
    x = imgs()
    assert not torch.allclose(scores(a, x), scores(b, x), atol=1e-4)
    load_tuners(b, folder)
    assert b.CLASSES == ['cat', 'dog', 'fox']
    assert torch.allclose(scores(a, x), scores(b, x), atol=1e-6, rtol=0)

    c = model_from_tuners(folder)  # built from adapter_config.json alone
    assert torch.allclose(scores(a, x), scores(c, x), atol=1e-6, rtol=0)
    assert c.trainable_parameters() == a.trainable_parameters()


def test_tuner_only_load_reports_everything_at_once(base_weights, tmp_path):
    a = train_(build(base_weights, TRI_TUNER))
    save_tuners(a, str(tmp_path))
    other = build(base_weights, [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 4},
                                 {'type': 'prompt', 'op': 'ffn', 'form': 'parallel', 'length': 2}])
    with pytest.raises(ValueError) as e:
        load_tuners(other, str(tmp_path))
    msg = str(e.value)
    assert 'missing weights' in msg and 'backbone.blocks.0.ffn_prompt.tokens' in msg
    assert 'unexpected weights' in msg and 'backbone.blocks.0.block_prefix.key' in msg
    assert 'tuners: file' in msg


def test_tuner_only_same_names_different_meaning_refused(base_weights, tmp_path):
    """A parallel prefix without scale has the very names of a sequential one: the entries tell them apart."""
    a = train_(build(base_weights, [{'type': 'prefix', 'op': 'mha', 'form': 'parallel', 'length': 3,
                                     'scale': 'none'}]))
    save_tuners(a, str(tmp_path))
    b = build(base_weights, [{'type': 'prefix', 'op': 'mha', 'form': 'sequential', 'length': 3}])
    with pytest.raises(ValueError, match='tuners: file'):
        load_tuners(b, str(tmp_path))


def test_tuner_only_other_base_refused(base_weights, tmp_path):
    save_tuners(train_(build(base_weights, TRI_TUNER)), str(tmp_path))
    other = VisionEfficientTuningModel(model_dir=None, head={'num_classes': 3},
                                       backbone=dict(VIT, mlp_ratio=2.0, tuners=TRI_TUNER))
    with pytest.raises(ValueError, match=r'base differs.*mlp_ratio: file 4\.0 vs model 2\.0'):
        load_tuners(other, str(tmp_path))


def test_tuner_only_written_atomically(base_weights, tmp_path, monkeypatch):
    folder = str(tmp_path)
    a = train_(build(base_weights, TRI_TUNER))
    save_tuners(a, folder)
    before = open(os.path.join(folder, WEIGHTS_FILE), 'rb').read()

    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        with open(filename, 'wb') as f:
            f.write(b'half')
        raise OSError('disk full')
    monkeypatch.setattr(safetensors.torch, 'save_file', broken)
    with pytest.raises(OSError, match='disk full'):
        save_tuners(train_(a, seed=5), folder)
    assert sorted(os.listdir(folder)) == sorted([WEIGHTS_FILE, CONFIG_FILE])  # no temp file left
    assert open(os.path.join(folder, WEIGHTS_FILE), 'rb').read() == before  # old export intact


def test_tuner_only_missing_files(tmp_path, base_weights):
    with pytest.raises(ValueError, match=CONFIG_FILE):
        load_tuners(build(base_weights, TRI_TUNER), str(tmp_path))
    with pytest.raises(ValueError, match='pass pretrained_weights='):
        a = build(base_weights, TRI_TUNER)
        a.backbone_config['pretrained_weights'] = str(tmp_path / 'gone.safetensors')
        save_tuners(a, str(tmp_path))
        model_from_tuners(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# LoRA merged into the weights
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('tuners, legacy', [
    ([{'type': 'lora', 'op': 'mha', 'rank': 4, 'alpha': 8}], {}),
    ([{'type': 'lora', 'op': 'ffn', 'rank': 3}], {}),
    ([{'type': 'lora', 'op': 'mha', 'rank': 2}, {'type': 'lora', 'op': 'ffn', 'rank': 2, 'layers': [1]}]
     + TRI_TUNER[:2] + [{'type': 'prefix', 'op': 'mha', 'form': 'parallel', 'length': 3}], {}),
    ([], {'lora_length': 4, 'prefix_length': 2}),
])
def test_merge_lora_identical_outputs(base_weights, tuners, legacy):
    model = train_(build(base_weights, tuners, **legacy), seed=3)
    x = imgs()
    want = scores(model, x)
    with torch.no_grad():
        want_tokens = model.backbone.eval().forward_features(x)
    lora_weights = {n: p.clone() for n, p in model.backbone.named_parameters() if 'lora' in n}
    assert lora_weights and any(p.abs().sum() > 0 for n, p in lora_weights.items() if n.endswith('_b.weight')
                                or 'lora_b' in n)
    trainable_before = model.trainable_parameters()[0]

    assert merge_lora(model) is model
    assert not has_lora(model)
    assert not any('lora' in k for k in model.state_dict())
    assert all(not any('lora' in n for n in b.hooks.names) for b in model.backbone.blocks)
    assert all(getattr(b, f'{op}_lora', None) is None for b in model.backbone.blocks for op in ('mha', 'ffn'))
    assert all(s.type != 'lora' for s in model.specs)
    assert 'lora_length' not in model.backbone_config
    assert all(e.get('type') != 'lora' for e in model.backbone_config.get('tuners', []))
    assert model.trainable_parameters()[0] == trainable_before - sum(p.numel() for p in lora_weights.values())
    assert not any(p.requires_grad for n, p in model.backbone.named_parameters()
                   if n.endswith(('attn.qkv.weight', 'mlp.fc1.weight', 'mlp.fc2.weight')))

    with torch.no_grad():
        got_tokens = model.backbone.forward_features(x)
    assert (got_tokens - want_tokens).abs().max().item() < 1e-5
    assert (scores(model, x) - want).abs().max().item() < 1e-5


def test_merged_model_saves_and_reloads_as_plain_backbone(base_weights, tmp_path):
    model = train_(build(base_weights, [{'type': 'lora', 'op': 'mha', 'rank': 4},
                                        {'type': 'adapter', 'op': 'ffn', 'form': 'sequential', 'dim': 4}]))
    x = imgs()
    want = scores(model, x)
    merge_lora(model)
    model.save_hub_checkpoint(str(tmp_path))
    cfg = {k: v for k, v in model.backbone_config.items() if k != 'pretrained_weights'}
    again = VisionEfficientTuningModel(model_dir=str(tmp_path), backbone=cfg, head={'num_classes': 3})
    assert not has_lora(again)
    assert (scores(again, x) - want).abs().max().item() < 1e-5


def test_merge_refused_where_outputs_would_change(base_weights):
    model = train_(build(base_weights, [{'type': 'lora', 'op': 'mha', 'rank': 2},
                                        {'type': 'prompt', 'op': 'ffn', 'form': 'parallel', 'length': 2}]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 0: the parallel prompt on op 'ffn'"):
        merge_lora(model)
    assert has_lora(model)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_merge_bare_backbone():
    from modelscope_utuning.tuners import attach_block_tuners, dims_of, parse_tuners
    vit = VisionTransformer(**VIT).eval()
    attach_block_tuners(vit, parse_tuners([{'type': 'lora', 'op': 'ffn', 'rank': 2}], dims_of(vit)))
    randomize_([p for n, p in vit.named_parameters() if 'lora' in n], seed=4)
    x = imgs()
    with torch.no_grad():
        want = vit(x)
        got = merge_lora(vit)(x)
    assert not has_lora(vit) and (got - want).abs().max().item() < 1e-5


# -- tuner-only files of a trained run, without their base (issue 11) --------------------------------------------------
@pytest.mark.usefixtures('one_thread')
def test_tuners_without_base_weights_refuse_to_build_a_random_backbone(trained, tmp_path):
    from modelscope_utuning import model_from_tuners
    root, out = trained
    with pytest.raises(ValueError, match='pass pretrained_weights='):
        model_from_tuners(out)
