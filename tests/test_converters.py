"""Pre-trained backbone converters: every layout loads to the same features as its source network.

Offline and tiny: random ``transformers`` ViTModel / Dinov2Model (both name styles), a Google-layout npz written
here by the inverse mapping, timm and hub files written from our own ViT.
"""
import os
import re

import numpy as np
import pytest
import torch

from modelscope_utuning.backbone.vit import VisionTransformer
from modelscope_utuning.checkpoint import converters as cv
from modelscope_utuning.checkpoint.hub_layout import write_checkpoint
from modelscope_utuning.tuners import attach_block_tuners, dims_of, parse_tuners

TOL = 1e-4


def tiny_vit(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    args.update(kw)
    return VisionTransformer(**args).eval()


@torch.no_grad()
def randomize_(module, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        p.copy_(1.0 + noise if name.endswith(('norm1.weight', 'norm2.weight', 'norm.weight', 'layernorm.weight',
                                               'layernorm_before.weight', 'layernorm_after.weight'))
                else noise)
    return module


def images(size, n=2, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def features(vit, x):
    return vit.eval().forward_features(x)


def save_safetensors(state, path):
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face transformers (tests only) - both name styles
# ---------------------------------------------------------------------------------------------------------------
import transformers  # a test-only dependency (setup.cfg [test]); the package never imports it

needs_hf = pytest.mark.hf  # marks the tests that build Hugging Face models

# 5.x <-> 4.x renames, per family (applied in order); written here independently of the package.
VIT_5_TO_4 = [(r'^layers\.(\d+)\.', r'encoder.layer.\1.'), (r'\.attention\.q_proj\.', '.attention.attention.query.'),
              (r'\.attention\.k_proj\.', '.attention.attention.key.'),
              (r'\.attention\.v_proj\.', '.attention.attention.value.'),
              (r'\.attention\.o_proj\.', '.attention.output.dense.'), (r'\.mlp\.fc1\.', '.intermediate.dense.'),
              (r'\.mlp\.fc2\.', '.output.dense.')]
VIT_4_TO_5 = [(r'^encoder\.layer\.(\d+)\.', r'layers.\1.'), (r'\.attention\.attention\.query\.', '.attention.q_proj.'),
              (r'\.attention\.attention\.key\.', '.attention.k_proj.'),
              (r'\.attention\.attention\.value\.', '.attention.v_proj.'),
              (r'\.attention\.output\.dense\.', '.attention.o_proj.'), (r'\.intermediate\.dense\.', '.mlp.fc1.'),
              (r'\.output\.dense\.', '.mlp.fc2.')]
DINO_5_TO_4 = [(r'\.attention\.q_proj\.', '.attention.attention.query.'),
               (r'\.attention\.k_proj\.', '.attention.attention.key.'),
               (r'\.attention\.v_proj\.', '.attention.attention.value.'),
               (r'\.attention\.o_proj\.', '.attention.output.dense.')]
DINO_4_TO_5 = [(r'\.attention\.attention\.query\.', '.attention.q_proj.'),
               (r'\.attention\.attention\.key\.', '.attention.k_proj.'),
               (r'\.attention\.attention\.value\.', '.attention.v_proj.'),
               (r'\.attention\.output\.dense\.', '.attention.o_proj.')]


def rename(state, rules):
    out = {}
    for k, v in state.items():
        for pat, rep in rules:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


def new_names(state):
    return any('.q_proj.' in k for k in state)


def both_styles(state, to_old, to_new):
    """{'5.x': ..., '4.x': ...} from the installed model's state (whichever style it has)."""
    if new_names(state):
        return {'5.x': dict(state), '4.x': rename(state, to_old)}
    return {'4.x': dict(state), '5.x': rename(state, to_new)}


def hf_vit_model(seed=0):
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=8, qkv_bias=True, hidden_act='gelu',
                                 layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return randomize_(transformers.ViTModel(cfg, add_pooling_layer=True), seed=seed).eval()


def hf_dinov2_model(seed=0, **kw):
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
                                    image_size=28, patch_size=7, qkv_bias=True, hidden_act='gelu',
                                    layer_norm_eps=1e-6, layerscale_value=1.0, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, **kw)
    return randomize_(transformers.Dinov2Model(cfg), seed=seed).eval()


@pytest.fixture(scope='module')
def hf_vit():
    return hf_vit_model()


@pytest.fixture(scope='module')
def hf_dinov2():
    return hf_dinov2_model()


@needs_hf
@pytest.mark.parametrize('style', ['5.x', '4.x'])
def test_hf_vit_features_match(hf_vit, tmp_path, style):
    state = both_styles(hf_vit.state_dict(), VIT_5_TO_4, VIT_4_TO_5)[style]
    assert cv.detect_layout(state) == 'hf_vit'
    path = save_safetensors(state, tmp_path / 'vit.safetensors')
    vit = tiny_vit(norm_eps=1e-12)
    info = cv.load_pretrained_backbone(vit, path)
    assert info['layout'] == 'hf_vit'
    x = images(32)
    with torch.no_grad():
        want = hf_vit(pixel_values=x).last_hidden_state
    got = features(vit, x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < TOL


@needs_hf
@pytest.mark.parametrize('style', ['5.x', '4.x'])
def test_hf_dinov2_features_match(hf_dinov2, tmp_path, style):
    state = both_styles(hf_dinov2.state_dict(), DINO_5_TO_4, DINO_4_TO_5)[style]
    assert any('mask_token' in k for k in state)
    assert cv.detect_layout(state) == 'hf_dinov2'
    path = save_safetensors(state, tmp_path / 'dinov2.safetensors')
    vit = tiny_vit(img_size=28, patch_size=7, init_values=1.0, norm_eps=1e-6)
    cv.load_pretrained_backbone(vit, path)
    x = images(28)
    with torch.no_grad():
        want = hf_dinov2(pixel_values=x).last_hidden_state
    assert (features(vit, x) - want).abs().max().item() < TOL
    # the layer scales are the checkpoint's, not init_values
    assert torch.equal(vit.blocks[1].ls2.gamma, state[[k for k in state if 'layer.1.layer_scale2' in k][0]])


@needs_hf
def test_legacy_names_are_what_transformers_itself_reads(hf_vit, hf_dinov2, tmp_path):
    """The synthesized other-style dicts are real: the installed transformers loads them to the same weights."""
    for model, rules in ((hf_vit, (VIT_5_TO_4, VIT_4_TO_5)), (hf_dinov2, (DINO_5_TO_4, DINO_4_TO_5))):
        state = model.state_dict()
        assert new_names(state), 'the installed transformers must have the 5.x names (setup.cfg pins >= 5)'
        other = rename(state, rules[0])
        folder = tmp_path / type(model).__name__
        folder.mkdir()
        model.config.save_pretrained(folder)
        save_safetensors(other, folder / 'model.safetensors')
        back = type(model).from_pretrained(folder).state_dict()
        assert set(back) == set(state)
        for k, v in state.items():
            assert torch.equal(back[k], v), k


@needs_hf
def test_hf_classification_wrapper_prefix_and_heads_dropped(hf_vit, tmp_path):
    state = {'vit.' + k: v for k, v in hf_vit.state_dict().items()}
    state['classifier.weight'], state['classifier.bias'] = torch.zeros(5, 32), torch.zeros(5)
    torch.save({'state_dict': state}, tmp_path / 'cls.bin')
    conv = cv.convert_to_timm(state)
    assert not any(k.startswith(('classifier', 'pooler', 'vit.')) for k in conv)
    vit = tiny_vit(norm_eps=1e-12)
    cv.load_pretrained_backbone(vit, str(tmp_path / 'cls.bin'))
    x = images(32)
    with torch.no_grad():
        want = hf_vit(pixel_values=x).last_hidden_state
    assert (features(vit, x) - want).abs().max().item() < TOL


@needs_hf
def test_dinov2_swiglu_is_refused_clearly():
    state = hf_dinov2_model(use_swiglu_ffn=True).state_dict()
    with pytest.raises(ValueError, match='SwiGLU'):
        cv.convert_to_timm(state)


@needs_hf
def test_suggested_config_for_hf_families(hf_vit, hf_dinov2, tmp_path):
    cfg = cv.suggested_backbone_config(hf_dinov2.state_dict())
    assert cfg == {**cfg, 'embed_dim': 32, 'depth': 2, 'patch_size': 7, 'img_size': 28, 'init_values': 1.0,
                   'norm_eps': 1e-6, 'qkv_bias': True, 'mlp_ratio': 4.0, 'num_heads': None}
    cfg = cv.suggested_backbone_config(save_safetensors(hf_vit.state_dict(), tmp_path / 'v.safetensors'))
    assert cfg['norm_eps'] == 1e-12 and cfg['init_values'] is None and cfg['patch_size'] == 8
    vit = tiny_vit(**{k: v for k, v in cfg.items() if v is not None})
    cv.load_pretrained_backbone(vit, str(tmp_path / 'v.safetensors'))


# ---------------------------------------------------------------------------------------------------------------
# Google npz (written here by the inverse mapping)
# ---------------------------------------------------------------------------------------------------------------
def to_google_npz(vit, path, prefix=''):
    s = {k: v.detach().numpy().astype(np.float32) for k, v in vit.state_dict().items()}
    C, H = vit.embed_dim, vit.num_heads
    d = C // H
    out = {'embedding/kernel': s['patch_embed.proj.weight'].transpose(2, 3, 1, 0),  # OIHW -> HWIO
           'embedding/bias': s['patch_embed.proj.bias'], 'cls': s['cls_token'],
           'Transformer/posembed_input/pos_embedding': s['pos_embed'],
           'Transformer/encoder_norm/scale': s['norm.weight'], 'Transformer/encoder_norm/bias': s['norm.bias'],
           'head/kernel': np.zeros((C, 7), np.float32), 'head/bias': np.zeros(7, np.float32),
           'pre_logits/kernel': np.zeros((C, C), np.float32), 'pre_logits/bias': np.zeros(C, np.float32)}
    for i in range(vit.depth):
        b, p = f'Transformer/encoderblock_{i}/', f'blocks.{i}.'
        out[b + 'LayerNorm_0/scale'], out[b + 'LayerNorm_0/bias'] = s[p + 'norm1.weight'], s[p + 'norm1.bias']
        out[b + 'LayerNorm_2/scale'], out[b + 'LayerNorm_2/bias'] = s[p + 'norm2.weight'], s[p + 'norm2.bias']
        w, bias = s[p + 'attn.qkv.weight'], s[p + 'attn.qkv.bias']
        for j, n in enumerate(('query', 'key', 'value')):
            m = b + f'MultiHeadDotProductAttention_1/{n}/'
            out[m + 'kernel'] = w[j * C:(j + 1) * C].T.reshape(C, H, d)  # (D, H, d)
            out[m + 'bias'] = bias[j * C:(j + 1) * C].reshape(H, d)
        out[b + 'MultiHeadDotProductAttention_1/out/kernel'] = s[p + 'attn.proj.weight'].T.reshape(H, d, C)
        out[b + 'MultiHeadDotProductAttention_1/out/bias'] = s[p + 'attn.proj.bias']
        for r in (0, 1):
            out[b + f'MlpBlock_3/Dense_{r}/kernel'] = s[p + f'mlp.fc{r + 1}.weight'].T
            out[b + f'MlpBlock_3/Dense_{r}/bias'] = s[p + f'mlp.fc{r + 1}.bias']
    np.savez(path, **{prefix + k: np.ascontiguousarray(v) for k, v in out.items()})
    return str(path)


@pytest.mark.parametrize('prefix', ['', 'opt/target/'])
def test_google_npz_roundtrip(tmp_path, prefix):
    src = randomize_(tiny_vit(), seed=3)
    path = to_google_npz(src, tmp_path / 'ViT-T_8.npz', prefix)
    assert cv.detect_layout(cv.read_state_dict(path)) == 'google_npz'
    vit = tiny_vit()
    assert cv.load_pretrained_backbone(vit, path)['layout'] == 'google_npz'
    x = images(32)
    assert (features(vit, x) - features(src, x)).abs().max().item() < TOL
    cfg = cv.suggested_backbone_config(path)
    assert cfg['num_heads'] == 4 and cfg['embed_dim'] == 32 and cfg['depth'] == 2 and cfg['img_size'] == 32


def test_google_npz_wrong_num_heads_named(tmp_path):
    path = to_google_npz(randomize_(tiny_vit()), tmp_path / 'g.npz')
    with pytest.raises(ValueError, match=r'4 attention heads.*num_heads=2'):
        cv.load_pretrained_backbone(tiny_vit(num_heads=2), path)


# ---------------------------------------------------------------------------------------------------------------
# timm / hub layouts, containers, pos_embed resampling
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('fmt', ['safetensors', 'pth-state_dict', 'bin-module-prefix', 'pt-model', 'npz'])
def test_timm_roundtrip(tmp_path, fmt):
    src = randomize_(tiny_vit(init_values=0.5), seed=5)
    sd = src.state_dict()
    if fmt == 'safetensors':
        path = save_safetensors(sd, tmp_path / 'w.safetensors')
    elif fmt == 'pth-state_dict':
        path = str(tmp_path / 'w.pth')
        torch.save({'state_dict': sd, 'epoch': 3, 'arch': 'vit_tiny'}, path)
    elif fmt == 'bin-module-prefix':
        path = str(tmp_path / 'w.bin')
        torch.save({'module.' + k: v for k, v in sd.items()}, path)
    elif fmt == 'pt-model':
        path = str(tmp_path / 'w.pt')
        torch.save({'model': {'backbone.' + k: v for k, v in sd.items()}, 'optimizer': {}}, path)
    else:
        path = str(tmp_path / 'w.npz')
        np.savez(path, **{k: v.numpy() for k, v in sd.items()})
    state = cv.read_state_dict(path)
    assert cv.detect_layout(state) == 'timm'
    vit = tiny_vit(init_values=1e-5)
    assert cv.load_pretrained_backbone(vit, path)['layout'] == 'timm'
    x = images(32)
    assert torch.allclose(features(vit, x), features(src, x), atol=1e-6)


def test_timm_head_and_mask_token_dropped(tmp_path):
    src = randomize_(tiny_vit(num_classes=10))
    sd = dict(src.state_dict())
    sd['mask_token'] = torch.zeros(1, 32)
    path = save_safetensors(sd, tmp_path / 'w.safetensors')
    conv = cv.convert_to_timm(cv.read_state_dict(path))
    assert 'head.weight' not in conv and 'mask_token' not in conv
    vit = tiny_vit()
    cv.load_pretrained_backbone(vit, path)
    x = images(32)
    assert torch.allclose(features(vit, x), features(src, x), atol=1e-6)


def with_tuners(vit, entries):
    specs = parse_tuners(entries, dims_of(vit))
    attach_block_tuners(vit, specs)
    return vit


def test_hub_layout_backbone_loads_and_tuners_start_fresh(tmp_path):
    entries = [{'type': 'adapter', 'op': 'ffn', 'form': 'sequential', 'dim': 4},
               {'type': 'prefix', 'op': 'mha', 'form': 'sequential', 'length': 3}]
    src = randomize_(with_tuners(tiny_vit(), entries), seed=7)
    path = str(tmp_path / 'pytorch_model.pt')
    state = {f'backbone.{k}': v for k, v in src.state_dict().items()}
    state.update({'head.fc.weight': torch.zeros(3, 32), 'head.fc.bias': torch.zeros(3)})
    forms = {f'blocks.{b.index}.{n}': t.form for b in src.blocks for n, t in b.tuners()}
    write_checkpoint(path, state, forms, ['a', 'b', 'c'])
    raw = torch.load(path, weights_only=True)
    assert any('adapter.ln1' in k for k in raw['backbone_weight'])  # the built-in's names on disk
    assert cv.detect_layout(raw['backbone_weight']) == 'hub'
    vit = with_tuners(tiny_vit(), entries)
    fresh = {k: v.clone() for k, v in vit.state_dict().items() if 'adapter' in k or 'prefix' in k}
    assert cv.load_pretrained_backbone(vit, path)['layout'] == 'hub'
    for k, v in vit.state_dict().items():
        if k in fresh:
            assert torch.equal(v, fresh[k]), k  # tuners start fresh
        else:
            assert torch.equal(v, src.state_dict()[k]), k


def test_pos_embed_resampled_to_model_grid(tmp_path):
    src = randomize_(tiny_vit())  # grid 4x4
    path = save_safetensors(src.state_dict(), tmp_path / 'w.safetensors')
    vit = tiny_vit(img_size=16)  # grid 2x2
    info = cv.load_pretrained_backbone(vit, path)
    assert info['pos_embed'] == ((1, 17, 32), (1, 5, 32))
    assert vit.pos_embed.shape == (1, 5, 32)
    assert torch.equal(vit.pos_embed[:, 0], src.pos_embed[:, 0])  # class position kept
    out = features(vit, images(16))
    assert out.shape == (2, 5, 32) and torch.isfinite(out).all()


def test_model_config_pretrained_weights(tmp_path):
    from modelscope_utuning.model import VisionEfficientTuningModel
    src = randomize_(tiny_vit())
    path = save_safetensors(src.state_dict(), tmp_path / 'w.safetensors')
    model = VisionEfficientTuningModel(
        model_dir=None, head={'num_classes': 3},
        backbone=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, pretrained_weights=path,
                      tuners=[{'type': 'adapter', 'op': 'mha', 'dim': 4}]))
    for k, v in src.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------
def test_missing_file_named(tmp_path):
    path = str(tmp_path / 'nope.safetensors')
    with pytest.raises(ValueError, match='nope.safetensors.*does not exist'):
        cv.load_pretrained_backbone(tiny_vit(), path)
    with pytest.raises(FileNotFoundError):
        cv.read_state_dict(path)


def test_unknown_extension_and_unreadable_files(tmp_path):
    p = tmp_path / 'w.txt'
    p.write_text('hello')
    with pytest.raises(ValueError, match=r"w\.txt.*unknown extension '\.txt'"):
        cv.read_state_dict(str(p))
    p = tmp_path / 'w.safetensors'
    p.write_bytes(b'not a safetensors file')
    with pytest.raises(ValueError, match=r'w\.safetensors.*could not be read'):
        cv.read_state_dict(str(p))
    p = tmp_path / 'w.pth'
    torch.save({'state_dict': {'a': torch.zeros(1)}, 'obj': Opaque()}, str(p))  # needs unpickling code
    with pytest.raises(ValueError, match=r'w\.pth.*weights_only'):
        cv.read_state_dict(str(p))
    p = tmp_path / 'o.npz'
    np.savez(p, a=np.array([object()], dtype=object))
    with pytest.raises(ValueError, match=r'o\.npz.*could not be read'):
        cv.read_state_dict(str(p))


class Opaque:
    pass


def test_unknown_layout_lists_keys(tmp_path):
    path = save_safetensors({'encoder.conv1.weight': torch.zeros(2), 'decoder.fc.bias': torch.zeros(2)},
                            tmp_path / 'w.safetensors')
    with pytest.raises(ValueError, match=r"unknown checkpoint layout.*'decoder\.fc\.bias'"):
        cv.load_pretrained_backbone(tiny_vit(), path)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    path = save_safetensors(randomize_(tiny_vit()).state_dict(), tmp_path / 'w.safetensors')
    with pytest.raises(ValueError) as e:
        cv.load_pretrained_backbone(tiny_vit(mlp_ratio=2.0), path)
    msg = str(e.value)
    assert 'blocks.0.mlp.fc1.weight: checkpoint (128, 32) vs model (64, 32)' in msg
    assert 'mlp_ratio=4' in msg and 'w.safetensors' in msg


def test_missing_and_unexpected_reported_together(tmp_path):
    sd = dict(randomize_(tiny_vit()).state_dict())
    del sd['norm.weight']
    sd['blocks.0.attn.rel_pos'] = torch.zeros(3)
    path = save_safetensors(sd, tmp_path / 'w.safetensors')
    with pytest.raises(ValueError) as e:
        cv.load_pretrained_backbone(tiny_vit(), path)
    msg = str(e.value)
    assert "missing weights: ['norm.weight']" in msg and "unexpected weights: ['blocks.0.attn.rel_pos']" in msg


@pytest.mark.parametrize('kw, expected', [
    (dict(patch_size=4), 'checkpoint has 8x8 patches, the model patch_size=4; set model.backbone.patch_size=8'),
    (dict(embed_dim=64), 'checkpoint has embed_dim 32, the model embed_dim=64'),
    (dict(depth=3), 'checkpoint has 2 blocks, the model depth=3'),
    (dict(init_values=1.0), 'init_values=null'),
    (dict(global_pool='avg'), 'fc_norm=false'),
])
def test_architecture_mismatch_says_what_to_set(tmp_path, kw, expected):
    path = save_safetensors(randomize_(tiny_vit()).state_dict(), tmp_path / 'w.safetensors')
    with pytest.raises(ValueError, match=re.escape(expected)):
        cv.load_pretrained_backbone(tiny_vit(**kw), path)


@needs_hf
def test_hf_dinov2_into_model_without_layer_scale(hf_dinov2, tmp_path):
    path = save_safetensors(hf_dinov2.state_dict(), tmp_path / 'd.safetensors')
    with pytest.raises(ValueError, match=r'init_values=1\.0') as e:
        cv.load_pretrained_backbone(tiny_vit(img_size=28, patch_size=7), path)
    assert 'hf_dinov2' in str(e.value)
