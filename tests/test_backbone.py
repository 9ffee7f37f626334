"""The timm-named ViT backbone (issue 2): shapes, options, layer scale, drop path, pos-embed resampling, prompts."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from modelscope_utuning.backbone import VisionTransformer, resample_abs_pos_embed
from modelscope_utuning.backbone.vit import QuickGELU
from modelscope_utuning.backbone_config import split_backbone_config
from modelscope_utuning.tuners import attach_block_tuners, dims_of, parse_tuners

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
C, GRID = 32, 4
N = GRID * GRID


def build_backbone(vit_kwargs, entries):
    """A VisionTransformer with the block-level tuners of ``entries`` attached -> (vit, parsed specs)."""
    vit = VisionTransformer(**vit_kwargs)
    specs = parse_tuners(entries, dims_of(vit))
    attach_block_tuners(vit, specs)
    return vit, specs


pytestmark = pytest.mark.usefixtures('one_thread')


def imgs(b=2, size=32, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def vit(**kw):
    torch.manual_seed(0)
    return VisionTransformer(**dict(TINY, **kw)).eval()


def copy_weights(dst: nn.Module, src: nn.Module) -> nn.Module:
    own = dst.state_dict()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in own}, strict=False)
    return dst


def test_timm_parameter_names():
    names = set(vit(init_values=0.1).state_dict())
    expected = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight',
                'norm.bias'}
    for i in range(2):
        for sub in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2'):
            expected |= {f'blocks.{i}.{sub}.weight', f'blocks.{i}.{sub}.bias'}
        expected |= {f'blocks.{i}.ls1.gamma', f'blocks.{i}.ls2.gamma'}
    assert names == expected


@pytest.mark.parametrize('pool', ['token', 'avg'])
def test_shapes_token_and_avg_pool(pool):
    m = vit(global_pool=pool)
    with torch.no_grad():
        feats = m.forward_features(imgs())
        pooled = m.forward_head(feats)
        assert feats.shape == (2, N + 1, C)
        assert pooled.shape == (2, C)
        # forward() finishes only the rows pooling reads: same numbers up to float summation order
        torch.testing.assert_close(m(imgs()), pooled, rtol=0, atol=1e-5)
        if pool == 'token':
            assert isinstance(m.norm, nn.LayerNorm) and isinstance(m.fc_norm, nn.Identity)
            torch.testing.assert_close(pooled, feats[:, 0])
        else:  # avg: fc_norm by default, final norm skipped, class token excluded from the mean
            assert isinstance(m.norm, nn.Identity) and isinstance(m.fc_norm, nn.LayerNorm)
            torch.testing.assert_close(pooled, m.fc_norm(feats[:, 1:].mean(1)))
    assert m.out_dim == C


def test_no_class_token():
    m = vit(class_token=False, global_pool='avg')
    assert m.cls_token is None and m.pos_embed.shape == (1, N, C)
    with torch.no_grad():
        feats = m.forward_features(imgs())
        assert feats.shape == (2, N, C)
        torch.testing.assert_close(m.forward_head(feats), m.fc_norm(feats.mean(1)))
    with pytest.raises(ValueError, match='class_token'):
        VisionTransformer(**dict(TINY, class_token=False, global_pool='token'))


def test_fc_norm_override():
    m = vit(global_pool='token', fc_norm=True)
    assert isinstance(m.fc_norm, nn.LayerNorm) and isinstance(m.norm, nn.Identity)
    with torch.no_grad():
        feats = m.forward_features(imgs())
        torch.testing.assert_close(m.forward_head(feats), m.fc_norm(feats[:, 0]))
    m = vit(global_pool='avg', fc_norm=False)
    assert isinstance(m.fc_norm, nn.Identity) and isinstance(m.norm, nn.LayerNorm)


def test_pre_norm_clip_style():
    m = vit(pre_norm=True)
    assert isinstance(m.norm_pre, nn.LayerNorm) and m.patch_embed.proj.bias is None
    plain = vit()
    assert isinstance(plain.norm_pre, nn.Identity) and plain.patch_embed.proj.bias is not None
    store = {}
    m.blocks[0].register_forward_pre_hook(lambda mod, args: store.setdefault('x', args[0]))
    with torch.no_grad():
        m(imgs())
        x = m.patch_embed(imgs())
        x = torch.cat((m.cls_token.expand(2, -1, -1), x), 1) + m.pos_embed
        torch.testing.assert_close(store['x'], m.norm_pre(x))


def test_quick_gelu():
    m = vit(act='quick_gelu')
    assert isinstance(m.blocks[0].mlp.act, QuickGELU)
    z = torch.linspace(-4, 4, 50)
    torch.testing.assert_close(m.blocks[0].mlp.act(z), z * torch.sigmoid(1.702 * z))
    g = copy_weights(vit(), m)
    with torch.no_grad():
        assert not torch.allclose(m(imgs()), g(imgs()))
    with pytest.raises(ValueError, match='act='):
        vit(act='swish42')


def test_init_values_layer_scale():
    m = vit(init_values=0.1)
    for b in m.blocks:
        assert torch.equal(b.ls1.gamma, torch.full((C,), 0.1)) and torch.equal(b.ls2.gamma, torch.full((C,), 0.1))
    plain = copy_weights(vit(), m)
    with torch.no_grad():
        assert not torch.allclose(m(imgs()), plain(imgs()))
        for b in m.blocks:
            b.ls1.gamma.fill_(1.0)
            b.ls2.gamma.fill_(1.0)
        torch.testing.assert_close(m(imgs()), plain(imgs()), atol=1e-6, rtol=0)
        # gamma scales the residual branch: gamma = 0 makes every block the identity
        for b in m.blocks:
            b.ls1.gamma.zero_()
            b.ls2.gamma.zero_()
        x = torch.randn(2, N + 1, C)
        torch.testing.assert_close(m.blocks[0](x), x)


def test_drop_path_train_vs_eval():
    m = vit(drop_path_rate=0.5, depth=3)
    assert m.blocks[0].drop_path1.__class__.__name__ == 'Identity'  # linspace(0, p, depth): first is 0
    assert m.blocks[2].drop_path1.p == 0.5
    plain = copy_weights(vit(depth=3), m)
    x = imgs(8)
    with torch.no_grad():
        m.eval()
        a, b = m(x), m(x)
        assert torch.equal(a, b)
        assert torch.equal(a, plain(x))  # eval: no stochastic depth at all
        m.train()
        torch.manual_seed(1)
        t1 = m(x)
        torch.manual_seed(2)
        t2 = m(x)
        assert not torch.allclose(t1, t2)
        assert not torch.allclose(t1, a)


def test_pos_embed_resampling():
    small = vit()                          # grid 4x4
    big = vit(img_size=48)                 # grid 6x6
    with torch.no_grad():
        big.pos_embed.normal_()
    resampled = small.load_pos_embed(big.pos_embed.detach())
    assert resampled.shape == small.pos_embed.shape == (1, 1 + N, C)
    assert torch.equal(resampled[:, 0], big.pos_embed[:, 0])          # the class token's embedding is kept
    assert small.load_pos_embed(small.pos_embed.detach()) is not None
    assert torch.equal(small.load_pos_embed(small.pos_embed.detach()), small.pos_embed.detach())
    # load into the model: state dict with a resampled pos_embed loads strictly and the model runs
    sd = dict(big.state_dict())
    sd['pos_embed'] = small.load_pos_embed(sd['pos_embed'])
    small.load_state_dict(sd)
    with torch.no_grad():
        assert small(imgs()).shape == (2, C)
    # a constant grid stays (nearly) constant, a smooth ramp stays monotone
    const = torch.cat((torch.zeros(1, 1, 3), torch.ones(1, 36, 3)), 1)
    torch.testing.assert_close(resample_abs_pos_embed(const, (4, 4))[:, 1:], torch.ones(1, 16, 3),
                               atol=1e-5, rtol=0)
    ramp = torch.arange(36.).view(1, 6, 6).expand(3, 6, 6).reshape(3, 36).T.reshape(1, 36, 3)
    up = resample_abs_pos_embed(torch.cat((torch.zeros(1, 1, 3), ramp), 1), (8, 8))
    assert up.shape == (1, 65, 3)
    row = up[0, 1:9, 0]
    assert (row[1:] >= row[:-1] - 1e-4).all()
    with pytest.raises(ValueError, match='square'):
        resample_abs_pos_embed(torch.zeros(1, 1 + 15, C), (4, 4))


def test_pos_embed_no_class_token_resampling():
    small, big = vit(class_token=False, global_pool='avg'), vit(class_token=False, global_pool='avg', img_size=48)
    assert small.load_pos_embed(big.pos_embed.detach()).shape == (1, N, C)


def test_sequential_prompt_grows_sequence():
    L = 3
    vkw, entries, _ = split_backbone_config(dict(TINY, tuners=[
        {'type': 'prompt', 'op': 'block', 'form': 'sequential', 'length': L}]))
    m, _ = build_backbone(vkw, entries)
    m.eval()
    seen = []
    for b in m.blocks:
        b.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        feats = m.forward_features(imgs())
        pooled = m(imgs())
    assert feats.shape == (2, 1 + N + L, C)
    assert seen[:2] == [1 + N + L, 1 + N + L]   # prompts of layer 0 are replaced by those of layer 1
    assert pooled.shape == (2, C)
    # the last layer's own prompt tokens sit at the end of the sequence given to it
    store = {}
    m.blocks[1].register_forward_pre_hook(lambda mod, args: store.setdefault('x', args[0]))
    with torch.no_grad():
        m.forward_features(imgs())
    assert torch.equal(store['x'][:, -L:], m.blocks[1].block_prompt.tokens.expand(2, -1, -1))


def test_sequential_prompt_only_on_later_layer_and_per_layer_lengths():
    vkw, entries, _ = split_backbone_config(dict(TINY, tuners=[
        {'type': 'prompt', 'op': 'block', 'form': 'sequential', 'length': 2, 'layers': [1]}]))
    m, _ = build_backbone(vkw, entries)
    seen = []
    for b in m.blocks:
        b.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        assert m.forward_features(imgs()).shape == (2, 1 + N + 2, C)
    assert seen == [1 + N, 1 + N + 2]
    vkw, entries, _ = split_backbone_config(dict(TINY, prompt_length=[2, 5]))
    m, _ = build_backbone(vkw, entries)
    with torch.no_grad():
        assert m.forward_features(imgs()).shape == (2, 1 + N + 5, C)


def test_bad_image_size_message():
    m = vit()
    with pytest.raises(ValueError) as err:
        m(torch.zeros(2, 3, 48, 48))
    assert '(B, 3, 32, 32)' in str(err.value) and '(2, 3, 48, 48)' in str(err.value)
    with pytest.raises(ValueError, match=r'\(B, 3, 32, 32\)'):
        m(torch.zeros(3, 32, 32))


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match='divisible'):
        VisionTransformer(**dict(TINY, num_heads=5))
    with pytest.raises(ValueError, match='global_pool'):
        VisionTransformer(**dict(TINY, global_pool='max'))
    with pytest.raises(ValueError, match='unknown key'):
        split_backbone_config(dict(TINY, embed_dims=32))


def test_legacy_backbone_head_and_config_keys():
    vkw, entries, extras = split_backbone_config(dict(TINY, type='VitB16_Adapter', weight_init='', num_classes=7,
                                                      adapter_length=4, adapter_type=None))
    assert 'type' not in vkw and entries == [{'type': 'adapter', 'op': 'ffn', 'form': 'sequential', 'dim': 4}]
    m, specs = build_backbone(vkw, entries)
    assert m.out_dim == 7 and isinstance(m.head, nn.Linear)
    with torch.no_grad():
        assert m(imgs()).shape == (2, 7)


def test_attention_matches_explicit_softmax():
    m = vit()
    blk = m.blocks[0]
    attn = blk.attn
    h = torch.randn(2, N + 1, C)
    with torch.no_grad():
        out, q = blk.attention(h)
        qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).view(2, N + 1, 3, 4, 8).permute(2, 0, 3, 1, 4)
        a = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / 8 ** 0.5, -1) @ qkv[2]
        want = F.linear(a.transpose(1, 2).reshape(2, N + 1, C), attn.proj.weight, attn.proj.bias)
        torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
        # queries for the first 3 tokens only, every token still a key / value
        out3, q3 = blk.attention(h, 3)
        torch.testing.assert_close(out3, want[:, :3], atol=1e-6, rtol=0)
        torch.testing.assert_close(q3, qkv[0][:, :, :3])
        torch.testing.assert_close(q, qkv[0])
        torch.testing.assert_close(attn.project(h, 'k'), qkv[1])
        torch.testing.assert_close(attn.project(h, 'v'), qkv[2])
        torch.testing.assert_close(attn(h), want, atol=1e-6, rtol=0)  # the plain module
    # the MLP with the default GELU
    mlp = m.blocks[0].mlp
    with torch.no_grad():
        torch.testing.assert_close(mlp(h), mlp.fc2(F.gelu(mlp.fc1(h))))
