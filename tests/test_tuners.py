"""Acceptance tests of the U-Tuners (issue 2): the (tuner, op, form, scale) matrix, trainable-parameter
formulas, zero-output identity of parallel tuners, spec validation and the paper's prefix decomposition."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modelscope_utuning import VisionEfficientTuningModel
from modelscope_utuning.backbone.vit import VisionTransformer
from modelscope_utuning.tuners import Dims, parse_tuners
from modelscope_utuning.tuners.spec import parse_tuner

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=4.0, num_classes=0)
C, D, H, F_MLP = 32, 2, 4, 128
DIMS = Dims(C, H, F_MLP, D)


def tuner_at(block, op, kind):
    """The tuner of ``kind`` attached to ``op`` of ``block`` (``{op}_{kind}``), or None."""
    return getattr(block, f'{op}_{kind}', None)
N_TOKENS = (32 // 8) ** 2 + 1
K = 3  # classes
HEAD_PARAMS = C * K + K
SCALES = ('none', 'scalar', 'channel', 'input')
SCALE_PARAMS = {'none': 0, 'scalar': 1, 'channel': C, 'input': C + 1}
SIZE = 4


pytestmark = pytest.mark.usefixtures('one_thread')

PARALLEL = [('adapter', op) for op in ('mha', 'ffn', 'block')] + \
           [('prefix', op) for op in ('mha', 'ffn', 'block')] + \
           [('prompt', op) for op in ('mha', 'ffn', 'block')]
SEQUENTIAL = [('adapter', 'mha'), ('adapter', 'ffn'), ('adapter', 'block'), ('prefix', 'mha'), ('prompt', 'block')]


def _entry(kind, op=None, form=None, scale=None, size=SIZE, **extra):
    e = {'type': kind}
    if op is not None:
        e['op'] = op
    if form is not None:
        e['form'] = form
    if kind in ('adapter',):
        e['dim'] = size
    elif kind in ('prefix', 'prompt'):
        e['length'] = size
    elif kind == 'lora':
        e['rank'] = size
    if scale is not None:
        e['scale'] = scale
    e.update(extra)
    return e


MATRIX = ([pytest.param(_entry(t, op, 'parallel', s), id=f'{t}-{op}-parallel-{s}')
           for t, op in PARALLEL for s in SCALES]
          + [pytest.param(_entry(t, op, 'sequential'), id=f'{t}-{op}-sequential') for t, op in SEQUENTIAL]
          + [pytest.param(_entry('lora', op), id=f'lora-{op}') for op in ('mha', 'ffn')]
          + [pytest.param({'type': 'bitfit'}, id='bitfit'), pytest.param({'type': 'side'}, id='side')])


def closed_form(entry) -> int:
    """Independent closed form of the trainable parameters an entry adds on a depth-2, C=32 ViT (all layers)."""
    kind, form = entry['type'], entry.get('form', 'parallel')
    s = SCALE_PARAMS[entry.get('scale', 'channel')] if form == 'parallel' else 0
    r = SIZE
    if kind == 'adapter':
        per_layer = 2 * C * r + r + C + s              # W_down, b_down, W_up, b_up, scale
    elif kind == 'prefix':
        per_layer = 2 * r * C + s                      # K_pre, V_pre
    elif kind == 'prompt':
        per_layer = r * C + s                          # prompt tokens
    elif kind == 'lora':
        per_layer = (r * C + r * 3 * C) if entry['op'] == 'mha' else (r * C + r * F_MLP) * 2
    elif kind == 'bitfit':
        # patch_embed.proj.bias + norm.bias + per block: norm1, qkv (3C), proj, norm2, fc1 (F), fc2
        return C + C + D * (C + 3 * C + C + C + F_MLP + C)
    elif kind == 'side':
        convs = 9 * (3 * 16 + 16 * 16 + 16 * 32 + 32 * 64)
        groupnorms = 2 * (16 + 16 + 32 + 64)
        return convs + groupnorms + (64 * C + C) + 1     # + fc + alpha
    return D * per_layer


def build(tuners, **vit_overrides):
    return VisionEfficientTuningModel(model_dir=None, backbone=dict(VIT, tuners=tuners, **vit_overrides),
                                      head={'num_classes': K})


def expected_trainable_names(model, entry) -> set:
    """Trainable names derived from the module naming scheme, independently of the model's freeze policy."""
    names = {f'head.{n}' for n, _ in model.head.named_parameters()}
    for n, _ in model.backbone.named_parameters():
        kind = entry['type']
        if kind == 'side' and n.startswith('side.'):
            names.add(f'backbone.{n}')
        elif kind == 'bitfit' and n.endswith('.bias'):
            names.add(f'backbone.{n}')
        elif kind not in ('side', 'bitfit') and f".{entry.get('op', _default_op(kind))}_{kind}." in f'.{n}':
            names.add(f'backbone.{n}')
    return names


def _default_op(kind):
    return {'adapter': 'ffn', 'prefix': 'mha', 'prompt': 'block', 'lora': 'mha'}[kind]


def images(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g)


def randomize_trainable_(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def plain_copy(vit: VisionTransformer, **vit_overrides) -> VisionTransformer:
    """The same frozen backbone without any tuner (weights copied)."""
    kwargs = dict(VIT, **vit_overrides)
    plain = VisionTransformer(**kwargs)
    own = plain.state_dict()
    missing, unexpected = plain.load_state_dict({k: v for k, v in vit.state_dict().items() if k in own},
                                                strict=False)
    assert not missing
    return plain.requires_grad_(False).eval()  # frozen like the tuned model's backbone: the same kernels run


def _zero_output_variants(kind, scale):
    """(description, function zeroing the tuner output) for a parallel tuner."""
    def zero_scale(m):
        if m.scale.kind == 'input':
            m.scale.gate.weight.zero_()
            m.scale.gate.bias.zero_()
        else:
            m.scale.weight.zero_()

    def zero_projection(m):
        if kind == 'adapter':
            m.up.weight.zero_()
            m.up.bias.zero_()
        elif kind == 'prefix':
            m.value.zero_()
        else:  # prompt: zero tokens give V = b_v, so only a bias-free backbone has a zero branch
            m.tokens.zero_()

    variants = [('projection', zero_projection)]
    if scale != 'none':
        variants.append(('scale', zero_scale))
    return variants


@pytest.mark.parametrize('kind,op', PARALLEL)
@pytest.mark.parametrize('scale', SCALES)
def test_parallel_tuner_with_zero_output_leaves_backbone_unchanged(kind, op, scale):
    for what, zero in _zero_output_variants(kind, scale):
        # the prompt branch projects zero tokens to the frozen k/v biases: use a bias-free qkv there
        overrides = {'qkv_bias': False} if (kind == 'prompt' and what == 'projection') else {}
        torch.manual_seed(0)
        model = build([_entry(kind, op, 'parallel', scale)], **overrides)
        randomize_trainable_(model)  # everything (incl. the other part of the branch) non-trivial
        vit = model.backbone.eval()
        tuner_modules = [getattr(b, f'{op}_{kind}') for b in vit.blocks]
        x = images(3)
        plain = plain_copy(vit, **overrides)
        with torch.no_grad():
            changed = vit.forward_features(x)
            assert not torch.equal(changed, plain.forward_features(x)), 'the randomised tuner should matter'
            for m in tuner_modules:
                zero(m)
            assert torch.equal(vit.forward_features(x), plain.forward_features(x)), what
            assert torch.equal(vit(x), plain(x)), what


def test_lora_with_zero_b_leaves_backbone_unchanged():
    for op in ('mha', 'ffn'):
        model = build([_entry('lora', op)])
        randomize_trainable_(model)
        vit = model.backbone.eval()
        x = images()
        plain = plain_copy(vit)
        with torch.no_grad():
            assert not torch.equal(vit(x), plain(x))
            for b in vit.blocks:
                lora = getattr(b, f'{op}_lora')
                for name in ('lora_b', 'fc1_b', 'fc2_b'):
                    if hasattr(lora, name):
                        getattr(lora, name).weight.zero_()
            assert torch.equal(vit(x), plain(x))


# -- combinations, layer selection -------------------------------------------------------------------------------
def test_several_tuners_at_once():
    entries = [
        {'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 10},
        {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 10},
        {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 10, 'scale': 'channel', 'layers': 'all'},
        {'type': 'prefix', 'op': 'mha', 'form': 'sequential', 'length': 3},
        {'type': 'prompt', 'op': 'block', 'form': 'sequential', 'length': 2},
        {'type': 'prompt', 'op': 'ffn', 'form': 'parallel', 'length': 2, 'scale': 'input'},
        {'type': 'lora', 'op': 'mha', 'rank': 2},
        {'type': 'lora', 'op': 'ffn', 'rank': 2, 'alpha': 4},
        {'type': 'adapter', 'op': 'block', 'form': 'sequential', 'dim': 3},
        {'type': 'bitfit'},
        {'type': 'side'},
    ]
    model = build(entries)
    randomize_trainable_(model)
    specs = parse_tuners(entries, DIMS)
    n_trainable, _ = model.trainable_parameters()
    assert n_trainable == sum(s.kind.count_trainable(s, model.backbone) for s in specs) + HEAD_PARAMS
    model.train()
    model({'imgs': images(), 'labels': torch.tensor([1, 2])})['loss'].backward()
    for n, p in model.model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    model.eval()
    with torch.no_grad():
        feats = model.backbone.forward_features(images())
        out = model({'imgs': images()})
    assert feats.shape == (2, N_TOKENS + 2, C)
    assert torch.allclose(out['scores'].sum(1), torch.ones(2))


@pytest.mark.parametrize('layers,present', [([1], [False, True]), (0, [True, False]), (-1, [False, True]),
                                            ('all', [True, True]), ([0, 1], [True, True])])
def test_layers_selection(layers, present):
    entry = _entry('adapter', 'ffn', 'parallel', layers=layers)
    model = build([entry])
    assert [tuner_at(b, 'ffn', 'adapter') is not None for b in model.backbone.blocks] == present
    per_layer = 2 * C * SIZE + SIZE + C + C
    assert model.trainable_parameters()[0] == sum(present) * per_layer + HEAD_PARAMS
    spec = parse_tuner(entry, DIMS)
    assert spec.kind.count_trainable(spec, model.backbone) == sum(present) * per_layer


@pytest.mark.parametrize('kind,key,op,form', [('adapter', 'dim', 'mha', 'parallel'),
                                              ('prefix', 'length', 'block', 'parallel'),
                                              ('prompt', 'length', 'block', 'sequential'),
                                              ('lora', 'rank', 'ffn', None)])
def test_per_layer_size_lists(kind, key, op, form):
    entry = {'type': kind, 'op': op, key: [0, 5]}
    if form:
        entry['form'] = form
    model = build([entry])
    blocks = model.backbone.blocks
    assert tuner_at(blocks[0], op, kind) is None and tuner_at(blocks[1], op, kind) is not None
    spec = parse_tuner(entry, DIMS)
    assert spec.sizes == (0, 5)
    assert model.trainable_parameters()[0] == spec.kind.count_trainable(spec, model.backbone) + HEAD_PARAMS
    model.eval()
    with torch.no_grad():
        assert model({'imgs': images()})['scores'].shape == (2, K)


def test_per_layer_sizes_differ():
    model = build([{'type': 'adapter', 'op': 'ffn', 'dim': [3, 7]}])
    assert [b.ffn_adapter.down.out_features for b in model.backbone.blocks] == [3, 7]
    assert model.trainable_parameters()[0] == (2 * C * 3 + 3 + 2 * C) + (2 * C * 7 + 7 + 2 * C) + HEAD_PARAMS


def test_layers_and_different_ops_of_same_type_coexist():
    model = build([{'type': 'adapter', 'op': 'ffn', 'dim': 4, 'layers': [0]},
                   {'type': 'adapter', 'op': 'ffn', 'dim': 6, 'layers': [1]},
                   {'type': 'adapter', 'op': 'mha', 'dim': 4, 'layers': [0]}])
    b0, b1 = model.backbone.blocks
    assert b0.ffn_adapter.down.out_features == 4 and b1.ffn_adapter.down.out_features == 6
    assert b0.mha_adapter is not None and tuner_at(b1, 'mha', 'adapter') is None


def test_legacy_keys_mean_the_builtin_tuners():
    model = VisionEfficientTuningModel(model_dir=None, backbone=dict(
        VIT, type='VitB16_UTuning', adapter_length=4, adapter_type=None, prefix_length=3, prefix_type=None,
        prompt_length=2, prompt_type=None, lora_length=[2, 0], lora_type=None), head={'num_classes': K})
    for b in model.backbone.blocks:
        assert b.ffn_adapter.form == 'sequential'
        assert b.mha_prefix.form == 'sequential'
        assert b.block_prompt.form == 'sequential'
    assert model.backbone.blocks[0].mha_lora.rank == 2 and tuner_at(model.backbone.blocks[1], 'mha', 'lora') is None


# -- validation ------------------------------------------------------------------------------------------------
INVALID = [
    ({'type': 'adaptor', 'dim': 4}, 'unknown type'),
    ({'type': 'adapter', 'op': 'attn', 'dim': 4}, 'unknown op'),
    ({'type': 'adapter', 'form': 'serial', 'dim': 4}, 'unknown form'),
    ({'type': 'adapter', 'dim': 0}, 'dim must be > 0'),
    ({'type': 'adapter', 'dim': -2}, 'dim must be > 0'),
    ({'type': 'prefix', 'length': 0}, 'length must be > 0'),
    ({'type': 'lora', 'rank': -1}, 'rank must be > 0'),
    ({'type': 'adapter', 'dim': [4, -1]}, 'non-negative'),
    ({'type': 'adapter', 'dim': [0, 0]}, 'no layer'),
    ({'type': 'adapter', 'dim': [4, 4, 4]}, 'per-layer'),
    ({'type': 'adapter', 'dim': 2.5}, 'integers'),
    ({'type': 'adapter'}, 'needs a size'),
    ({'type': 'adapter', 'dim': 4, 'layers': [2]}, 'out of range'),
    ({'type': 'adapter', 'dim': 4, 'layers': 5}, 'out of range'),
    ({'type': 'adapter', 'dim': 4, 'layers': [-3]}, 'out of range'),
    ({'type': 'adapter', 'dim': 4, 'layers': 'some'}, 'layers must be'),
    ({'type': 'prefix', 'op': 'ffn', 'form': 'sequential', 'length': 4}, "op must be 'mha'"),
    ({'type': 'prefix', 'op': 'block', 'form': 'sequential', 'length': 4}, "op must be 'mha'"),
    ({'type': 'prompt', 'op': 'mha', 'form': 'sequential', 'length': 4}, "op must be 'block'"),
    ({'type': 'prompt', 'op': 'ffn', 'form': 'sequential', 'length': 4}, "op must be 'block'"),
    ({'type': 'lora', 'op': 'block', 'rank': 4}, "op must be 'mha'"),
    ({'type': 'lora', 'op': 'mha', 'form': 'sequential', 'rank': 4}, 'single form'),
    ({'type': 'adapter', 'dim': 4, 'rank': 2}, 'unknown key'),
    ({'type': 'bitfit', 'op': 'mha'}, 'unknown key'),
    ({'type': 'lora', 'rank': 4, 'scale': 'channel'}, 'unknown key'),
    ({'type': 'adapter', 'form': 'sequential', 'dim': 4, 'scale': 'channel'}, 'no learned scale'),
    ({'type': 'prefix', 'form': 'sequential', 'length': 4, 'scale': 'scalar'}, 'no learned scale'),
    ({'type': 'adapter', 'dim': 4, 'scale': 'vector'}, 'unknown scale'),
    ({'type': 'adapter', 'dim': 4, 'act': 'swish42'}, 'unknown act'),
    ({'type': 'side', 'dim': 16}, 'backbone width'),
    ({'type': 'side', 'net': 'alexnet'}, 'not supported'),
]


@pytest.mark.parametrize('entry,fragment', INVALID, ids=[f'{i}-{f}' for i, (_, f) in enumerate(INVALID)])
def test_invalid_entry_raises_value_error_naming_it(entry, fragment):
    with pytest.raises(ValueError) as err:
        parse_tuners([entry], DIMS)
    msg = str(err.value)
    assert repr(entry) in msg and fragment in msg, msg
    # the model constructor reports the same error
    with pytest.raises(ValueError, match='tuner entry'):
        build([entry])


@pytest.mark.parametrize('entries', [
    [{'type': 'adapter', 'op': 'ffn', 'dim': 4}, {'type': 'adapter', 'op': 'ffn', 'dim': 8, 'form': 'sequential'}],
    [{'type': 'adapter', 'dim': 4, 'layers': [0]}, {'type': 'adapter', 'dim': 4, 'layers': [1]},
     {'type': 'adapter', 'dim': 5, 'layers': [0]}],
    [{'type': 'lora', 'rank': 2}, {'type': 'lora', 'op': 'mha', 'rank': [0, 3]}],
    [{'type': 'prefix', 'op': 'mha', 'form': 'sequential', 'length': 2},
     {'type': 'prefix', 'op': 'mha', 'form': 'parallel', 'length': 2, 'layers': [1]}],
    [{'type': 'bitfit'}, {'type': 'bitfit', 'layers': [1]}],
])
def test_duplicate_type_op_on_same_layer(entries):
    with pytest.raises(ValueError) as err:
        parse_tuners(entries, DIMS)
    assert repr(entries[-1]) in str(err.value) and 'already has' in str(err.value)
    with pytest.raises(ValueError, match='already has'):
        build(entries)


def test_malformed_lists():
    with pytest.raises(ValueError, match='must be a list'):
        parse_tuners({'type': 'adapter', 'dim': 4}, DIMS)
    with pytest.raises(ValueError, match='tuner entry'):
        parse_tuners(['adapter'], DIMS)


# -- the paper's decomposition ------------------------------------------------------------------------------------
def op_alone(block, op, h):
    """``OP'(h)`` of the block's mha or ffn OP with its tuners, without a residual stream (tuners that measure their
    term in units of the residual use 1): the block's own frozen parts and hook calls, composed as its forward
    composes them."""
    if op == 'mha':
        out, q = block.attention(h)
        y, ctx = block.ls1(out), block.op_context('mha', h, None, q)
    else:
        y, ctx = block.ls2(block.mlp_out(h)), block.op_context('ffn', h, None)
    for tuner in block.tuners_at(op):
        y = tuner.combine(ctx, y)
    return y


def _capture_attention(block, h):
    """Run the mha OP on h and return (output, the attention output fed to attn.proj)."""
    store = {}
    hook = block.attn.proj.register_forward_pre_hook(lambda mod, args: store.setdefault('a', args[0].clone()))
    try:
        y = op_alone(block, 'mha', h)
    finally:
        hook.remove()
    return y, store['a']


def _heads(t):
    B, N, _ = t.shape
    return t.view(B, N, H, C // H).transpose(1, 2).double()


def _explicit_attention(q, k, v):
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(logits, dim=-1) @ v, torch.logsumexp(logits, dim=-1, keepdim=True)


def test_sequential_prefix_decomposition():
    """Attn(Q, [K; K_pre], [V; V_pre]) == (1 - lambda) Attn(Q, K, V) + lambda Attn(Q, K_pre, V_pre), with
    lambda = sum_j exp(q.kpre_j/sqrt d) / (sum_i exp(q.k_i/sqrt d) + sum_j exp(q.kpre_j/sqrt d)) per head/query."""
    torch.manual_seed(0)
    L = 5
    model = build([{'type': 'prefix', 'op': 'mha', 'form': 'sequential', 'length': L}])
    block = model.backbone.blocks[0].eval()
    with torch.no_grad():
        block.mha_prefix.key.normal_(0, 1.0)
        block.mha_prefix.value.normal_(0, 1.0)
        h = torch.randn(2, N_TOKENS, C)
        _, attn_out = _capture_attention(block, h)

        qkv = F.linear(h, block.attn.qkv.weight, block.attn.qkv.bias)
        q, k, v = (_heads(t) for t in qkv.split(C, dim=-1))
        k_pre, v_pre = _heads(block.mha_prefix.key), _heads(block.mha_prefix.value)

        a_self, lse_self = _explicit_attention(q, k, v)
        a_pre, lse_pre = _explicit_attention(q, k_pre, v_pre)
        lam = torch.exp(lse_pre) / (torch.exp(lse_self) + torch.exp(lse_pre))   # (B, H, N, 1)
        assert lam.shape == (2, H, N_TOKENS, 1) and 0.01 < lam.mean() < 0.99
        assert lam.std() > 1e-3  # really per head / per query
        decomposed = (1 - lam) * a_self + lam * a_pre
        concat, _ = _explicit_attention(q, torch.cat((k, k_pre.expand_as(k[:, :, :L])), 2),
                                        torch.cat((v, v_pre.expand_as(v[:, :, :L])), 2))
        ours = _heads(attn_out)
        torch.testing.assert_close(decomposed, concat, atol=1e-10, rtol=0)
        torch.testing.assert_close(ours, decomposed, atol=1e-5, rtol=0)

        # P-Prefix: the parallel branch computes Attn(Q, K_pre, V_pre) exactly, with the frozen MHA queries
        par = build([{'type': 'prefix', 'op': 'mha', 'form': 'parallel', 'length': L, 'scale': 'none'}])
        pblock = par.backbone.blocks[0].eval()
        sd = {k2: v2 for k2, v2 in block.state_dict().items() if 'prefix' not in k2}
        pblock.load_state_dict(sd, strict=False)
        pblock.mha_prefix.key.copy_(block.mha_prefix.key)
        pblock.mha_prefix.value.copy_(block.mha_prefix.value)
        branch = pblock.mha_prefix.branch(pblock.op_context('mha', h, None))   # q from W_q h
        torch.testing.assert_close(_heads(branch), a_pre, atol=1e-5, rtol=0)
        y_par, plain_attn = _capture_attention(pblock, h)
        torch.testing.assert_close(_heads(plain_attn), a_self, atol=1e-5, rtol=0)
        torch.testing.assert_close(y_par.double(), (pblock.attn.proj(plain_attn) + branch).double(),
                                   atol=1e-6, rtol=0)
        # ... so a P-Prefix whose scale equals lambda (per head, per query) reproduces the original prefix
        recombined = (1 - lam) * _heads(plain_attn) + lam * _heads(branch)
        torch.testing.assert_close(recombined, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize('op', ['ffn', 'block'])
def test_parallel_prefix_and_prompt_borrow_frozen_projections(op):
    """P-Prefix / P-Prompt on ffn / block: Q = W_q h (block: W_q norm1(x)); prompt K/V = W_{k,v} P + b."""
    torch.manual_seed(0)
    model = build([{'type': 'prefix', 'op': op, 'form': 'parallel', 'length': 3, 'scale': 'none'},
                   {'type': 'prompt', 'op': op, 'form': 'parallel', 'length': 3, 'scale': 'none'}])
    randomize_trainable_(model)
    block = model.backbone.blocks[1].eval()
    with torch.no_grad():
        x = torch.randn(2, N_TOKENS, C)
        hq = block.norm1(x) if op == 'block' else x
        Wq, Wk, Wv = block.attn.qkv.weight.split(C)
        bq, bk, bv = block.attn.qkv.bias.split(C)
        q = _heads(F.linear(hq, Wq, bq))
        pre, _ = _explicit_attention(q, _heads(block.__getattr__(f'{op}_prefix').key),
                                     _heads(block.__getattr__(f'{op}_prefix').value))
        P = block.__getattr__(f'{op}_prompt').tokens
        pro, _ = _explicit_attention(q, _heads(F.linear(P, Wk, bk)), _heads(F.linear(P, Wv, bv)))
        zero = torch.zeros_like(x)
        got_pre = block.__getattr__(f'{op}_prefix').combine(block.op_context(op, x, None), zero)
        got_pro = block.__getattr__(f'{op}_prompt').combine(block.op_context(op, x, None), zero)
        torch.testing.assert_close(_heads(got_pre), pre, atol=1e-5, rtol=0)
        torch.testing.assert_close(_heads(got_pro), pro, atol=1e-5, rtol=0)


def test_parallel_adapter_equation():
    """P-Adapter: OP'(h) = OP(h) + s * (W_up act(W_down h + b) + b_up) / r (alone, no residual stream: units of 1);
    sequential: OP'(h) = OP(h) + A(OP(h))."""
    torch.manual_seed(0)
    model = build([{'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 4, 'scale': 'channel'},
                   {'type': 'adapter', 'op': 'mha', 'form': 'sequential', 'dim': 4}])
    randomize_trainable_(model)
    block = model.backbone.blocks[0].eval()
    with torch.no_grad():
        h = torch.randn(2, N_TOKENS, C)
        a = block.ffn_adapter
        want = block.mlp(h) + a.scale.weight * a.up(F.gelu(a.down(h))) / 4   # U = A(h) / r, r = 4
        torch.testing.assert_close(op_alone(block, 'ffn', h), want, atol=1e-6, rtol=0)
        s = block.mha_adapter
        y = block.attn(h)
        torch.testing.assert_close(op_alone(block, 'mha', h), y + s.up(F.gelu(s.down(y))), atol=1e-6, rtol=0)
